"""Guest stream parser: valid records, hostile input, source/destination join, bundle round trip."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hintscope.bundle import BundleWriter, read_bundle
from hintscope.errors import HintscopeError
from hintscope.parse import guest_stream as gsm
from hintscope.parse.guest_stream import parse_streams

U64_MAX = 2**64 - 1

SRC = """HSG 1 {"version":1,"probes":{"kprobe:report_free_page_func":{"status":"attached"}}}
A 0 100 ATTACHED
E 0 1000 0 55 1 123 0 0
E 1 1100 0 55 5 2147483649 0 0
E 2 1200 0 55 6 4096 10 2147483649
E 3 1300 0 55 6 5120 10 2147483649
E 4 1400 0 55 2 2 2147483649 0
E 5 1500 1 66 10 0 0 0
E 6 1510 1 66 7 1 2 0
E 7 1520 1 66 9 4096 2 10
E 8 1530 1 66 8 1 2 0
E 9 1600 1 66 12 4100 0 3264
W 0 2000 READY fill=400 writer=16 pressure=0
W 1 2100 BEAT 700000 3 0
W 2 2200 WPFN 0 11,12,13
S 0 2300 0 0 5000
"""
# the destination file repeats the last source event (a line in flight at the switch)
DST = f"""E 9 1600 1 66 12 4100 0 3264
E 10 3000 0 55 4 1 0 0
E 11 3010 0 55 7 {U64_MAX} 1 0
E 12 3020 0 55 9 5120 1 10
E 13 3030 0 55 8 1 1 0
W 3 3100 BEAT 800000 4 0
W 4 3200 LOSTW 1 12 4294967296 0
"""


def write(tmp_path, name, text: str | bytes):
    p = tmp_path / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


def test_valid_streams_join_src_and_dst(tmp_path):
    gs = parse_streams([(write(tmp_path, "s", SRC), "src"), (write(tmp_path, "d", DST), "dst")])
    assert gs.problems == []
    ev = gs.tables["guest_events"]
    assert ev["seq"].tolist() == list(range(14))  # duplicate seq 9 dropped, order by seq
    assert ev.loc[ev["seq"] == 9, "side"].item() == "src"  # first copy kept
    assert ev.loc[ev["seq"] == 11, "a0"].item() == U64_MAX
    h = gs.tables["guest_hints"]
    assert h["pfn"].tolist() == [4096, 5120] and (h["order"] == 10).all() and (h["cmd_id"] == 0x80000001).all()
    assert h["run"].tolist() == [0, 0]
    r = gs.tables["guest_returns"]
    assert r[["pfn", "reason", "side"]].values.tolist() == [[4096, "shrinker", "src"], [5120, "done", "dst"]]
    u = gs.tables["guest_reuse"]
    assert u[["pfn", "block_pfn", "returned_ns", "gfp"]].values.tolist() == [[4100, 4096, 1520, 3264]]
    rep = gs.tables["guest_reports"]
    assert rep["word"].tolist() == ["ATTACHED", "READY", "BEAT", "STATS", "BEAT", "LOSTW"]
    lostw = rep[rep["word"] == "LOSTW"].iloc[0]
    assert (lostw["v0"], lostw["v1"], lostw["v2"], lostw["side"]) == (1, 12, 4294967296, "dst")
    assert gs.tables["guest_writer_pages"][["index", "pfn"]].values.tolist() == [[0, 11], [1, 12], [2, 13]]
    assert gs.header["probes"]["kprobe:report_free_page_func"]["status"] == "attached"


def test_hostile_lines_are_dropped_with_one_line_notes(tmp_path):
    bad = (SRC
           + "E 14 1700 0 55 6 99999999999999999999 10 1\n"       # u64 overflow
           + "E 15 99999999999999999999 0 55 6 1 10 1\n"           # int64 overflow
           + "E 16 1800 0 55 99 1 1 1\n"                           # unknown kind
           + "E 17 1800 0 9999999999 6 1 1 1\n"                    # tid out of int32
           + "\x00\x00garbage \xff\n"
           + "W 5 2400 LOWERcase\n"
           + "HSG 1 {not json\n"
           + "E 18 1900 0 55 3 0 0 0\n"
           + "E 19 2000 0 55 3 0 0")                                # truncated last line
    gs = parse_streams([(write(tmp_path, "s", bad.encode("utf-8", "surrogateescape")), "src")])
    ev = gs.tables["guest_events"]
    assert ev["seq"].max() == 18 and 14 not in ev["seq"].tolist() and 16 not in ev["seq"].tolist()
    assert len(ev) == 11
    assert all("\n" not in p for p in gs.problems)
    text = " | ".join(gs.problems)
    assert "truncated" in text and "unknown event kind" in text and "not guest stream records" in text
    assert "sequence gaps" in text


def test_invalid_utf8_and_nul_bytes(tmp_path):
    raw = b"\xff\xfe\x00E 0 1 0 1 1 0 0 0\nE 0 1 0 1 1 0 0 0\n\x80\x81\n"
    gs = parse_streams([(write(tmp_path, "s", raw), "src")])
    assert gs.tables["guest_events"]["seq"].tolist() == [0]
    assert gs.problems


def test_conflicting_duplicates_are_reported(tmp_path):
    a = write(tmp_path, "a", "E 0 10 0 1 3 0 0 0\n")
    b = write(tmp_path, "b", "E 0 10 0 1 3 7 0 0\n")
    gs = parse_streams([(a, "src"), (b, "dst")])
    assert len(gs.tables["guest_events"]) == 1
    assert any("different content" in p for p in gs.problems)


def test_unusable_files(tmp_path, monkeypatch):
    with pytest.raises(HintscopeError, match="missing"):
        parse_streams([(tmp_path / "nope", "src")])
    big = write(tmp_path, "big", "x")
    monkeypatch.setattr(gsm, "MAX_STREAM_BYTES", 0)
    with pytest.raises(HintscopeError) as e:
        parse_streams([(big, "src")])
    assert "larger than" in str(e.value) and "\n" not in str(e.value)


def test_one_bad_file_keeps_the_other(tmp_path):
    gs = parse_streams([(write(tmp_path, "s", SRC), "src"), (tmp_path / "missing", "dst")])
    assert len(gs.tables["guest_events"]) == 10
    assert any("missing" in p for p in gs.problems)


def test_bundle_round_trip(tmp_path):
    gs = parse_streams([(write(tmp_path, "s", SRC), "src"), (write(tmp_path, "d", DST), "dst")])
    w = BundleWriter(tmp_path / "b", producer="test guest")
    gsm.write_to_bundle(w, gs)
    w.close("duration")
    b = read_bundle(tmp_path / "b")
    assert len(b.table("guest_events")) == 14
    assert b.table("guest_returns")["reason"].tolist() == ["shrinker", "done"]
    assert b.table("guest_reuse")["pfn"].dtype == np.uint64
    assert b.meta["sources"]["guest_probe"]["status"] == "captured"


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.lists(st.one_of(st.binary(max_size=60), st.text(max_size=60).map(str.encode),
                               st.sampled_from([b"E 1 2 3 4 5 6 7", b"E " + b"9" * 30, b"W 1 2 BEAT x y z",
                                                b"S 1 2 3 4 -5", b"A 1 2 ATTACHED", b"HSG 2 []"])),
                     max_size=20))
def test_fuzz_valid_records_survive_junk(tmp_path, junk):
    good = [f"E {i} {1000 + i} 0 7 3 {i} 0 0" for i in range(5)]
    lines = [g.encode() for g in good] + [j.replace(b"\n", b" ") for j in junk]
    raw = b"\n".join(lines) + b"\n"
    gs = parse_streams([(write(tmp_path, "f", raw), "src")])
    ev = gs.tables["guest_events"]
    assert set(range(5)) <= set(ev["seq"].tolist())
    assert all("\n" not in p for p in gs.problems)


def test_ring_drops_are_lost_events_not_silence(tmp_path):
    """The in-guest probe's STATS drop counter (cumulative) becomes meta lost and a partial source."""
    src = SRC + "S 1 2400 7 0 5000\nS 2 2500 12 0 5000\n"
    gs = parse_streams([(write(tmp_path, "s", src), "src"), (write(tmp_path, "d", DST), "dst")])
    assert gsm.ring_drops(gs) == {"src": 12}
    w = BundleWriter(tmp_path / "b", producer="test guest")
    gsm.write_to_bundle(w, gs)
    w.close("duration")
    b = read_bundle(tmp_path / "b")
    assert b.meta["lost"]["guest_probe_src"] == 12
    assert b.meta["sources"]["guest_probe"]["status"] == "partial"
    assert "dropped 12 events" in b.meta["sources"]["guest_probe"]["reason"]
