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
    notes: list[str] = field(default_factory=list)


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
    return f if f is not None else pd.DataFrame(columns=FINDING_COLUMNS)


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


def load_syncs(b: Bundle, notes: list[str] | None = None) -> pd.DataFrame:
    notes = notes if notes is not None else []
    fn = _optional("hintscope.analysis.syncs", "sync_table")
    if fn is not None:
        try:
            return fn(b)
        except Exception as e:  # noqa: BLE001
            notes.append(f"per-sync table failed: {type(e).__name__}: {e}; notifier-only syncs shown")
    return tl.host_syncs(b.table("qemu_events"))


def load(b: Bundle) -> ReportData:
    notes: list[str] = list(b.problems)
    summary = load_summary(b, notes)
    findings = load_findings(b, notes)
    syncs = load_syncs(b, notes)
    t = tl.build(b, findings)
    notes.extend(t.notes)
    return ReportData(b, summary, findings, syncs, t, notes)


def host_summary(b: Bundle) -> dict[str, Any]:
    """Numbers that need only the host tables (used when the analysis package is absent)."""
    qe = b.table("qemu_events")
    io = b.table("ioctls")
    syncs = tl.host_syncs(qe)
    ms = qe[qe["event"] == "migrate_state"].sort_values("ts_ns")
    states = ms["a2"].astype("int64").to_numpy()
    outcome = tl.MIGRATION_STATES[states[-1]] if len(states) and 0 <= states[-1] < len(tl.MIGRATION_STATES) \
        else "unknown"
    t_setup = ms.loc[ms["a2"] == 1, "ts_ns"]
    t_end = ms.loc[ms["a2"].isin([8, 9, 3]), "ts_ns"]
    duration = (int(t_end.iloc[-1]) - int(t_setup.iloc[0])) / 1e9 if len(t_setup) and len(t_end) else None
    applies = qe[qe["event"] == "hint_apply"]
    get = io[io["name"] == "GET_DIRTY_LOG"]
    return {
        "outcome": outcome,
        "duration_s": duration,
        "syncs": int(len(syncs)),
        "epochs": int((syncs["epoch"] > 0).sum()),
        "hint_applies": int(len(applies)),
        "hinted_pages": int((applies["a1"].astype("int64") // tl.PAGE).sum()),
        "dirty_pages_harvested": int(get.loc[get["pages"] > 0, "pages"].sum()),
        "clear_dirty_log_calls": int((io["name"] == "CLEAR_DIRTY_LOG").sum()),
        "pages_sent": int((qe.loc[qe["event"] == "page_send", "a1"].astype("int64") // tl.PAGE).sum()),
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
