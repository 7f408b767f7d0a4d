"""Detector against simulator ground truth: every variant x seeds x dirty-log modes.

Per run: ground-truth lost pages (hint-caused / not), the pages the detector reported as
confirmed or hazard, confirmed lost-write pages the truth does not have, and whether a safe
variant drew a hazard.  ``summarise`` folds runs into one row per (variant, mode).
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from hintscope.analysis import detector
from hintscope.sim import variants as V
from hintscope.sim.model import MODES
from hintscope.sim.write import simulate

RUN_COLS = ["variant", "mode", "seed", "gt_lost_hint", "gt_lost_not_hint", "found_hint", "found_not_hint",
            "false_confirmed", "safe_hazards", "c_prime", "verdict", "kinds", "sim_s", "detect_s"]
# what a host-only capture lacks: the guest probe's tables and the destination memory check
GUEST_AND_MEMCHECK = ("guest_events", "guest_hints", "guest_returns", "guest_reuse", "lost_pages")


def host_only(b):
    """The bundle as a probe attached by pid to someone else's migration would record it."""
    hb = b.without(*GUEST_AND_MEMCHECK)
    hb.meta["sources"] = {k: v for k, v in hb.meta["sources"].items() if k not in ("guest_probe", "memcheck")}
    return hb


def one_run(variant: str, seed: int, mode: str, dest_compare: bool = False, host: bool = False) -> dict:
    t0 = time.perf_counter()
    b = simulate(variant, seed, mode, dest_compare=dest_compare)
    gt = b.table("ground_truth")
    if host:
        b = host_only(b)
    t1 = time.perf_counter()
    res = detector.run(b)
    f, vd = res.frame, res.verdict
    t2 = time.perf_counter()
    lost = gt["lost"].to_numpy()
    gfn = gt["gfn"].to_numpy().astype(np.int64)
    hint = gt["reason"].to_numpy() == "hint"
    lost_h, lost_n = set(gfn[lost & hint]), set(gfn[lost & ~hint])
    hard = f[f["confidence"].isin(["confirmed", "hazard"]) & f["severity"].isin(["safety", "migration"])]
    reported = set(int(g) for gl in hard["gfns"] for g in gl)
    conf_lost = f[(f["confidence"] == "confirmed") & f["kind"].isin(detector.LOST_KINDS)]
    confirmed = set(int(g) for gl in conf_lost["gfns"] for g in gl)
    v = V.get(variant)
    # c' is QEMU's hint path under manual protect, inherited by every variant: expected, not a false hazard
    safety_hard = hard[(hard["severity"] == "safety") & ~((hard["kind"] == "rearm-in-apply") & (mode == "manual"))]
    return {"variant": variant, "mode": mode, "seed": seed, "gt_lost_hint": len(lost_h),
            "gt_lost_not_hint": len(lost_n), "found_hint": len(lost_h & reported),
            "found_not_hint": len(lost_n & reported), "false_confirmed": len(confirmed - lost_h - lost_n),
            "safe_hazards": int(len(safety_hard)) if (v.safe and not v.hint_hazards) else 0,
            "c_prime": int((f["kind"] == "rearm-in-apply").any()),
            "verdict": vd.split(":")[0], "kinds": ",".join(sorted(set(f["kind"]))),
            "sim_s": t1 - t0, "detect_s": t2 - t1}


def _one(args) -> dict:
    return one_run(*args)


def run_matrix(variants=None, seeds=range(20), modes=MODES, dest_compare: bool = False, jobs: int = 1,
               host: bool = False) -> pd.DataFrame:
    todo = [(v, s, m, dest_compare, host) for v in (variants or list(V.VARIANTS)) for m in modes for s in seeds]
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(jobs) as ex:
            rows = list(ex.map(_one, todo, chunksize=4))
    else:
        rows = [_one(t) for t in todo]
    return pd.DataFrame(rows, columns=RUN_COLS)


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    g = runs.groupby(["variant", "mode"], sort=False)
    s = g.agg(runs=("seed", "size"), gt_lost_hint=("gt_lost_hint", "sum"), found_hint=("found_hint", "sum"),
              gt_lost_not_hint=("gt_lost_not_hint", "sum"), found_not_hint=("found_not_hint", "sum"),
              false_confirmed=("false_confirmed", "sum"), safe_hazards=("safe_hazards", "sum"),
              c_prime=("c_prime", "sum"),
              unsafe_verdicts=("verdict", lambda x: int((x == "unsafe ordering found").sum())),
              inconclusive=("verdict", lambda x: int((x == "inconclusive").sum())),
              detect_ms=("detect_s", lambda x: 1e3 * float(np.mean(x))))
    tot = s["gt_lost_hint"] + s["gt_lost_not_hint"]
    s["recall"] = np.where(tot > 0, (s["found_hint"] + s["found_not_hint"]) / tot.where(tot > 0, 1), np.nan)
    kinds = g["kinds"].agg(lambda x: ",".join(sorted(set(",".join(x).split(",")) - {""})))
    s["kinds"] = kinds
    return s.reset_index()


def check(summary: pd.DataFrame) -> list[str]:
    """The properties the detector must have; empty list = all hold."""
    bad = []
    r = summary
    miss = r[(r["recall"].notna()) & (r["recall"] < 1.0)]
    for x in miss.itertuples():
        bad.append(f"{x.variant}/{x.mode}: recall {x.recall:.3f} < 1")
    for x in r[r["false_confirmed"] > 0].itertuples():
        bad.append(f"{x.variant}/{x.mode}: {x.false_confirmed} confirmed lost pages the truth does not have")
    for x in r[r["safe_hazards"] > 0].itertuples():
        bad.append(f"{x.variant}/{x.mode}: {x.safe_hazards} hazards in a safe variant")
    for x in r[(r["mode"] != "manual") & (r["c_prime"] > 0)].itertuples():
        bad.append(f"{x.variant}/{x.mode}: {x.c_prime} runs with a c' hazard outside manual protect")
    return bad
