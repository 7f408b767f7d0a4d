"""Hostile text input: QEMU -trace logs, the guest stream, QMP query-migrate replies.

Same contract as the bundle reader: a one-line HintscopeError naming the file, or every valid
record kept and the rest counted in one-line problem notes; no traceback, no hang, bounded memory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import assume, given, strategies as st

from hintscope import limits, schema
from hintscope.bundle import to_arrow
from hintscope.errors import HintscopeError
from test_hostile_util import FUZZ, assert_problems, clean, one_line

qemu_trace = pytest.importorskip("hintscope.parse.qemu_trace")
guest_stream = pytest.importorskip("hintscope.parse.guest_stream")

DATA = Path(__file__).parent / "data" / "qemu-trace-7.2-kvm.log"
SAMPLE = DATA.read_bytes().splitlines(keepends=True)[:400] if DATA.exists() else []


def _frame_ok(df: pd.DataFrame, table: str) -> None:
    want = schema.get(table).arrow_schema.empty_table().to_pandas().dtypes
    assert list(df.columns) == list(want.index)
    for c in df.columns:  # "string" vs pandas 3's "str" is the same thing for readers
        if pd.api.types.is_string_dtype(want[c]):
            assert pd.api.types.is_string_dtype(df[c].dtype), (c, df[c].dtype)
        else:
            assert df[c].dtype == want[c], (c, df[c].dtype, want[c])
    to_arrow(table, df)  # what a producer would do next must not fail either


# --- QEMU trace log --------------------------------------------------------------------------

garbage_line = st.one_of(
    st.binary(max_size=200).map(lambda b: b.replace(b"\n", b" ")),
    st.text(max_size=200).map(lambda s: s.replace("\n", " ").encode("utf-8", "replace")),
    st.builds(lambda t, s, u, ev, a: f"{t}@{s}.{u}:{ev} {a}".encode(),
              st.integers(0, 10**12), st.integers(0, 10**12), st.integers(0, 10**7),
              st.sampled_from(list(qemu_trace.EVENTS) + ["x", "kvm_run_exit"]),
              st.text(alphabet="0123456789abcdefxXSlot#=gpa size ua ret-()nil:", max_size=120)),
)


@pytest.mark.skipif(not SAMPLE, reason="tests/data/qemu-trace-7.2-kvm.log missing")
@FUZZ
@given(inserts=st.lists(st.tuples(st.integers(0, 399), garbage_line), max_size=20))
def test_trace_garbage_lines_keep_every_valid_line(inserts):
    base = qemu_trace.parse_bytes(b"".join(SAMPLE), "base.log")
    lines = list(SAMPLE)
    for pos, g in sorted(inserts, reverse=True):
        lines.insert(pos, g + b"\n")
    r, err = clean(lambda: qemu_trace.parse_bytes(b"".join(lines), "evil.log"), "evil.log")
    assert err is None
    _frame_ok(r.frame, "qemu_trace")
    # Every original event is still there (garbage can only add rows, never remove them).
    got = r.frame[["event", "args", "wall_ns"]].astype(str).value_counts()
    want = base.frame[["event", "args", "wall_ns"]].astype(str).value_counts()
    assert (got.reindex(want.index).fillna(0) >= want).all()
    assert r.bad <= len(inserts)
    if r.problem:
        assert one_line(r.problem) and "evil.log" in r.problem


@pytest.mark.skipif(not SAMPLE, reason="tests/data/qemu-trace-7.2-kvm.log missing")
@FUZZ
@given(cut=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)), max_size=30),
       shuffle=st.randoms(use_true_random=False), dup=st.booleans())
def test_trace_bitflips_truncation_reordering(tmp_path_factory, cut, flips, shuffle, dup):
    raw = bytearray(b"".join(SAMPLE))
    for pos, bit in flips:
        raw[int(pos * (len(raw) - 1))] ^= 1 << bit
    lines = bytes(raw[: int(cut * len(raw))]).split(b"\n")
    if dup:
        lines = lines + lines
    shuffle.shuffle(lines)
    p = tmp_path_factory.mktemp("trace") / "qemu-trace.log"
    p.write_bytes(b"\n".join(lines))
    meta = {"clock_anchors": [{"monotonic_ns": 5, "realtime_ns": 1795641808_000_000_000}]}
    r, err = clean(lambda: qemu_trace.parse_file(p, meta), str(p))
    if r is not None:
        _frame_ok(r.frame, "qemu_trace")
        assert r.problem is None or (one_line(r.problem) and str(p) in r.problem)


@FUZZ
@given(sec=st.integers(0, 10**11 - 1), usec=st.integers(0, 999_999))
def test_trace_timestamps_never_wrap(sec, usec):
    """A clock jump to any printable second must be kept exactly or rejected, never wrapped around int64."""
    r = qemu_trace.parse_bytes(f"1@{sec}.{usec:06d}:migration_bitmap_sync_start\n".encode(), "t.log")
    if len(r.frame):
        assert int(r.frame["wall_ns"].iloc[0]) == sec * 10**9 + usec * 1000
    else:
        assert r.bad == 1 and "t.log" in r.problem


@FUZZ
@given(anchors=st.lists(st.fixed_dictionaries({
    "monotonic_ns": st.integers(-(2**63), 2**63 - 1), "realtime_ns": st.integers(-(2**63), 2**63 - 1)}),
    max_size=4), sec=st.integers(0, 9_000_000_000))
def test_trace_hostile_clock_anchors(anchors, sec):
    r = qemu_trace.parse_bytes(f"1@{sec}.000001:migration_bitmap_sync_start\n".encode(), "t.log")
    clean(lambda: qemu_trace.add_monotonic(r.frame, {"clock_anchors": anchors}), "anchor", "clock")
    assert r.frame["ts_ns"].dtype == np.int64


@pytest.mark.parametrize("line", [
    b"1@1.000001:kvm_set_user_memory Slot#0 flags=0x0 gpa=0x" + b"f" * 16 + b" size=0x1 ua=0x1 ret=0",
    b"1@1.000001:kvm_set_user_memory Slot#99999999999 flags=0x0 gpa=0x0 size=0x1 ua=0x1 ret=0",
    b"99999999999@1.000001:migration_bitmap_sync_start",
    b"1@1.000001:ram_save_page " + b"A" * 5000 + b": offset: 0x0 host: (nil)",
    b"1@1.000001:kvm_clear_dirty_log slot#0 start 0x0 size 0x" + b"9" * 17,
    b"1@1.000001:migration_bitmap_sync_end dirty_pages " + b"9" * 19,
    b"2026-13-45T99:99:99.000000Z qemu-system-x86_64: bad date",
    b"9999-12-31T23:59:59.000000Z qemu-system-x86_64: beyond datetime64[ns]",
    b"0001-01-01T00:00:00.000000Z qemu-system-x86_64: before datetime64[ns]",
    b"\x00" * 100, b"\xff\xfe" * 100, "\u202e\u0000ünïcode".encode(),
])
def test_trace_worst_lines(line):
    r = qemu_trace.parse_bytes(line + b"\n1@1.000001:migration_bitmap_sync_start\n", "w.log")
    assert r.bad <= 1 and len(r.frame) >= 1
    _frame_ok(r.frame, "qemu_trace")


def test_trace_not_a_trace_is_one_line_error(tmp_path):
    p = tmp_path / "x.log"
    p.write_bytes(b"\x7fELF\n" * 100)
    _, err = clean(lambda: qemu_trace.parse_file(p), str(p))
    assert err and "not a QEMU trace log" in err


TRACE_MEM = """
import sys
from hintscope.parse import qemu_trace
from hintscope.errors import HintscopeError
try:
    r = qemu_trace.parse_file({path!r})
    print("ROWS", len(r.frame)); print("PROBLEM", r.problem)
