"""What the report shows, loaded from a bundle through the analysis API.

The analysis package (``hintscope.analysis``) owns every number; this module only calls it
and turns failures into notes, so that a report still renders (and says what is missing)
when a bundle lacks a source or an analysis step cannot run on it.  When the analysis
package is not installed at all, a host-only summary computed here stands in and the
report says so.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from hintscope.bundle import Bundle
from hintscope.report import timeline as tl

FINDING_COLUMNS = ["kind", "gfns", "evidence", "confidence", "sentence"]


def _optional(modname: str, attr: str) -> Callable | None:
    """``modname.attr`` or None when that module is not part of this install."""
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name and modname.startswith(e.name):
            return None
        raise
    return getattr(mod, attr, None)


@dataclass
class ReportData:
    bundle: Bundle
    summary: dict[str, Any]
    findings: pd.DataFrame
    syncs: pd.DataFrame
    timeline: tl.Timeline
    epochs: pd.DataFrame = field(default_factory=pd.DataFrame)   # per-epoch accounting (analysis)
    clock: dict[str, Any] = field(default_factory=dict)           # guest->host offset band summary
    accounting: dict[str, Any] = field(default_factory=dict)      # analysis.hints.accounting result
    notes: list[str] = field(default_factory=list)
    analysed: bool = False                                         # numbers come from hintscope.analysis


def load_findings(b: Bundle, notes: list[str] | None = None) -> pd.DataFrame:
    notes = notes if notes is not None else []
    detect = _optional("hintscope.analysis.detector", "detect")
    if detect is None:
        notes.append("detector not available in this install: no findings computed")
        return pd.DataFrame(columns=FINDING_COLUMNS)
    try:
        f = detect(b)
    except Exception as e:  # noqa: BLE001 - the report must still render; the note names the failure
        notes.append(f"detector failed on this bundle: {type(e).__name__}: {e}")
        return pd.DataFrame(columns=FINDING_COLUMNS)
    return f


def load_summary(b: Bundle, notes: list[str] | None = None) -> dict[str, Any]:
    notes = notes if notes is not None else []
    summarize = _optional("hintscope.analysis.summary", "summarize")
    if summarize is not None:
        try:
            return summarize(b)
        except Exception as e:  # noqa: BLE001
            notes.append(f"analysis summary failed on this bundle: {type(e).__name__}: {e}; host-only numbers shown")
    else:
        notes.append("analysis package not available: host-only numbers computed by the report")
    return host_summary(b)


def _analyse(b: Bundle, notes: list[str]) -> dict[str, Any] | None:
    """The analysis package's sync table, accounting, findings and summary, computed once."""
    if _optional("hintscope.analysis.summary", "summarize") is None:
        notes.append("analysis package not available: host-only numbers computed by the report")
        return None
    from hintscope.analysis import hints as hm
    from hintscope.analysis import summary as sm
    from hintscope.analysis.context import Context
    from hintscope.analysis.syncs import sync_table

    try:
        c = Context(b)
        s = sync_table(c)
        a = hm.accounting(c, s)
    except Exception as e:  # noqa: BLE001 - render what the host tables give, and say why
        notes.append(f"analysis failed on this bundle: {type(e).__name__}: {e}; host-only numbers shown")
        return None
    from hintscope.analysis import detector

    try:
        f = detector.run(c)
    except Exception as e:  # noqa: BLE001 - run() already contains check failures; this names anything else
        notes.append(f"detector failed on this bundle: {type(e).__name__}: {e}")
        return None
    notes.extend(f"check {r.name} failed: {r.error}" for r in f.failed)
    summ = sm.summarize(c, s, a, f)
    return {"context": c, "syncs": s, "accounting": a, "summary": summ, "findings": f.frame,
            "result": f, "detector_clock": f.coverage.get("clock")}


