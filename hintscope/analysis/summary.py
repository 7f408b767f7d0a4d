"""Everything ``hintscope analyze`` reports about one bundle, as plain data.

:func:`analyze` returns the per-sync table, the skipped-page accounting, the summary dict,
cross-checks against QEMU's own counters and the detector's findings; :func:`summarize` is the
summary dict alone (what the report shows).  The detector is imported lazily: when it is not
installed the summary says "detector not available" and gives no verdict (never "safe").
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from hintscope.analysis import hints as hints_mod
from hintscope.analysis import detector
from hintscope.analysis.context import Context
from hintscope.analysis.findings import Findings
from hintscope.analysis.syncs import sync_table
from hintscope.bundle import Bundle
from hintscope.errors import HintscopeError

def migration(c: Context) -> dict[str, Any]:
    """Outcome, time and bytes from the last QMP snapshot (QEMU's counters), else from state events."""
    out: dict[str, Any] = {"outcome": c.outcome}
    q = c.qmp
    if len(q):
        last = q.iloc[-1]
        for k in ("total_time", "transferred", "normal", "duplicate", "dirty_sync_count", "remaining"):
            if k in q and int(last[k]) >= 0:
                out[k if k != "total_time" else "total_time_ms"] = int(last[k])
        try:
            raw = json.loads(str(last["raw"]))
        except (ValueError, TypeError, RecursionError):
            raw = {}
        raw = raw if isinstance(raw, dict) else {}
        for k in ("downtime", "setup-time", "expected-downtime"):
            if isinstance(raw.get(k), int):
                out[k.replace("-", "_") + "_ms"] = raw[k]
        ram = raw.get("ram") if isinstance(raw.get("ram"), dict) else {}
        for k in ("normal-bytes", "skipped", "page-size", "total"):
            if isinstance(ram.get(k), int):
                out["ram_" + k.replace("-", "_")] = ram[k]
        out["source"] = "qmp"
    else:
        st = c.states
        t0 = st.loc[st["state"] == "setup", "ts_ns"]
        t1 = st.loc[st["state"].isin(["completed", "failed", "cancelled"]), "ts_ns"]
        if len(t0) and len(t1) and t0.iloc[0] >= 0:
            out["total_time_ms"] = int((int(t1.iloc[-1]) - int(t0.iloc[0])) // 1_000_000)
        out["source"] = "state events" if len(st) else "none"
    return out


def completeness(c: Context) -> dict[str, Any]:
    b = c.bundle
    present = {t: b.has(t) for t in ("ioctls", "memslots", "bitmap_words", "ring_push", "qemu_events",
                                     "qemu_trace", "qmp", "guest_hints", "guest_events")}
    present["qemu_trace_log"] = bool(len(c.trace)) and not b.has("qemu_trace")
    sources = b.meta.get("sources") if isinstance(b.meta.get("sources"), dict) else {}
    lost = b.meta.get("lost") if isinstance(b.meta.get("lost"), dict) else {}
    return {
        "complete": b.complete,
        "status": b.meta.get("status"),
        "end_reason": b.meta.get("end_reason"),
        "sources": {k: (v.get("status") if isinstance(v, dict) else str(v)) for k, v in sources.items()},
        "source_reasons": {k: v.get("reason") for k, v in sources.items() if isinstance(v, dict) and v.get("reason")},
        "lost_events": {k: v for k, v in lost.items()},
        "tables": present,
        "memslot_source": c.memslot_source,
        "send_source": c.send_source,
        "migration_state_names": c.state_names.basis,
        "problems": list(dict.fromkeys(c.problems)),
    }


def counter_checks(c: Context, s: pd.DataFrame) -> list[dict[str, Any]]:
    """The capture's counts beside QEMU's own (QMP, trace): what was compared, both numbers, agreement."""
    out: list[dict[str, Any]] = []
    q = c.qmp
    last = q.iloc[-1] if len(q) else None

    def add(what: str, ours: int, theirs: int | None, why: str = "") -> None:
        if theirs is None or theirs < 0:
            return
        out.append({"check": what, "capture": int(ours), "qemu": int(theirs), "agree": int(ours) == int(theirs),
                    "explain": "" if int(ours) == int(theirs) else why})

    if last is not None and "dirty_sync_count" in q:
        add(f"syncs ({s['source'].iloc[0] if len(s) else 'none'}) vs QMP dirty-sync-count", len(s),
            int(last["dirty_sync_count"]), "the capture started after the first sync or missed some")
    tr = c.trace
    if len(tr):
        n_tr = int((tr["event"] == "migration_bitmap_sync_start").sum())
        if n_tr:
            add("syncs vs QEMU trace migration_bitmap_sync_start", len(s), n_tr, "trace and probe cover different spans")
    if last is not None and "normal" in q:
        qe = c.qe
        n_send = int((qe["event"] == "page_send").sum())
        if n_send and "duplicate" in q:
            add("page_send uprobe hits vs QMP normal + duplicate pages", n_send,
                int(last["normal"]) + int(last["duplicate"]) if int(last["normal"]) >= 0 else None,
                "multifd/compression/xbzrle pages bypass buffer_is_zero, or the probe attached late")
        if len(tr) and (tr["event"] == "ram_save_page").any():
            add("QEMU trace ram_save_page vs QMP normal pages", int((tr["event"] == "ram_save_page").sum()),
                int(last["normal"]), "the trace log was cut short or ram_save_page was not enabled from the start")
    return out


def cross_checks(c: Context, s: pd.DataFrame) -> list[str]:
    """Mismatches between the capture and QEMU's own counters, each with the known reason."""
    out = [f"{k['check']}: {k['capture']} vs {k['qemu']} ({k['explain']})" for k in counter_checks(c, s)
           if not k["agree"]]
    for r in s.itertuples(index=False):
        if r.note:
            out.append(f"sync {r.sync}: {r.note}")
    return out


MEMCHECK_KEYS = ("pages_compared", "pages_differing", "lost_writes", "hinted_held", "dst_zero", "kvmclock_pages")


def memcheck(meta: dict[str, Any]) -> dict[str, int] | None:
    """The destination memory check's counts (lab meta), integers only: meta is untrusted."""
    mc = meta.get("memcheck")
    if not isinstance(mc, dict):
        return None
    return {k: int(mc[k]) for k in MEMCHECK_KEYS
            if isinstance(mc.get(k), int) and not isinstance(mc.get(k), bool) and 0 <= mc[k] < 1 << 62}


def summarize(b: Bundle | Context, syncs: pd.DataFrame | None = None, acct: dict | None = None,
              fnd: Findings | None = None) -> dict[str, Any]:
    """The summary dict (JSON-able)."""
    c = b if isinstance(b, Context) else Context(b)
    s = sync_table(c) if syncs is None else syncs
    a = hints_mod.accounting(c, s) if acct is None else acct
    f = detector.run(c) if fnd is None else fnd
    return {
        "bundle": str(c.bundle.path),
        "migration": migration(c),
        "syncs": int(len(s)),
        "sync_source": str(s["source"].iloc[0]) if len(s) else "none",
        "dirty_mode": c.dirty_mode,
        "epochs": int((s["epoch"] > 0).sum()) if len(s) else 0,
        "harvested_pages": int(s.loc[s["harvested"] > 0, "harvested"].sum()) if len(s) else 0,
        "hints": {**a["totals"], "send_source": a["source"]},
        "data": completeness(c),
        "memcheck": memcheck(c.bundle.meta),
        "findings": {"verdict": f.verdict, "by_kind": f.by_kind,
                     **({"basis": f.basis} if f.basis != f.verdict else {})},
    }


def analyze(b: Bundle | Context) -> dict[str, Any]:
    """Everything for one bundle, on one Context: frames are DataFrames here, ``findings`` is the
    detector's :class:`Findings`; :func:`to_json` makes the document (docs/findings.schema.json)."""
    c = b if isinstance(b, Context) else Context(b)
    s = sync_table(c)
    a = hints_mod.accounting(c, s)
    f = detector.run(c)
    summ = summarize(c, s, a, f)
    # problems found while reading tables after the summary was made (damaged parts) belong in it too
    summ["data"]["problems"] = list(c.problems)[:50]
    return {"summary": summ, "syncs": s, "accounting": a, "counter_checks": counter_checks(c, s),
            "cross_checks": cross_checks(c, s), "findings": f}


def compare(this: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """A/B against a baseline bundle (typically the same run with hinting off)."""
    m, mb = this["summary"]["migration"], base["summary"]["migration"]
    rows = {}
    for k in ("transferred", "normal", "duplicate", "total_time_ms", "downtime_ms", "dirty_sync_count"):
        x, y = m.get(k), mb.get(k)
        rows[k] = {"this": x, "baseline": y, "diff": (x - y) if isinstance(x, int) and isinstance(y, int) else None}
    skipped = this["summary"]["hints"]["skipped_pages"]
    n_diff = rows["normal"]["diff"]
    g = this["accounting"].get("guest")
    return {"metrics": rows, "skipped_pages_estimate": skipped,
            "guest_hinted_pages": g["pages"] if g else None,
            "qmp_normal_pages_saved": -n_diff if n_diff is not None else None,
            "note": "QMP normal-page difference includes run-to-run variation of the workload; the skipped estimate "
                    "counts hinted pages never sent after their apply"}


def _jsonable(o: Any) -> Any:
    if isinstance(o, pd.DataFrame):
        return json.loads(o.to_json(orient="records"))
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items() if not str(k).startswith("_")}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, Findings):
        return o.to_json()
    return o


def to_json(result: dict[str, Any]) -> dict[str, Any]:
    """One flat document: the detector's keys (verdict, verdict_basis, coverage, checks, by_kind,
    findings, exposure) at the top, beside summary, syncs, accounting and the cross-checks."""
    rest = {k: v for k, v in result.items() if k != "findings"}
    f = result["findings"]
    return {**f.to_json(), **_jsonable(rest)}
