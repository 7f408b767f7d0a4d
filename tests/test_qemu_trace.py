"""QEMU -trace log reader: real QEMU 7.2 output, hostile lines, limits, clock mapping."""

from __future__ import annotations

import gzip
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import pandas as pd

from hintscope import schema
from hintscope.errors import HintscopeError
from hintscope.parse import qemu_trace as qt
from tests.conftest import QEMU, needs_kvm, needs_qemu

DATA = Path(__file__).parent / "data"
REAL = DATA / "qemu-trace-7.2-kvm.log"


def test_real_log_parses_completely():
    r = qt.parse_file(REAL)
    f = r.frame
    assert r.problem is None and r.bad == 0 and r.lines == 144 and len(f) == 144
    assert list(f.columns) == schema.get("qemu_trace").names
    counts = f["event"].value_counts().to_dict()
    assert counts == {"ram_save_page": 108, "kvm_set_user_memory": 22, "migrate_set_state": 3,
                      "migration_bitmap_clear_dirty": 3, "kvm_clear_dirty_log": 3, "migration_bitmap_sync_start": 2,
                      "migration_bitmap_sync_end": 2, "message": 1}
    assert f.loc[f["event"] == "migration_bitmap_sync_end", "dirty_pages"].tolist() == [0, 1]
    assert f.loc[f["event"] == "migrate_set_state", "state"].tolist() == ["setup", "active", "completed"]
    first = f[f["event"] == "kvm_set_user_memory"].iloc[0]
    # 13153@1795641808.620677:kvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0x4000000 ua=0x7f05f7e00000 ret=0
    cols = ["tid", "slot", "as_id", "flags", "gpa", "size", "hva", "ret"]
    assert [int(first[c]) for c in cols] == [13153, 0, 0, 0, 0, 0x4000000, 0x7F05F7E00000, 0]
    assert first.wall_ns == 1795641808_620677_000
    clr = f[f["event"] == "kvm_clear_dirty_log"].iloc[0]
    assert (clr.slot, clr.first_page, clr.num_pages) == (0, 0, 0x4000)
    rsp = f[f["event"] == "ram_save_page"].iloc[1]
    assert (rsp.block, rsp.offset, rsp.hva) == ("pc.ram", 0x6000, 0x7F05F7E06000)
    msg = f[f["event"] == "message"].iloc[0]
    # 2026-11-25T21:23:28.619829Z (UTC) printed by error_report with -msg timestamp=on
    assert msg.wall_ns == 1795641808_619829_000 and msg.tid == -1 and "warning" in msg.args
    assert (f["ts_ns"] == -1).all()  # no bundle meta given


def test_hostile_lines_are_counted_and_valid_lines_kept(tmp_path):
    good = REAL.read_bytes()
    hostile = (b"garbage line\n"
               b"1@1.000001:kvm_set_user_memory Slot#0 flags=0xZZ\n"          # known event, wrong args
               + b"7@1.000001:ram_save_page " + b"x" * 5000 + b"\n"           # over MAX_LINE
               + b"12@1795641809.786160:kvm_clear_dirty_log slot#0 start 0xffffffffffffffff size 0x1\n"  # > int64
               + b"99999999999@1.000001:migration_bitmap_sync_start \n"       # tid beyond int32
               + b"\x00\xff\xfe binary\n"
               + b"\n"                                                       # blank: ignored
               + b"5@1795641809.000001:some_future_event a b c\n"           # unknown event: kept, raw args
               + b"5@1795641809.000002:migration_bitmap_sync_end dirty_pages 12")  # no final newline: kept
    p = tmp_path / "hostile.log"
    p.write_bytes(good + hostile)
    r = qt.parse_file(p)
    assert r.bad == 6
    assert r.first_bad == 145
    assert len(r.frame) == 144 + 2
    assert r.frame["event"].iloc[-1] == "migration_bitmap_sync_end" and r.frame["dirty_pages"].iloc[-1] == 12
    assert r.frame["event"].iloc[-2] == "some_future_event" and r.frame["args"].iloc[-2] == "a b c"
    msg = r.problem
    assert "\n" not in msg and str(p) in msg and "line 145" in msg and "6 of" in msg