except HintscopeError as e:
    print("ERROR", e)
"""


@pytest.mark.parametrize("mib", [48, pytest.param(256, marks=pytest.mark.lab)])
def test_trace_memory_bound(tmp_path, mib):
    """A log of tiny valid lines (48 MiB ~ 3.9 M events in CI; 256 MiB = the byte cap, ~20 M events, in
    the lab run) under a 1.5 GiB address-space cap: the event cap stops it, reported as truncation."""
    p = tmp_path / "big.log"
    line = b"1@1.000001:x\n"
    with open(p, "wb") as f:
        block = line * (1 << 16)
        for _ in range((mib << 20) // len(block)):
            f.write(block)
    r = limits.run_capped(TRACE_MEM.format(path=str(p)), timeout=300)
    assert not r.timed_out, "trace reader did not finish in 300 s"
    assert not r.traceback and r.returncode == 0, r.stderr[-1500:]
    out = r.stdout
    assert out.startswith("ROWS") or out.startswith("ERROR"), out
    assert str(p) in out and "read only the first" in out, out


# --- guest stream ----------------------------------------------------------------------------

u64 = st.integers(0, 2**64 - 1)
e_line = st.builds(lambda seq, ns, cpu, tid, kind, a: f"E {seq} {ns} {cpu} {tid} {kind} {a[0]} {a[1]} {a[2]}",
                   st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1), st.integers(0, 4096),
                   st.integers(0, 2**31 - 1), st.sampled_from(list(guest_stream.KINDS)), st.tuples(u64, u64, u64))
hostile_line = st.one_of(
    st.text(max_size=120).map(lambda s: s.replace("\n", " ")),
    st.builds(lambda *v: "E " + " ".join(str(x) for x in v), *[st.integers(-(2**70), 2**70)] * 8),
    st.builds(lambda a, b, w, t: f"W {a} {b} {w} {t}", st.integers(-5, 2**66), st.integers(-5, 2**66),
              st.sampled_from(["READY", "BEAT", "WPFN", "LOSTW", "x"]), st.text(max_size=60).map(
                  lambda s: s.replace("\n", " "))),
    st.builds(lambda a, b, c: f"W {a} {b} WPFN {c} " + ",".join(["18446744073709551616", "1"] * 3),
              st.integers(0, 9), st.integers(0, 9), st.integers(0, 10**9)),
    st.builds(lambda a, b, d, r, m: f"S {a} {b} {d} {r} {m}", *[st.integers(-(2**65), 2**65)] * 5),
    st.builds(lambda js: f"HSG 1 {js}", st.one_of(st.just("[" * 5000), st.just('{"a": ' + "9" * 6000 + "}"),
                                                   st.text(max_size=50))),
    st.just("A 1 2 ATTACHED"), st.just("\x00\x00"), st.just("E " + "9" * 4000),
)


@FUZZ
@given(valid=st.lists(e_line, max_size=40), junk=st.lists(st.tuples(st.integers(0, 40), hostile_line), max_size=20),
       split=st.integers(0, 40), overlap=st.integers(0, 5), truncate=st.booleans())
def test_guest_stream_keeps_every_valid_record(tmp_path_factory, valid, junk, split, overlap, truncate):
    """src + dst files of one migration, with junk, overlap at the switch, and a truncated tail."""
    seqs = [int(v.split()[1]) for v in valid]
    assume(len(set(seqs)) == len(seqs))  # sequence reuse is its own test below
    d = tmp_path_factory.mktemp("gs")
    lines = list(valid)
    for pos, j in sorted(junk, reverse=True):
        lines.insert(min(pos, len(lines)), j)
    s = min(split, len(lines))
    src, dst = lines[:s], lines[max(0, s - overlap):]
    (d / "src").write_text("\n".join(src) + "\n")
    (d / "dst").write_text("\n".join(dst) + "\n" + ("E 1 2" if truncate else ""))
    r, err = clean(lambda: guest_stream.parse_streams([(d / "src", "src"), (d / "dst", "dst")]), str(d))
    assert err is None
    assert_problems([p for p in r.problems if not p.startswith("guest stream:")], str(d))
    assert_problems(r.problems)
    got = set(r.tables["guest_events"]["seq"].tolist())
    junk_e = {int(j.split()[1]) for _, j in junk if j.startswith("E ") and len(j.split()) > 1
              and j.split()[1].isdigit()}
    missing = set(seqs) - got
    # A junk E line that happened to be valid may claim a seq first; nothing else may be lost.
    assert missing <= junk_e, sorted(missing)[:5]


@FUZZ
@given(data=st.binary(max_size=4096))
def test_guest_stream_arbitrary_bytes(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("gsb") / "s"
    p.write_bytes(data)
    r, err = clean(lambda: guest_stream.parse_streams([(p, "src")]), str(p))
    if r is not None:
        assert_problems(r.problems)


def test_guest_stream_sequence_reuse_and_reorder(tmp_path):
    a = "E 5 100 0 1 6 1 2 3\nE 5 50 0 1 6 9 9 9\nE 3 200 0 1 6 1 2 3\nE 4 10 0 1 6 1 2 3\n"
    (tmp_path / "s").write_text(a)
    r = guest_stream.parse_streams([(tmp_path / "s", "src")])
    assert r.tables["guest_events"]["seq"].tolist() == [3, 4, 5]
    assert any("reuse a sequence number" in p for p in r.problems)
    assert any("backwards" in p for p in r.problems)
    assert_problems(r.problems)


def test_guest_stream_fifo_or_missing_is_named(tmp_path):
    _, err = clean(lambda: guest_stream.parse_streams([(tmp_path / "nope", "src")]), "nope")
    assert err


GS_MEM = """
from hintscope.parse import guest_stream
from hintscope.errors import HintscopeError
try:
    r = guest_stream.parse_streams([({path!r}, "src")])
    print("ROWS", len(r.tables["guest_events"])); print("PROBLEMS", r.problems[:3])