def _clock(c: Any, notes: list[str], detector_clock: dict | None = None) -> tuple[dict[str, Any], Callable | None]:
    """Guest->host offset band and the mapping the timeline uses (the band's middle).

    The detector's band when it reports one (so the timeline places guest events where the
    findings do), else ``analysis.clock_align.estimate``.
    """
    mod = _optional("hintscope.analysis.clock_align", "ClockBand")
    b = c.bundle
    ge, gh = b.table("guest_events"), b.table("guest_hints")
    if mod is None or (ge.empty and gh.empty):
        return {}, None
    from hintscope.analysis import clock_align as ca

    try:
        dc = detector_clock or {}
        if dc.get("delta_lo_ns") is not None and dc.get("delta_hi_ns") is not None:
            band = ca.ClockBand(lo=float(dc["delta_lo_ns"]), hi=float(dc["delta_hi_ns"]),
                                slope=float(dc.get("slope") or 0.0), n_lower=int(dc.get("lower_pairs") or 0),
                                n_upper=int(dc.get("upper_pairs") or 0), notes=list(dc.get("notes") or []))
        else:
            hp = c.hint_pages
            first = hp.groupby("apply")["gfn"].first() if len(hp) else pd.Series(dtype="int64")
            gfn0 = first.reindex(range(len(c.hint_applies))).fillna(-1).to_numpy(np.int64)
            band = ca.estimate(c.qe, ge, c.hint_applies, gh, gfn0)
    except Exception as e:  # noqa: BLE001
        notes.append(f"clock alignment failed: {type(e).__name__}: {e}")
        return {}, None
    info = band.summary()
    if not band.known:
        notes.append("guest->host clock band unknown: " + "; ".join(band.notes))
        return info, None

    def to_host(g: np.ndarray) -> np.ndarray:
        lo, hi = band.to_host(g)
        return ((lo + hi) / 2).astype(np.int64)
    return info, to_host


def load(b: Bundle) -> ReportData:
    notes: list[str] = list(b.problems)
    an = _analyse(b, notes)
    if an is None:
        summary = host_summary(b)
        findings = load_findings(b, notes) if _optional("hintscope.analysis.detector", "detect") else \
            pd.DataFrame(columns=FINDING_COLUMNS)
        syncs = tl.host_syncs(b.table("qemu_events"), b.meta)
        t = tl.build(b, findings)
        d = ReportData(b, summary, findings, syncs, t, notes=notes)
    else:
        c = an["context"]
        clock, to_host = _clock(c, notes, an.get("detector_clock"))
        t = tl.build(b, an["findings"], guest_to_host=to_host, syncs=an["syncs"], states=c.states)
        d = ReportData(b, an["summary"], an["findings"], an["syncs"], t, epochs=an["accounting"]["per_epoch"],
                       clock=clock, accounting=an["accounting"], notes=notes, analysed=True)
        notes.extend(f"analysis: {p}" for p in c.problems if f"analysis: {p}" not in notes)
    notes.extend(t.notes)
    return d


def host_summary(b: Bundle) -> dict[str, Any]:
    """Numbers that need only the host uprobe/ioctl tables, in the analysis summary's layout.

    Used when the analysis package is absent; hinted pages are apply lengths / 4 KiB (no
    memslot mapping, so no skipped/resent accounting).
    """
    qe = b.table("qemu_events")
    io = b.table("ioctls")
    syncs = tl.host_syncs(qe, b.meta)
    st = tl._migration_states(qe, b.meta)
    outcome = str(st["state"].iloc[-1]) if len(st) else "unknown"
    mig: dict[str, Any] = {"outcome": outcome, "source": "state events" if len(st) else "none"}
    t0 = st.loc[st["state"] == "setup", "ts_ns"]
    t1 = st.loc[st["state"].isin(["completed", "failed", "cancelled"]), "ts_ns"]
    if len(t0) and len(t1):
        mig["total_time_ms"] = int((int(t1.iloc[-1]) - int(t0.iloc[0])) // 1_000_000)
    applies = qe[qe["event"] == "hint_apply"]
    get = io[io["name"] == "GET_DIRTY_LOG"]
    length = applies["a1"].astype("int64")
    return {
        "bundle": str(b.path),
        "migration": mig,
        "syncs": int(len(syncs)),
        "sync_source": "notify" if len(syncs) else "none",
        "epochs": int((syncs["epoch"] > 0).sum()),
        "harvested_pages": int(get.loc[get["pages"] > 0, "pages"].sum()),
        "hints": {"applies": int(len(applies)), "applied_bytes": int(length.sum()),
                  "applied_pages": int((length // tl.PAGE).sum())},
    }


def completeness(b: Bundle) -> pd.DataFrame:
    """Per source: status, reason and lost events, from meta (what the capture could see)."""
    src = b.meta.get("sources", {}) or {}
    lost = b.meta.get("lost", {}) or {}
    names = sorted(set(src) | set(lost))
    rows = []
    for n in names:
        s = src.get(n, {}) if isinstance(src.get(n), dict) else {}
        rows.append({"source": n, "status": s.get("status", "?"), "reason": s.get("reason") or "",
                     "lost events": int(lost.get(n, 0)) if str(lost.get(n, 0)).lstrip("-").isdigit() else lost.get(n)})
    return pd.DataFrame(rows, columns=["source", "status", "reason", "lost events"])


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested summary dict -> flat ``a.b`` keys with scalar values (lists shown as text)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple, np.ndarray)):
            out[key] = ", ".join(map(str, v))
        else:
            out[key] = v
    return out