def test_not_a_trace_log_is_one_line_error(tmp_path):
    p = tmp_path / "x.log"
    p.write_bytes(b"hello\nworld\n")
    with pytest.raises(HintscopeError, match=r"x\.log: not a QEMU trace log .*line 1"):
        qt.parse_file(p)
    with pytest.raises(HintscopeError, match="cannot read"):
        qt.parse_file(tmp_path / "missing.log")
    (tmp_path / "empty.log").write_bytes(b"")
    assert len(qt.parse_file(tmp_path / "empty.log").frame) == 0


def test_file_size_cap_keeps_whole_lines(tmp_path):
    data = REAL.read_bytes()
    r = qt.parse_file(REAL, max_bytes=1000)
    whole = data[:1000].rfind(b"\n") + 1
    assert r.truncated_at == 1000 and r.bad == 0
    assert len(r.frame) == data[:whole].count(b"\n")
    assert "read only the first 1000 bytes" in r.problem


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=2**64 - 1), min_size=1, max_size=50))
def test_hex_to_int64_matches_python(values):
    s = pd.Series([format(v, "x") for v in values], dtype="string")
    got, ok = qt.hex_to_int64(s)
    want_ok = np.array([v < 2**63 for v in values])
    assert (ok == want_ok).all()
    assert [int(g) for g, o in zip(got, ok) if o] == [v for v in values if v < 2**63]


def test_wall_clock_mapped_through_anchors():
    meta = {"clock_anchors": [{"label": "start", "monotonic_ns": 1_000, "realtime_ns": 1795641808_000000_000}]}
    r = qt.parse_file(REAL, meta)
    f = r.frame
    # bundle.mono_from_wall interpolates offsets in float64 (~1e-16 relative: a few hundred ns at 1.8e18);
    # the log itself has 1 us resolution.
    err = f["ts_ns"] - (f["wall_ns"] - 1795641808_000000_000 + 1_000)
    assert err.abs().max() < 1000


def test_dirty_ring_and_load_events():
    lines = ("1@10.000001:kvm_dirty_ring_page vcpu 1 fetch 77 offset 0x1f\n"
             "1@10.000002:kvm_dirty_ring_reap reaped 12 pages (took 35 us)\n"
             "1@10.000003:kvm_dirty_ring_flush 1\n"
             "1@10.000004:ram_load_loop 0000:00:02.0/vga.vram: addr: 0x2000 flags: 0x8 host: (nil)\n"
             "1@10.000005:migration_bitmap_clear_dirty rb pc.ram start 0x0 size 0x40000000 page 0xdb\n")
    f = qt.parse_bytes(lines.encode(), "t").frame
    assert f["vcpu"].tolist()[:1] == [1] and f["count"].tolist()[:3] == [77, 12, 1]
    assert f["first_page"].tolist()[0] == 0x1F and f["size"].tolist()[1] == 35
    ld = f.iloc[3]
    assert (ld["block"], ld["offset"], ld["flags"], ld["hva"]) == ("0000:00:02.0/vga.vram", 0x2000, 8, 0)
    cd = f.iloc[4]
    assert (cd["block"], cd["offset"], cd["size"], cd["first_page"]) == ("pc.ram", 0, 0x40000000, 0xDB)


BPO = Path("/opt/hintscope/qemu-bpo")  # QEMU 10.0 from bookworm-backports (scripts/install-qemu-backports.sh)


