"""``hintscope export perfetto``: a bundle as a Perfetto TrackEvent trace (open in ui.perfetto.dev).

Each timeline lane (``report.timeline``) becomes a track under a "host" or "guest" parent;
KVM ioctls get one track per VMM thread; slices that overlap within a lane are spread over
numbered sub-tracks so that every track nests properly.  Findings are instants on their own
track; their timed evidence steps are instants on an "evidence steps" track, joined step by
step to the finding by a chain of flow arrows.  Timestamps are the bundle's
host CLOCK_MONOTONIC ns, written as the trace's default clock.
"""

from __future__ import annotations

import argparse
import itertools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hintscope.bundle import read_bundle
from hintscope.errors import HintscopeError
from hintscope.report import timeline as tl

SEQ_ID = 0x6873  # one writer sequence for the whole trace ("hs")
_GROUP_NAMES = {"host": "host (QEMU + KVM)", "guest": "guest (virtio-balloon driver)", "finding": "hintscope findings"}


@dataclass
class ExportStats:
    """What was written, for the CLI summary and for round-trip tests."""
    slices: Counter = field(default_factory=Counter)       # slice name -> count
    instants: Counter = field(default_factory=Counter)     # instant name -> count
    tracks: list[str] = field(default_factory=list)        # track names in creation order
    counters: dict[str, int] = field(default_factory=dict) # counter track -> samples
    flows: int = 0
    bytes: int = 0


def _annotate(ev, args: dict[str, Any]) -> None:
    for k, v in args.items():
        if str(k).startswith("_") or v is None or (isinstance(v, float) and np.isnan(v)):
            continue
        a = ev.debug_annotations.add()
        a.name = str(k)
        if isinstance(v, (bool, np.bool_)):
            a.bool_value = bool(v)
        elif isinstance(v, (int, np.integer)):
            v = int(v)
            if -(1 << 63) <= v < (1 << 63):
                a.int_value = v
            else:
                a.uint_value = v
        elif isinstance(v, (float, np.floating)):
            a.double_value = float(v)
        else:
            a.string_value = str(v)[:4096]