except HintscopeError as e:
    print("ERROR", e)
"""


@pytest.mark.parametrize("mib", [48, pytest.param(None, marks=pytest.mark.lab)])
def test_guest_stream_memory_bound(tmp_path, mib):
    """Minimal valid records (48 MiB ~ 2.6 M lines in CI; the whole byte cap in the lab run), under a
    1.5 GiB address-space cap: the line cap stops it, reported in problems."""
    size = (mib << 20) if mib else limits.MAX_STREAM_BYTES
    p = tmp_path / "big"
    with open(p, "wb") as f:
        block = b"".join(b"E %d 1 0 1 6 1 2 3\n" % i for i in range(1 << 16))
        while f.tell() < size - len(block):
            f.write(block)
    r = limits.run_capped(GS_MEM.format(path=str(p)), timeout=300)
    assert not r.timed_out, "guest stream reader did not finish in 300 s"
    assert not r.traceback and r.returncode == 0, r.stderr[-1500:]
    assert r.stdout.startswith(("ROWS", "ERROR")) and str(p) in r.stdout and "more than" in r.stdout, r.stdout


# --- QMP query-migrate snapshots -----------------------------------------------------------

from hintscope.lab import session as migrate  # noqa: E402  (QMP rows live in the shared lab driver)

qmp_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**80), 2**80), st.floats(), st.text(max_size=30))
qmp_json = st.recursive(qmp_leaf, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=10), c,
                                                                                                 max_size=4)),
                        max_leaves=10)
RAM_KEYS = ["transferred", "normal", "duplicate", "dirty-sync-count", "remaining", "dirty-pages-rate", "total"]


@FUZZ
@given(info=st.fixed_dictionaries({}, optional={
    "status": qmp_json, "total-time": qmp_json, "ram": st.one_of(qmp_json, st.fixed_dictionaries(
        {}, optional={k: qmp_json for k in RAM_KEYS})), "error-desc": qmp_json}))
def test_qmp_snapshot_any_reply(info):
    """Whatever QEMU's QMP sends back (it is guest-reachable code), a row is written or a one-line error."""
    def row():
        r = migrate.qmp_row(1, 2, info)
        to_arrow("qmp", pd.DataFrame([r]))
        return r
    r, err = clean(row, "QMP", "qmp", "query-migrate")
    if r is not None:
        for k in ("total_time", "transferred", "normal", "duplicate", "dirty_sync_count", "remaining",
                  "dirty_pages_rate"):
            assert isinstance(r[k], int) and -(2**63) <= r[k] < 2**63
        json.loads(r["raw"])


@pytest.mark.parametrize("v", [math.nan, math.inf, -math.inf, 2**64, -(2**64), 1e300, "12", True])
def test_qmp_snapshot_numbers(v):
    r, err = clean(lambda: migrate.qmp_row(1, 2, {"status": "active", "ram": {"transferred": v}}), "qmp", "QMP")
    if r is not None:
        to_arrow("qmp", pd.DataFrame([r]))
        assert r["transferred"] == -1 or isinstance(r["transferred"], int)


def test_guest_stream_gap_count_does_not_wrap(tmp_path):
    (tmp_path / "s").write_text(f"E 0 1 0 1 6 1 2 3\nE {2**63 - 1} 2 0 1 6 1 2 3\n")
    r = guest_stream.parse_streams([(tmp_path / "s", "src")])
    assert f"{2**63 - 2} probe records missing" in " ".join(r.problems), r.problems