@needs_qemu
@needs_kvm
@pytest.mark.parametrize("which", ["system", "backports"])
def test_live_qemu_writes_what_the_reader_parses(tmp_path, which):
    """The installed QEMU's own log output (not a stored sample) parses without a bad line."""
    if which == "system":
        argv = [QEMU]
    else:
        if not (BPO / "usr/bin/qemu-system-x86_64").exists():
            pytest.skip(f"backports QEMU not unpacked at {BPO}")
        argv = [str(BPO / "usr/bin/qemu-system-x86_64"), "-L", str(BPO / "usr/share/qemu"),
                "-L", str(BPO / "usr/share/seabios")]
    ev = tmp_path / "events"
    ev.write_text("kvm_set_user_memory\nmigrate_set_state\n")
    out = tmp_path / "out.log"
    p = subprocess.Popen(argv + ["-display", "none", "-nodefaults", "-S", "-enable-kvm", "-m", "64",
                                 "-msg", "timestamp=on", "-trace", f"events={ev},file={out}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (not out.exists() or b"size=0x4000000" not in out.read_bytes()):
            time.sleep(0.1)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(10)
    r = qt.parse_file(out)
    assert r.bad == 0, r.problem
    m = r.frame[r.frame["event"] == "kvm_set_user_memory"]
    assert len(m) and (m["size"] == 0x4000000).any() and (m["tid"] == m["tid"].iloc[0]).any()
    assert (m["hva"] > 0).all()


def test_gzipped_real_dirtier_log_parses():
    data = gzip.decompress((DATA / "qemu-trace-7.2-kvm-dirtier.log.gz").read_bytes())
    r = qt.parse_bytes(data, "dirtier")
    assert r.bad == 0
    f = r.frame
    assert f.loc[f["event"] == "migration_bitmap_sync_end", "dirty_pages"].tolist() == [0, 161, 161]


def test_chunked_parse_equals_whole_parse(monkeypatch):
    data = REAL.read_bytes() + b"bad\n" + b"y" * 3000 + b"\n" + REAL.read_bytes()
    whole = qt.parse_bytes(data, "w")
    monkeypatch.setattr(qt, "CHUNK_BYTES", 2000)  # shorter than the 3000-byte line too
    parts = qt.parse_bytes(data, "w")
    pd.testing.assert_frame_equal(whole.frame, parts.frame)
    assert (parts.lines, parts.bad, parts.first_bad) == (whole.lines, whole.bad, whole.first_bad) == (290, 2, 145)
    assert parts.frame["line"].is_monotonic_increasing and parts.frame["line"].iloc[-1] == 290


def test_line_cap_from_limits(tmp_path):
    from hintscope import limits
    line = b"1@10.000001:migration_bitmap_sync_end dirty_pages 7\n"
    with limits.override(MAX_LINE=20):
        r = qt.parse_bytes(line + line, "t")
    assert r.bad == 2 and "longer than 20" in r.first_bad_reason


_EVENTS = list(qt.EVENTS) + ["message", "x"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(
    st.binary(max_size=80),
    st.builds(lambda t, s, u, e, a: f"{t}@{s}.{u:06d}:{e} {a}".encode(),
              st.integers(0, 2**40), st.integers(0, 2**40), st.integers(0, 999999), st.sampled_from(_EVENTS),
              st.text(max_size=60)),
), max_size=40))
def test_any_input_parses_or_is_counted(lines):
    data = b"\n".join(lines)
    r = qt.parse_bytes(data, "fuzz")
    blank = sum(1 for ln in data.decode("utf-8", errors="replace").split("\n")[: r.lines] if not ln.strip())
    assert len(r.frame) + r.bad + blank == r.lines
    assert (r.frame["tid"] >= -1).all() and (r.frame["line"] >= 1).all()
    if r.bad:
        assert r.problem and "\n" not in r.problem


def test_message_timestamps_outside_the_ns_range_are_malformed():
    r = qt.parse_bytes(b"0026-11-25T21:23:28.619829Z a\n2026-11-25T21:23:28.619829Z b\n"
                       b"9999-01-01T00:00:00.000000Z c\n", "t")
    assert r.frame["args"].tolist() == ["b"] and r.bad == 2 and r.first_bad == 1


def test_write_to_bundle_then_analysis_reads_the_table(tmp_path):
    from hintscope.bundle import BundleWriter, read_bundle

    w = BundleWriter(tmp_path / "b", producer="test trace")
    r = qt.write_to_bundle(w, REAL)
    w.close(end_reason="target-exit")
    b = read_bundle(tmp_path / "b")
    assert b.has("qemu_trace") and len(r.frame) == 144
    t = qt.load(b)
    off = (t["ts_ns"] - t["wall_ns"]).to_numpy()
    a = b.meta["clock_anchors"][0]
    # Mapped through the writer's own anchor (constant offset for times before it).
    assert len(t) == 144 and np.abs(off - (a["monotonic_ns"] - a["realtime_ns"])).max() < 1000
    pd.testing.assert_series_equal(t["wall_ns"], r.frame["wall_ns"], check_names=False)
