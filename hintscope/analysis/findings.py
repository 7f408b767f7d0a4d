"""The detector's result contract: findings, per-check coverage, the verdict, exit codes, JSON.

``detector.run(ctx)`` returns one :class:`Findings`; ``hintscope analyze``, the report and the
fleet tools read only this.  Its JSON form is documented by docs/findings.schema.json (a test
validates real output against it).

Levels (docs/detector.md):

* ``hazard``: the captured ordering lets a spec-legal guest write be lost (whether or not this
  guest made one);
* ``confirmed``: a loss is shown (page sends plus guest writes, or the destination memory check);
* ``ambiguous``: the clocks cannot settle the order: the verdict is inconclusive;
* ``note``: an exposure that cannot lose a write under this run's dirty-log mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from hintscope.errors import HintscopeError

FINDING_COLUMNS = ["kind", "confidence", "severity", "gfn_first", "gfn_last", "gfn_count", "gfns", "evidence",
                   "sentence"]
SEVERITY = {
    "stale-epoch-apply": "safety", "lost-write": "safety", "rearm-wipe": "safety", "rearm-in-apply": "safety",
    "stale-id-apply": "safety", "apply-during-sync": "safety", "reuse-before-apply": "safety",
    "apply-when-impossible": "safety", "bad-id-sequence": "safety", "lost-write-not-hint": "migration",
    "bulk-stall": "performance",
}
LOST_KINDS = ("lost-write", "rearm-wipe", "lost-write-not-hint")
HARD = ("confirmed", "hazard")
MAX_GFNS = 1 << 16             # gfns kept per finding (gfn_count has the true number)
MAX_EVIDENCE = 8

UNSAFE = "unsafe ordering found"
SAFE = "no unsafe ordering found"
INCONCLUSIVE = "inconclusive"

FAIL_ON = ("lost-write", "hazard", "any")
# exit codes of `hintscope analyze` (docs/detector.md "Exit status")
EXIT_OK, EXIT_MATCH, EXIT_INPUT, EXIT_INCONCLUSIVE = 0, 1, 2, 3

EXPOSURE_COLUMNS = ["apply", "tid", "apply_ns", "apply_end_ns", "clear_ns", "epoch_id", "window_lo_ns",
                    "window_hi_ns", "hinted_pages", "exposed_pages", "sent_after"]


def finding(kind: str, confidence: str, gfns, evidence: list, sentence: str) -> dict[str, Any]:
    """One finding row: gfns are made distinct and sorted, capped at MAX_GFNS (gfn_count keeps the number).

    ``gfns`` is an array, or a page set with ``summary(cap)`` -> (count, first, last, first cap gfns)
    (pagestate.PageMarks): only the named pages are ever expanded, at most MAX_GFNS of them."""
    if hasattr(gfns, "summary"):
        count, first, last, head = gfns.summary(MAX_GFNS)
    else:
        g = np.asarray(gfns, np.int64)
        g = np.sort(g, kind="stable")
        g = g[np.r_[True, g[1:] != g[:-1]]] if len(g) else g
        count, first, last, head = len(g), (g[0] if len(g) else -1), (g[-1] if len(g) else -1), g[:MAX_GFNS]
    return {"kind": kind, "confidence": confidence, "severity": SEVERITY[kind],
            "gfn_first": int(first), "gfn_last": int(last),
            "gfn_count": int(count), "gfns": np.asarray(head, np.int64).tolist(),
            "evidence": [(int(t) if np.isfinite(t) else -1, s, e) for t, s, e in evidence[:MAX_EVIDENCE]],
            "sentence": sentence}


@dataclass
class CheckRun:
    """What one check did on this bundle: ran, could not run (and what it lacked), or failed."""

    name: str
    kinds: tuple[str, ...]
    requires: tuple[str, ...]
    decides_ordering: bool        # needed for a "no unsafe ordering" verdict
    status: str                   # ran | not run | failed | not needed
    missing: list[str] = field(default_factory=list)
    error: str | None = None
    findings: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kinds": list(self.kinds), "requires": list(self.requires),
                "decides_ordering": self.decides_ordering, "status": self.status, "missing": list(self.missing),
                "error": self.error, "findings": self.findings}


@dataclass
class Findings:
    """Everything the detector says about one bundle."""

    frame: pd.DataFrame                       # FINDING_COLUMNS, one row per finding
    verdict: str
    basis: str
    coverage: dict[str, Any]
    checks: list[CheckRun]
    exposure: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=EXPOSURE_COLUMNS))

    @property
    def by_kind(self) -> dict[str, int]:
        return {str(k): int(n) for k, n in self.frame["kind"].value_counts().items()} if len(self.frame) else {}

    @property
    def failed(self) -> list[CheckRun]:
        return [c for c in self.checks if c.status == "failed"]

    def exit_code(self, fail_on: str | None) -> int:
        """0 clean; 1 a finding matched --fail-on; 3 inconclusive (with --fail-on, or a check failed)."""
        if fail_on is not None and fail_on not in FAIL_ON:
            raise HintscopeError(f"--fail-on {fail_on!r}: choose one of {', '.join(FAIL_ON)}")
        if fail_on is None:
            return EXIT_INCONCLUSIVE if self.failed else EXIT_OK
        f = self.frame
        if len(f):
            if fail_on == "lost-write":
                hit = f["kind"].isin(LOST_KINDS) & (f["confidence"] == "confirmed")
            elif fail_on == "hazard":
                hit = f["severity"].isin(["safety", "migration"]) & f["confidence"].isin(HARD)
            else:
                hit = pd.Series(True, index=f.index)
            if hit.any():
                return EXIT_MATCH
        return EXIT_INCONCLUSIVE if self.verdict.startswith(INCONCLUSIVE) else EXIT_OK

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for r in self.frame.to_dict("records"):
            r = dict(r)
            r["evidence"] = [{"ts_ns": int(t), "source": str(s), "event": str(e)} for t, s, e in r["evidence"]]
            r["gfns"] = [int(g) for g in r["gfns"]]
            for k in ("gfn_first", "gfn_last", "gfn_count"):
                r[k] = int(r[k])
            out.append(r)
        return out

    def to_json(self) -> dict[str, Any]:
        """The flat document of docs/findings.schema.json."""
        return {"verdict": self.verdict, "verdict_basis": self.basis, "coverage": self.coverage,
                "checks": [c.to_json() for c in self.checks], "by_kind": self.by_kind, "findings": self.rows(),
                "exposure": [{k: (int(v) if isinstance(v, (int, np.integer)) else v) for k, v in r.items()}
                             for r in self.exposure.to_dict("records")]}


def empty_frame() -> pd.DataFrame:
    return pd.DataFrame(columns=FINDING_COLUMNS)
