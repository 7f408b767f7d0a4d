"""What the report shows, loaded from a bundle through the analysis API.

The analysis package (``hintscope.analysis``) owns every number; this module calls it once per
bundle (one Context, one detector run) and keeps what it says it could not do as notes: checks
that failed, problems in the bundle, a clock band it could not fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from hintscope.analysis import clock_align as ca
from hintscope.analysis import detector, summary
from hintscope.analysis.context import Context
from hintscope.bundle import Bundle
from hintscope.report import timeline as tl


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
    """The detector's findings frame (``findings.FINDING_COLUMNS``)."""
    return detector.run(b).frame


def load_summary(b: Bundle, notes: list[str] | None = None) -> dict[str, Any]:
    """The analysis summary dict (``analysis.summary.summarize``) on one Context."""
    return summary.analyze(b)["summary"]


def _clock(c: Any, notes: list[str], detector_clock: dict | None = None) -> tuple[dict[str, Any], Callable | None]:
    """Guest->host offset band and the mapping the timeline uses (the band's middle).

    The detector's band when it reports one (so the timeline places guest events where the
    findings do), else ``analysis.clock_align.estimate``.
    """
    b = c.bundle
    ge, gh = b.table("guest_events"), b.table("guest_hints")
    if ge.empty and gh.empty:
        return {}, None

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
    except (ValueError, np.linalg.LinAlgError) as e:   # guest stamps are hostile: a degenerate fit is a note
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
    """Everything the report shows, from one analysis of ``b`` (one Context, one detector run)."""
    c = Context(b)
    res = summary.analyze(c)
    f = res["findings"]
    notes: list[str] = [f"check {r.name} failed: {r.error}" for r in f.failed]
    clock, to_host = _clock(c, notes, f.coverage.get("clock"))
    t = tl.build(b, f.frame, guest_to_host=to_host, syncs=res["syncs"], states=c.states)
    d = ReportData(b, res["summary"], f.frame, res["syncs"], t, epochs=res["accounting"]["per_epoch"],
                   clock=clock, accounting=res["accounting"], notes=notes, analysed=True)
    notes.extend(f"analysis: {p}" for p in c.problems if f"analysis: {p}" not in notes)
    notes.extend(t.notes)
    return d


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
