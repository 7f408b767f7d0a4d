"""Perfetto export: what goes into the trace is what comes back out of it.

The protobuf round trip always runs.  The TraceProcessor round trip needs Perfetto's
trace_processor_shell binary, which the `perfetto` wheel does not ship (it downloads it on
first use from a non-registry host); it runs when the binary is cached or named by
HINTSCOPE_TRACE_PROCESSOR and skips with that reason otherwise.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from hintscope.bundle import read_bundle
from hintscope.cli import main
from hintscope.report import perfetto
from hintscope.report import timeline as tl
from test_report_bundles import MS, write_host_bundle


def decode(path: Path) -> dict:
    """Slices (begin/end pairs per track), instants, counters and flows read back from the file."""
    from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import Trace, TrackEvent

    tr = Trace()
    tr.ParseFromString(path.read_bytes())
    tracks, open_, slices, instants, counters = {}, {}, [], Counter(), Counter()
    flows_out, flows_in = set(), set()
    for p in tr.packet:
        if p.HasField("track_descriptor"):
            tracks[p.track_descriptor.uuid] = p.track_descriptor.name
            continue
        if not p.HasField("track_event"):
            continue
        e = p.track_event
        assert e.track_uuid in tracks, "event on a track that was never described"
        if e.type == TrackEvent.TYPE_SLICE_BEGIN:
            open_.setdefault(e.track_uuid, []).append((e.name, p.timestamp,
                                                       {a.name for a in e.debug_annotations}))
            flows_out.update(e.flow_ids)
        elif e.type == TrackEvent.TYPE_SLICE_END:
            name, ts, args = open_[e.track_uuid].pop()
            assert p.timestamp >= ts
            slices.append((tracks[e.track_uuid], name, ts, p.timestamp, args))
        elif e.type == TrackEvent.TYPE_INSTANT:
            instants[e.name] += 1
            flows_out.update(e.flow_ids)
            flows_in.update(e.terminating_flow_ids)
        elif e.type == TrackEvent.TYPE_COUNTER:
            counters[tracks[e.track_uuid]] += 1
    assert all(not v for v in open_.values()), "unterminated slices"
    return {"tracks": tracks, "slices": slices, "instants": instants, "counters": counters,
            "flows_out": flows_out, "flows_in": flows_in}


def _findings(t0: int) -> pd.DataFrame:
    # Two findings in epoch 1, evidence as the detector writes it: (host ns, side, text) steps,
    # a time <= 0 meaning "did not happen".
    a2, a4 = t0 + 1 * MS + 7 * MS, t0 + 1 * MS + 11 * MS
    return pd.DataFrame({
        "kind": ["apply-during-sync", "skipped"], "gfns": [[0x1234], [0x2000, 0x2001]],
        "evidence": [[(t0 + 1 * MS, "qemu", "sync 1 BEFORE"), (a2, "qemu", "hint_apply gfn 0x1234")],
                     [(a4, "qemu", "hint_apply gfn 0x2000"), (0, "qemu", "never sent")]],
        "confidence": ["hazard", "confirmed"], "sentence": ["apply overlaps sync", "page never sent"]})


def test_round_trip_protobuf(tmp_path):
    t0 = 10_000 * MS
    counts = write_host_bundle(tmp_path / "b", t0=t0)
    out = tmp_path / "t.pftrace"
    st = perfetto.export(tmp_path / "b", out, findings=_findings(t0))
    got = decode(out)
    names = Counter(n for _, n, _, _, _ in got["slices"])
    assert names == st.slices
    assert got["instants"] == st.instants
    # Against the bundle itself, not just the exporter's own tally:
    assert names["apply"] == counts["applies"] == 9
    assert names["GET_DIRTY_LOG"] == counts["get"]
    assert names["CLEAR_DIRTY_LOG"] == counts["clear"]
    assert names["fetch"] == counts["syncs"]
    assert sum(v for k, v in names.items() if k.startswith("sync ")) == counts["syncs"]
    assert sum(v for k, v in names.items() if k.startswith("epoch ")) == counts["epochs"]
    assert names["epoch 1 id 0x80000001"] == 1
    assert got["instants"]["apply-during-sync"] == 1 and got["instants"]["skipped"] == 1
    # Evidence: the three timed steps are instants, chained by flows into their finding.
    assert got["instants"]["F1 qemu: sync 1 BEFORE"] == 1 and got["instants"]["F2 qemu: hint_apply gfn 0x2000"] == 1
    assert not any("never sent" in k for k in got["instants"])
    assert st.flows == 3 and got["flows_in"] == got["flows_out"] and len(got["flows_out"]) == 3
    # Slices keep their arguments.
    apply_args = next(a for _, n, _, _, a in got["slices"] if n == "apply")
    assert {"hva", "bytes", "pages"} <= apply_args
    assert got["counters"]["pages sent"] == st.counters["pages sent"] > 0


def test_overlapping_slices_get_their_own_tracks(tmp_path):
    ev = pd.concat([
        tl._frame("applies", "apply", [0, 5, 20], [10, 15, 30]),
        tl._frame("syncs", "sync 1", [0], [40]),
    ], ignore_index=True)
    st = perfetto.write_timeline(tl.Timeline(ev), tmp_path / "t.pftrace")
    got = decode(tmp_path / "t.pftrace")
    by_track = Counter(tr for tr, n, _, _, _ in got["slices"] if n == "apply")
    assert sorted(by_track.values()) == [1, 2]          # the overlapping apply went to a second track
    assert st.slices["apply"] == 3


def test_cli_export(tmp_path, capsys):
    write_host_bundle(tmp_path / "b")
    assert main(["export", "perfetto", str(tmp_path / "b"), "-o", str(tmp_path / "x.pftrace")]) == 0
    assert (tmp_path / "x.pftrace").stat().st_size > 0
    assert "slices" in capsys.readouterr().out
    assert main(["export", "perfetto", str(tmp_path / "nope"), "-o", str(tmp_path / "y.pftrace")]) == 2
    assert "no such bundle" in capsys.readouterr().err


def _trace_processor_shell() -> str | None:
    env = os.environ.get("HINTSCOPE_TRACE_PROCESSOR")
    if env and os.path.isfile(env):
        return env
    from perfetto.prebuilts.manifests.trace_processor_shell import TRACE_PROCESSOR_SHELL_MANIFEST
    import platform
    import sys

    for e in TRACE_PROCESSOR_SHELL_MANIFEST:
        if e.get("platform") == sys.platform and platform.machine().lower() in e.get("machine", []):
            root, ext = os.path.splitext(e["file_name"])
            p = Path.home() / ".local/share/perfetto/prebuilts" / f"{root}-{e['sha256'][:16]}{ext}"
            return str(p) if p.is_file() else None
    return None


def test_round_trip_trace_processor(tmp_path):
    shell = _trace_processor_shell()
    if shell is None:
        pytest.skip("trace_processor_shell not available offline: the perfetto wheel downloads it on first use "
                    "(set HINTSCOPE_TRACE_PROCESSOR=/path/to/trace_processor_shell)")
    from perfetto.trace_processor import TraceProcessor, TraceProcessorConfig

    t0 = 10_000 * MS
    write_host_bundle(tmp_path / "b", t0=t0)
    st = perfetto.export(tmp_path / "b", tmp_path / "t.pftrace", findings=_findings(t0))
    with TraceProcessor(trace=str(tmp_path / "t.pftrace"), config=TraceProcessorConfig(bin_path=shell)) as tp:
        df = tp.query("select name, dur from slice").as_pandas_dataframe()
        flows = tp.query("select count(*) as n from flow").as_pandas_dataframe()["n"].iloc[0]
    got = Counter(df.loc[df["dur"] > 0, "name"])
    assert got == st.slices
    assert Counter(df.loc[df["dur"] == 0, "name"]) == st.instants
    assert flows == st.flows == 3


def test_simulated_run_has_guest_lanes_and_findings(tmp_path):
    """A simulator bundle: guest tracks on the host clock, one instant per detector finding."""
    from collections import Counter as C

    from hintscope.report import model
    from hintscope.sim.write import simulate, write_bundle

    write_bundle(simulate("filter-after-sync", 1), tmp_path / "b")
    st = perfetto.export(tmp_path / "b", tmp_path / "t.pftrace")
    got = decode(tmp_path / "t.pftrace")
    tracks = set(got["tracks"].values())
    assert {"guest (virtio-balloon driver)", "guest hint batches", "hintscope findings"} <= tracks
    d = model.load(read_bundle(tmp_path / "b"))
    timed = d.timeline.lane("findings")
    assert len(d.findings) > 0 and len(timed) == len(d.findings)
    assert C({k: got["instants"][k] for k in set(d.findings["kind"])}) == C(d.findings["kind"])
    # Guest hint batches: one slice or instant per hinting run the guest reported.
    runs = read_bundle(tmp_path / "b").table("guest_hints")["run"].nunique()
    batches = sum(1 for _, name, *_ in got["slices"] if " blocks id " in name) + \
        sum(v for k, v in got["instants"].items() if " blocks id " in k)
    assert batches == runs
    assert st.flows >= 1