def _pack(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Sub-track index for each slice so that no two slices on a sub-track overlap."""
    order = np.argsort(starts, kind="stable")
    free_at: list[int] = []
    out = np.zeros(len(starts), dtype=np.int64)
    for i in order:
        for j, t in enumerate(free_at):
            if t <= starts[i]:
                out[i] = j
                free_at[j] = ends[i]
                break
        else:
            out[i] = len(free_at)
            free_at.append(ends[i])
    return out


class _Writer:
    def __init__(self):
        from perfetto.trace_builder.proto_builder import TraceProtoBuilder
        from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import TrackEvent

        self.TE = TrackEvent
        self.builder = TraceProtoBuilder()
        self._uuid = itertools.count(0x1000)
        self._events: list[tuple[int, int, Any]] = []   # (ts, seq, fill function)
        self._seq = itertools.count()
        self.stats = ExportStats()
        self._flow = itertools.count(1)

    def track(self, name: str, parent: int | None = None, counter: bool = False, rank: int | None = None) -> int:
        uuid = next(self._uuid)
        p = self.builder.add_packet()
        p.trusted_packet_sequence_id = SEQ_ID
        d = p.track_descriptor
        d.uuid = uuid
        d.name = name
        if parent is not None:
            d.parent_uuid = parent
        if counter:
            d.counter.SetInParent()
        if rank is not None:
            d.sibling_order_rank = rank
        self.stats.tracks.append(name)
        return uuid

    def _add(self, ts: int, fill) -> None:
        self._events.append((int(ts), next(self._seq), fill))

    def _named(self, kind, track: int, name: str, args: dict, flow_out: list[int] | None,
               flow_in: list[int] | None):
        """A filler for a named event (slice begin or instant) with its args and flow links."""
        def fill(ev):
            ev.type = kind
            ev.track_uuid = track
            ev.name = name
            _annotate(ev, args)
            if flow_out:
                ev.flow_ids.extend(flow_out)
            if flow_in:
                ev.terminating_flow_ids.extend(flow_in)
        return fill

    def slice(self, track: int, name: str, start: int, end: int, args: dict, flow_out: list[int] | None = None,
              flow_in: list[int] | None = None) -> None:
        def end_(ev):
            ev.type = self.TE.TYPE_SLICE_END
            ev.track_uuid = track
        self._add(start, self._named(self.TE.TYPE_SLICE_BEGIN, track, name, args, flow_out, flow_in))
        self._add(end, end_)
        self.stats.slices[name] += 1

    def instant(self, track: int, name: str, ts: int, args: dict, flow_in: list[int] | None = None,
                flow_out: list[int] | None = None) -> None:
        fill = self._named(self.TE.TYPE_INSTANT, track, name, args, flow_out, flow_in)
        self._add(ts, fill)
        self.stats.instants[name] += 1

    def counter(self, track: int, ts: int, value: float) -> None:
        def fill(ev):
            ev.type = self.TE.TYPE_COUNTER
            ev.track_uuid = track
            ev.double_counter_value = float(value)
        self._add(ts, fill)

    def new_flow(self) -> int:
        self.stats.flows += 1
        return next(self._flow)

    def serialize(self) -> bytes:
        # Stable sort on time keeps each track's begin/end order (packed tracks never overlap).
        for ts, _, fill in sorted(self._events, key=lambda e: (e[0], e[1])):
            p = self.builder.add_packet()
            p.timestamp = ts
            p.trusted_packet_sequence_id = SEQ_ID
            fill(p.track_event)
        data = self.builder.serialize()
        self.stats.bytes = len(data)
        return data


def export(bundle_path: str | Path, out: str | Path, findings: pd.DataFrame | None = None) -> ExportStats:
    """The report's timeline (analysis syncs, guest lanes on the host clock, findings) as a trace.

    ``findings`` replaces the detector's findings (tests, or findings computed elsewhere).
    """
    from hintscope.report import model

    b = read_bundle(bundle_path)
    d = model.load(b)
    t = d.timeline
    if findings is not None:
        ev = t.events[t.events["lane"] != "findings"]
        t.events = pd.concat([ev, tl.findings_lane(findings)], ignore_index=True)
    return write_timeline(t, out)


def _evidence_track(groups: dict[str, int], tw: _Writer) -> int:
    """The "evidence" track under the findings group (created on first use)."""
    if "evidence" not in groups:
        groups["evidence"] = tw.track("evidence steps", groups["finding"])
    return groups["evidence"]


def _finding(tw: _Writer, track: int, evidence_track: int, name: str, ts: int, args: dict) -> None:
    """A finding instant, its timed evidence steps as instants, and a flow chain step 1 -> ... -> finding."""
    steps = [(t, side, text) for t, side, text in args.get("_steps", []) if t >= 0]
    prev: list[int] = []
    for i, (t, side, text) in enumerate(steps):
        f = [tw.new_flow()]
        tw.instant(evidence_track, f"{args.get('id', '')} {side}: {text}"[:160], t,
                   {"finding": args.get("id", ""), "step": i + 1}, flow_in=prev, flow_out=f)
        prev = f
    tw.instant(track, name, ts, args, flow_in=prev)


def _thread_roles(t: tl.Timeline) -> dict[int, str]:
    """Name VMM threads by what they do here: the GET issuer is the migration thread, the
    thread running qemu_guest_free_page_hint the balloon's iothread."""
    roles: dict[int, str] = {}
    for lane, role in (("get", "migration thread"), ("applies", "balloon iothread")):
        for a in t.lane(lane)["args"]:
            if isinstance(a.get("tid"), (int, np.integer)):
                roles.setdefault(int(a["tid"]), role)
    return roles


def write_timeline(t: tl.Timeline, out: str | Path) -> ExportStats:
    tw = _Writer()
    groups: dict[str, int] = {}
    roles = _thread_roles(t)
    for rank, (lane, group, label) in enumerate(tl.LANES):
        ev = t.lane(lane)
        if ev.empty:
            continue
        if group not in groups:
            groups[group] = tw.track(_GROUP_NAMES[group], rank=len(groups))
        # ioctls: one sub-track per VMM thread, like the call stacks they come from.
        keys = ev["args"].map(lambda a: a.get("tid", -1)) if lane in ("get", "clear") else pd.Series(-1, index=ev.index)
        plan = []   # (track name, rows, rows are instants)
        for (tid, depth), sub in ev.groupby([keys, ev["depth"]], sort=True):
            base = label if depth == 0 else str(sub["name"].iloc[0])
            if tid != -1:
                base = f"{label}: tid {int(tid)}" + (f" ({roles[int(tid)]})" if int(tid) in roles else "")
            inst = sub[sub["end_ns"] == sub["start_ns"]]
            sl = sub[sub["end_ns"] > sub["start_ns"]]
            if not sl.empty:
                packed = _pack(sl["start_ns"].to_numpy(), sl["end_ns"].to_numpy())
                for j in range(int(packed.max()) + 1):
                    plan.append((base if j == 0 else f"{base} #{j + 1}", sl[packed == j], False))
            if not inst.empty:
                plan.append((base if sl.empty else f"{base} (instants)", inst, True))
        # A lane that needs one track is that track; otherwise its tracks hang under it.
        if len(plan) == 1:
            uuids = [tw.track(label, groups[group], rank=rank)]
        else:
            parent = tw.track(label, groups[group], rank=rank)
            uuids = [tw.track(name, parent) for name, _, _ in plan]
        for u, (_, rows, is_instant) in zip(uuids, plan):
            for idx, r in rows.iterrows():
                name, start, end, args = str(r["name"]), int(r["start_ns"]), int(r["end_ns"]), r["args"]
                if not is_instant:
                    tw.slice(u, name, start, end, args)
                elif lane == "findings":
                    _finding(tw, u, _evidence_track(groups, tw), name, start, args)
                else:
                    tw.instant(u, name, start, args)
    if t.counters:
        cparent = groups.get("host") or tw.track(_GROUP_NAMES["host"])
        for name, c in t.counters.items():
            u = tw.track(name, cparent, counter=True)
            for ts, v in zip(c["ts_ns"].to_numpy(), c["value"].to_numpy()):
                tw.counter(u, int(ts), float(v))
            tw.stats.counters[name] = len(c)
    data = tw.serialize()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    return tw.stats


def _run(args: argparse.Namespace) -> int:
    if args.format != "perfetto":
        raise HintscopeError(f"unknown export format {args.format}")
    out = Path(args.output)
    if out.is_dir():
        raise HintscopeError(f"{out}: is a directory; give a file name such as trace.pftrace")
    st = export(args.bundle, out)
    print(f"wrote {out} ({st.bytes} bytes): {sum(st.slices.values())} slices, {sum(st.instants.values())} instants, "
          f"{len(st.tracks)} tracks, {st.flows} flows; open it at https://ui.perfetto.dev")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a bundle to another tool's format",
                       description="Export a bundle to another tool's format.")
    fmt = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    pp = fmt.add_parser("perfetto", help="Perfetto TrackEvent trace (ui.perfetto.dev)",
                        description="Write the run's timeline as a Perfetto trace: syncs, epochs, KVM ioctls per "
                                    "thread, hint applies, guest hinting, findings with flows along their evidence.")
    pp.add_argument("bundle", help="run bundle directory")
    pp.add_argument("-o", "--output", required=True, help="output file (e.g. trace.pftrace)")
    pp.set_defaults(func=_run)
