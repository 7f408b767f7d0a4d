"""The report's one picture of a run: lanes of slices and instants on the host clock.

Both the timeline figure (``plots.plot_timeline``) and the Perfetto export draw from the
frame built here, so what a reader sees in the HTML and in ui.perfetto.dev is the same set
of events.  Rows are intervals (``end_ns > start_ns``) or instants (``end_ns == start_ns``).
Guest events are moved onto the host clock with the analysis' offset when it has one;
otherwise the guest lanes are left out and ``Timeline.notes`` says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from hintscope.bundle import Bundle
from hintscope.protocol import CMD_ID_MIN, PAGE, RETURN_REASONS  # noqa: F401 (re-exported)

# migrate_state numbers and precopy_notify lists depend on the traced QEMU: analysis/qemu_states.py
# interprets them from the bundle's meta (the same code the analysis uses).

# (lane, group, label) top to bottom.  Host lanes first: the host clock is the reference.
LANES: list[tuple[str, str, str]] = [
    ("migration", "host", "migration state"),
    ("epochs", "host", "hint epochs (cmd id)"),
    ("syncs", "host", "bitmap syncs / fetch"),
    ("get", "host", "KVM GET_DIRTY_LOG / ring reset"),
    ("clear", "host", "KVM CLEAR_DIRTY_LOG (re-arm)"),
    ("applies", "host", "hint applies (QEMU)"),
    ("guest_cmd", "guest", "guest cmd id / start-stop"),
    ("guest_hints", "guest", "guest hint batches"),
    ("guest_reuse", "guest", "guest returns / reuse"),
    ("findings", "finding", "findings"),
]
LANE_ORDER = {lane: i for i, (lane, _, _) in enumerate(LANES)}

COLUMNS = ["lane", "name", "start_ns", "end_ns", "depth", "args"]


@dataclass
class Timeline:
    events: pd.DataFrame                     # COLUMNS; args holds a dict per row
    counters: dict[str, pd.DataFrame] = field(default_factory=dict)   # name -> ts_ns, value (binned, whole run)
    samples: dict[str, pd.DataFrame] = field(default_factory=dict)    # name -> ts_ns, value (raw, for re-binning)
    t0_ns: int = 0
    notes: list[str] = field(default_factory=list)

    def lane(self, name: str) -> pd.DataFrame:
        return self.events[self.events["lane"] == name]


def _frame(lane: str, name: Any, start: Any, end: Any = None, depth: int = 0,
           args: list[dict] | None = None) -> pd.DataFrame:
    start = np.asarray(start, dtype=np.int64)
    end = start if end is None else np.asarray(end, dtype=np.int64)
    n = len(start)
    names = np.broadcast_to(np.asarray(name, dtype=object), (n,)) if n else np.array([], dtype=object)
    return pd.DataFrame({
        "lane": lane, "name": list(names), "start_ns": start, "end_ns": np.maximum(end, start),
        "depth": depth, "args": args if args is not None else [{} for _ in range(n)],
    }, columns=COLUMNS)


def _records(df: pd.DataFrame, cols: list[str]) -> list[dict]:
    cols = [c for c in cols if c in df.columns]
    if not cols:
        return [{} for _ in range(len(df))]
    return df[cols].to_dict("records")


def _pair(begin: pd.DataFrame, end: pd.DataFrame, by: str = "tid") -> pd.DataFrame:
    """Each begin with the first end at or after it on the same thread (``end_ns``)."""
    if begin.empty:
        return begin.assign(end_ns=pd.Series(dtype="int64"))
    b = begin.sort_values("ts_ns")
    if end.empty:
        return b.assign(end_ns=b["ts_ns"])
    e = end[[by, "ts_ns"]].rename(columns={"ts_ns": "end_ns"}).sort_values("end_ns")
    m = pd.merge_asof(b, e, left_on="ts_ns", right_on="end_ns", by=by, direction="forward")
    m["end_ns"] = m["end_ns"].fillna(m["ts_ns"]).astype("int64")
    return m


def _migration_lane(states: pd.DataFrame, end_ns: int) -> pd.DataFrame:
    st = states[states["ts_ns"] >= 0].sort_values("ts_ns")
    if st.empty:
        return _frame("migration", [], [])
    names = st["state"].astype(str).tolist()
    start = st["ts_ns"].to_numpy(np.int64)
    end = np.r_[start[1:], max(end_ns, int(start[-1]))]
    return _frame("migration", names, start, end, args=[{"state": n} for n in names])


def sync_windows(s: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(sync start, sync end, fetch start, fetch end) for a sync table; fetch -1 when unknown.

    The sync spans BEFORE -> AFTER when the notifier was probed, else the best window known
    (fetch uprobes, QEMU trace), the same fallbacks as the analysis uses.
    """
    fs, fe = s["fetch_start_ns"].to_numpy(np.int64), s["fetch_end_ns"].to_numpy(np.int64)
    b, a = s["before_ns"].to_numpy(np.int64), s["after_ns"].to_numpy(np.int64)
    ts = s["trace_start_ns"].to_numpy(np.int64) if "trace_start_ns" in s else np.full(len(s), -1, np.int64)
    te = s["trace_end_ns"].to_numpy(np.int64) if "trace_end_ns" in s else np.full(len(s), -1, np.int64)
    start = np.where(b >= 0, b, np.where(fs >= 0, fs, ts))
    end = np.where(a >= 0, a, np.where(fe >= 0, fe, np.where(te >= 0, te, start)))
    return start, np.maximum(end, start), fs, np.where(fs >= 0, np.maximum(fe, fs), -1)


