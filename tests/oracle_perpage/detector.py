"""Unsafe orderings of free page hinting against dirty-log syncs, and the writes they lose.

``run(ctx)`` runs every registered check (``analysis/checks``) whose evidence the capture holds
and returns one :class:`~hintscope.analysis.findings.Findings`: the finding rows, what each check
did, the coverage and the verdict.  Definitions are those of docs/detector.md (protocol notes §4:
a, b, c, c', d1-d6).

The verdict is derived from the checks' declarations, not from which tables happen to be there:

* a safety finding at level ``confirmed`` or ``hazard`` on complete, consistent data -> "unsafe
  ordering found";
* otherwise "no unsafe ordering found" only when every check that decides the ordering question
  ran (or is not needed in this dirty-log mode, or no hint was applied at all);
* anything else -> "inconclusive: <reasons>", naming what is missing, damaged or contradictory.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from oracle_perpage import checks
from oracle_perpage.checks import Run
from hintscope.analysis.context import Context
from oracle_perpage.facts import CLOCK_MAX_NS, Facts, load_facts, match_hints  # noqa: F401 (API)
from hintscope.analysis.findings import (FAIL_ON, FINDING_COLUMNS, HARD, INCONCLUSIVE, LOST_KINDS,  # noqa: F401
                                         SAFE, SEVERITY, UNSAFE, CheckRun, Findings, finding)
from hintscope.analysis.qemu_states import FINAL_STATES


def run(target: Context | Any) -> Findings:
    """All checks on one bundle (a Context, or a bundle for which one is built here)."""
    ctx = target if isinstance(target, Context) else Context(target)
    f = load_facts(ctx)
    f.ctx = ctx
    st = Run(m=match_hints(f))
    runs: list[CheckRun] = []
    for chk in checks.REGISTRY:
        cr = CheckRun(chk.name, chk.kinds, chk.requires, chk.decides_ordering, "ran")
        if chk.needs_mode and f.mode not in chk.needs_mode and f.mode != "unknown":
            cr.status = "not needed"
            cr.missing = [f"applies only under {'/'.join(chk.needs_mode)} dirty logging (this run: {f.mode})"]
            runs.append(cr)
            continue
        lacking = [f.available[r] for r in chk.requires if f.available.get(r)]
        if lacking:
            cr.status, cr.missing = "not run", lacking
            runs.append(cr)
            continue
        n0 = len(st.out)
        try:
            chk.fn(f, st)
        except Exception as e:  # noqa: BLE001 - hostile input must not hide the other checks' results
            del st.out[n0:]
            cr.status = "failed"
            cr.error = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        cr.findings = len(st.out) - n0
        runs.append(cr)
    frame = pd.DataFrame(st.out, columns=FINDING_COLUMNS)
    cov = coverage(ctx, f, runs)
    verdict, basis = _verdict(cov, frame, runs)
    out = Findings(frame=frame, verdict=verdict, basis=basis, coverage=cov, checks=runs)
    if st.exposure is not None:
        out.exposure = st.exposure
    return out


def coverage(ctx: Context, f: Facts, runs: list[CheckRun]) -> dict[str, Any]:
    bundle = ctx.bundle
    meta = getattr(bundle, "meta", {}) or {}
    raw_lost = meta.get("lost") if isinstance(meta.get("lost"), dict) else {}
    lost = {}
    for k, v in raw_lost.items():
        n = v if isinstance(v, int) and not isinstance(v, bool) else None
        if n is None or n > 0:
            lost[str(k)] = n if n is not None else f"unreadable count {str(v)[:40]!r}"
    srcs = meta.get("sources") if isinstance(meta.get("sources"), dict) else {}
    # "partial" is a source that saw part of the run; an "unavailable" one saw nothing, and the checks
    # that need it say so through their evidence instead (TCG has no KVM dirty log to trace at all)
    partial = {k: v.get("status") for k, v in srcs.items() if isinstance(v, dict)
               and v.get("status") not in ("captured", "unavailable")
               and not (k == "qemu_trace" and ctx.memslot_source != "qemu_trace" and len(f.syncs)
                        and "sync_fetch_begin" in set(f.qe["event"]))}
    # A probe stopped mid-migration (signal, crash, disk full) still closes its bundle cleanly;
    # what tells the capture is partial is that it never saw the migration end.
    ended = bool(f.states["state"].isin(FINAL_STATES).any()) if len(f.states) else False
    missing = sorted({m for r in runs if r.status == "not run" and r.decides_ordering for m in r.missing})
    return {"mode": f.mode, "migration_end_seen": ended, "missing": missing, "lost_events": lost,
            "sources_not_captured": partial, "complete": bool(getattr(bundle, "complete", True)),
            "damaged": {k: v[:3] for k, v in ctx.damaged.items()}, "input_errors": list(ctx.input_errors),
            "problems": list(f.problems)[:20], "clock": f.band.summary(), "send_source": f.send_source,
            "syncs": int(len(f.syncs)), "applies": int(len(f.applies)), "guest_hints": int(len(f.hints)),
            "host_pops": int(len(f.pops)), "no_hint_applied": f.no_hint_applied, "state_names": f.state_names,
            "evidence": {k: v for k, v in f.available.items()}}


def _partial(cov: dict[str, Any]) -> list[str]:
    why = []
    if cov["damaged"]:
        why.append("damaged bundle parts (" + "; ".join(f"{k}: {v[0]}" for k, v in cov["damaged"].items()) + ")")
    if cov["lost_events"]:
        why.append("lost events (" + ", ".join(f"{k} {v}" for k, v in cov["lost_events"].items()) + ")")
    if cov["sources_not_captured"]:
        why.append("sources not fully captured (" + ", ".join(f"{k} {v}" for k, v in
                                                             cov["sources_not_captured"].items()) + ")")
    if not cov["complete"]:
        why.append("capture did not finish")
    if not cov.get("migration_end_seen", True):
        why.append("the capture does not show the migration ending (no completed, failed or cancelled state)")
    return why


def _verdict(cov: dict[str, Any], frame: pd.DataFrame, runs: list[CheckRun]) -> tuple[str, str]:
    hard = frame[(frame["severity"] == "safety") & frame["confidence"].isin(HARD)] if len(frame) else frame
    why = [f"check {r.name} failed: {r.error}" for r in runs if r.status == "failed"]
    if cov["input_errors"]:
        why.append("input contradicts itself (" + "; ".join(cov["input_errors"][:3]) + ")")
    partial = _partial(cov)
    if len(hard) and not why and not partial:
        return UNSAFE, f"{len(hard)} safety finding(s) confirmed or hazard"
    why += partial
    if cov["missing"] and not cov["no_hint_applied"]:
        why.append("missing " + "; ".join(cov["missing"]))
    if not cov["syncs"] and not cov["no_hint_applied"]:
        why.append("no bitmap sync seen")
    if len(frame):
        amb = frame[(frame["severity"] == "safety") & (frame["confidence"] == "ambiguous")]
        if len(amb):
            why.append(f"{len(amb)} ordering(s) the clock band cannot settle")
    if len(hard):
        why.append(f"{len(hard)} safety finding(s) on this data, listed below")
    if why:
        v = f"{INCONCLUSIVE}: " + "; ".join(why)
        return v, v
    ran = [r.name for r in runs if r.decides_ordering and r.status == "ran"]
    basis = cov["no_hint_applied"] or ("every ordering check ran on the evidence it needs: " + ", ".join(ran))
    mig = frame[(frame["severity"] == "migration") & frame["confidence"].isin(HARD)] if len(frame) else frame
    if len(mig):
        # the hint ordering is safe, yet the migration lost data: say so where the verdict is read
        basis += (f"; but {int(mig['gfn_count'].sum())} page(s) were lost with no hint involved "
                  f"({', '.join(sorted(set(mig['kind'])))}), which --fail-on lost-write/hazard fail on")
    return SAFE, basis


# ---------------------------------------------------------------------------------- frame API
# Shorthands for callers that want only the frame or only the verdict; run() is the contract.
def detect(bundle) -> pd.DataFrame:
    """The findings frame of ``run(bundle)``."""
    return run(bundle).frame


def verdict(bundle, findings: pd.DataFrame | None = None) -> str:
    """The verdict of ``run(bundle)`` (``findings`` is accepted for old call sites and ignored)."""
    return run(bundle).verdict


def exit_code(findings: pd.DataFrame, verdict_text: str, fail_on: str | None) -> int:
    """``Findings.exit_code`` for a frame and a verdict computed earlier."""
    res = Findings(frame=findings, verdict=verdict_text, basis="", coverage={}, checks=[])
    return 0 if fail_on is None else res.exit_code(fail_on)


_finding = finding