def build(b: Bundle, findings: pd.DataFrame | None = None,
          guest_to_host: Callable[[np.ndarray], np.ndarray] | None = None,
          syncs: pd.DataFrame | None = None, states: pd.DataFrame | None = None) -> Timeline:
    """The run's lanes.  ``syncs``/``states``: the analysis' sync table and migration states
    (which also cover QEMU-trace-only bundles); without them, from the uprobe events alone."""
    qe = b.table("qemu_events")
    io = b.table("ioctls")
    if syncs is None or states is None:
        # one sync table for every consumer: the analysis' (syncs.py), on the caller's Context
        from hintscope.analysis.context import Context
        from hintscope.analysis.syncs import sync_table
        ctx = Context(b)
        syncs = sync_table(ctx) if syncs is None else syncs
        states = ctx.states if states is None else states
    # Memslot ioctls happen at VM boot, long before migration: they do not stretch the axis.
    dirty_io = io[io["name"].isin(["GET_DIRTY_LOG", "CLEAR_DIRTY_LOG", "RESET_DIRTY_RINGS"])]
    host_ts = pd.concat([qe["ts_ns"], dirty_io["ts_ns"], states["ts_ns"][states["ts_ns"] >= 0]], ignore_index=True)
    notes: list[str] = []
    if host_ts.empty:
        notes.append("no host events (qemu_events, ioctls) in this bundle")
        t0 = t_end = 0
    else:
        t0, t_end = int(host_ts.min()), int(host_ts.max())
    parts = [_migration_lane(states, t_end)]

    if len(syncs):
        s0, s1, f0, f1 = sync_windows(syncs)
        ok = s0 >= 0
        parts.append(_frame("syncs", [f"sync {int(k)}" for k in syncs["sync"][ok]], s0[ok], s1[ok],
                            args=_records(syncs[ok], ["sync", "source", "harvested", "rearmed", "get_calls"])))
        fo = f0 >= 0
        parts.append(_frame("syncs", "fetch", f0[fo], f1[fo], depth=1,
                            args=[{"sync": int(k)} for k in syncs["sync"][fo]]))
        # Epoch k runs from AFTER_k (else the end of sync k) to the start of sync k+1; host id MIN + k.
        ep = syncs["epoch"].to_numpy(np.int64)
        real = (ep > 0) & ok
        ep_start = s1[real]
        nxt = np.r_[s0[1:], t_end][real]
        k = ep[real]
        ids = CMD_ID_MIN + k
        parts.append(_frame("epochs", [f"epoch {i} id {hex(c)}" for i, c in zip(k, ids)], ep_start,
                            np.maximum(nxt, ep_start),
                            args=[{"epoch": int(i), "cmd_id": hex(int(c))} for i, c in zip(k, ids)]))

    if not io.empty:
        get = io[io["name"].isin(["GET_DIRTY_LOG", "RESET_DIRTY_RINGS"])]
        parts.append(_frame("get", get["name"], get["enter_ns"], get["ts_ns"],
                            args=_records(get, ["tid", "slot", "pages", "ret"])))
        clr = io[io["name"] == "CLEAR_DIRTY_LOG"]
        parts.append(_frame("clear", "CLEAR_DIRTY_LOG", clr["enter_ns"], clr["ts_ns"],
                            args=_records(clr, ["tid", "slot", "first_page", "num_pages", "pages", "ret"])))

    ap = _pair(qe[qe["event"] == "hint_apply"], qe[qe["event"] == "hint_apply_ret"])
    if not ap.empty:
        pages = (ap["a1"].to_numpy() // PAGE).astype(np.int64)
        args = [{"hva": hex(int(h)), "bytes": int(n), "pages": int(p), "tid": int(t)}
                for h, n, p, t in zip(ap["a0"], ap["a1"], pages, ap["tid"])]
        parts.append(_frame("applies", "apply", ap["ts_ns"], ap["end_ns"], args=args))

    counters, samples = {}, {}
    sends = qe[qe["event"] == "page_send"]
    if not sends.empty:
        w = np.maximum((sends["a1"].to_numpy().astype(np.int64) // PAGE), 1)
        samples["pages sent"] = pd.DataFrame({"ts_ns": sends["ts_ns"].to_numpy(np.int64), "value": w})
        counters["pages sent"] = rate(samples["pages sent"])

    parts.extend(_guest_parts(b, guest_to_host, notes))
    if findings is not None and not findings.empty:
        parts.append(findings_lane(findings))
    ev = pd.concat([p for p in parts if not p.empty], ignore_index=True) if any(not p.empty for p in parts) \
        else pd.DataFrame(columns=COLUMNS)
    if len(ev):
        t0 = int(ev["start_ns"].min())   # the axis starts at the first event drawn
    ev["order"] = ev["lane"].map(LANE_ORDER)
    ev = ev.sort_values(["order", "start_ns", "depth"], kind="stable").drop(columns="order").reset_index(drop=True)
    return Timeline(ev, counters, samples, t0, notes)


def rate(samples: pd.DataFrame, buckets: int = 200, window: tuple[int, int] | None = None) -> pd.DataFrame:
    """Sum of ``value`` per time bucket (``buckets`` over the samples' span, or over ``window``)."""
    ts, weight = samples["ts_ns"].to_numpy(np.int64), samples["value"].to_numpy()
    if window is not None:
        keep = (ts >= window[0]) & (ts <= window[1])
        ts, weight = ts[keep], weight[keep]
    if not len(ts):
        return pd.DataFrame({"ts_ns": np.zeros(0, np.int64), "value": np.zeros(0)})
    lo, hi = (int(ts.min()), int(ts.max())) if window is None else window
    edges = np.linspace(lo, max(hi, lo + 1), buckets + 1)
    h, _ = np.histogram(ts, bins=edges, weights=weight)
    return pd.DataFrame({"ts_ns": edges[:-1].astype(np.int64), "value": h})


def _guest_parts(b: Bundle, to_host: Callable[[np.ndarray], np.ndarray] | None, notes: list[str]) -> list[pd.DataFrame]:
    """Guest lanes on the host clock: hinting runs and cmd ids, hint batches, returns and reuse."""
    ge, gh, gr, gu = (b.table(n) for n in ("guest_events", "guest_hints", "guest_returns", "guest_reuse"))
    if ge.empty and gh.empty and gr.empty and gu.empty:
        return []
    if to_host is None:
        notes.append("guest events present but no guest->host clock offset: guest lanes left out of the timeline")
        return []
    h = lambda s: np.asarray(to_host(np.asarray(s, dtype=np.int64)), dtype=np.int64)  # noqa: E731
    parts = []
    if not ge.empty:
        ev = ge["event"].astype(str)
        runs = _pair(ge[ev == "run_enter"].assign(ts_ns=lambda d: d["guest_ns"]),
                     ge[ev == "run_exit"].assign(ts_ns=lambda d: d["guest_ns"]))
        if not runs.empty:
            parts.append(_frame("guest_cmd", "hinting run", h(runs["ts_ns"]), h(runs["end_ns"]),
                                args=_records(runs, ["tid", "cpu", "side"])))
        ids = ge[ev == "cmd_id"]
        if not ids.empty:
            v = ids["a0"].astype("uint64").to_numpy()
            names = np.where(v == 0, "cmd id STOP", np.where(v == 1, "cmd id DONE",
                                                             ["cmd id " + hex(int(i)) for i in v]))
            parts.append(_frame("guest_cmd", names, h(ids["guest_ns"]), args=[{"cmd_id": hex(int(i))} for i in v]))
        ob = ge[ev == "outbuf"]
        if not ob.empty:
            v = ob["a0"].astype("uint64").to_numpy()
            names = ["stop msg" if i == 0 else f"start msg {hex(int(i))}" for i in v]
            parts.append(_frame("guest_cmd", names, h(ob["guest_ns"]), args=[{"value": hex(int(i))} for i in v]))
        ret = _pair(ge[ev == "return_enter"].assign(ts_ns=lambda d: d["guest_ns"]),
                    ge[ev == "return_exit"].assign(ts_ns=lambda d: d["guest_ns"]))
        if not ret.empty:
            reason = ret["a1"].astype("int64").map(RETURN_REASONS).fillna("other")
            parts.append(_frame("guest_reuse", ("return (" + reason + ")").to_numpy(), h(ret["ts_ns"]),
                                h(ret["end_ns"]), args=_records(ret.assign(reason=reason), ["reason", "tid"])))
    if not gh.empty:
        # One slice per hinting run: first to last block queued.
        g = gh.groupby("run", sort=True).agg(start=("guest_ns", "min"), end=("guest_ns", "max"),
                                             blocks=("pfn", "size"), cmd_id=("cmd_id", "max"))
        names = [f"{n} blocks id {hex(int(c))}" for n, c in zip(g["blocks"], g["cmd_id"])]
        args = [{"run": int(r), "blocks": int(n), "cmd_id": hex(int(c))}
                for r, n, c in zip(g.index, g["blocks"], g["cmd_id"])]
        parts.append(_frame("guest_hints", names, h(g["start"]), h(g["end"]), args=args))
    if ge.empty and not gr.empty:
        parts.append(_frame("guest_reuse", ("return (" + gr["reason"].astype(str) + ")").to_numpy(),
                            h(gr["guest_ns"]), args=_records(gr, ["pfn", "order"])))
    if not gu.empty:
        args = [{"pfn": hex(int(p)), "block_pfn": hex(int(bp))} for p, bp in zip(gu["pfn"], gu["block_pfn"])]
        parts.append(_frame("guest_reuse", "reuse", h(gu["guest_ns"]), args=args))
    return parts


def evidence_steps(ev: Any) -> list[tuple[int, str, str]]:
    """A finding's evidence as (host ns, side, text) steps; steps without a time get -1."""
    if not isinstance(ev, (list, tuple, np.ndarray)):
        return [(-1, "", str(ev))] if ev is not None else []
    out = []
    for x in ev:
        if isinstance(x, (list, tuple)) and len(x) >= 3 and isinstance(x[0], (int, np.integer)):
            # A time of 0 or less marks a step that did not happen ("never sent"): untimed.
            out.append((int(x[0]) if int(x[0]) > 0 else -1, str(x[1]), str(x[2])))
        elif isinstance(x, dict):
            t = x.get("ts_ns", x.get("t_ns", -1))
            out.append((int(t) if isinstance(t, (int, np.integer)) else -1, str(x.get("side", "")),
                        str(x.get("text", x))))
        else:
            out.append((-1, "", str(x)))
    return out


def _decisive_ns(steps: list[tuple[int, str, str]]) -> int:
    timed = [(t, side, text) for t, side, text in steps if t >= 0]
    acts = [t for t, side, text in timed if side != "memcheck" and not text.startswith("migration completed")]
    return max(acts or [t for t, _, _ in timed], default=-1)


def findings_lane(findings: pd.DataFrame) -> pd.DataFrame:
    """One instant per finding at its last timed evidence step (when the hazard is complete).

    Steps that only observe the outcome at the end of the migration (the memory check, "migration
    completed ... never sent") are skipped when earlier steps exist, so the mark sits where the
    damage was done, not at the switchover.
    """
    if "ts_ns" in findings.columns:
        ts = findings["ts_ns"].fillna(-1).astype("int64").to_numpy()
    elif "evidence" in findings.columns:
        ts = np.array([_decisive_ns(evidence_steps(e)) for e in findings["evidence"]], dtype=np.int64)
    else:
        return _frame("findings", [], [])
    keep = ts >= 0
    f = findings[keep]
    args = _records(f, ["kind", "confidence", "severity", "sentence", "gfn_count"])
    for a, i in zip(args, np.flatnonzero(keep)):
        a["id"] = f"F{i + 1}"        # the same id as the report's findings table
    if "evidence" in f.columns:
        for a, e in zip(args, f["evidence"]):
            steps = evidence_steps(e)
            a["evidence"] = " -> ".join(f"{side}: {text}" for _, side, text in steps)
            a["_steps"] = steps      # not shown as an argument: the Perfetto export draws them
    return _frame("findings", f["kind"].astype(str).to_numpy(), ts[keep], args=args)
