#!/usr/bin/env python3
"""Print the detector's confusion table against the simulator's ground truth.

    scripts/confusion.py                       # every variant x 20 seeds x get/manual/ring
    scripts/confusion.py --seeds 5 --variant qemu --variant clear-on-apply --json out.json
    scripts/confusion.py --host-only           # without guest tables and memory check

Exit 0 when recall is 1.0, no confirmed lost write lacks ground truth and safe variants draw no
hazard; 1 otherwise (the failed properties are printed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import pandas as pd

from hintscope.sim import confusion
from hintscope.sim.model import MODES
from hintscope.sim.variants import VARIANTS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--variant", action="append", choices=sorted(VARIANTS))
    ap.add_argument("--mode", action="append", choices=MODES)
    ap.add_argument("--dest-compare", action="store_true", help="give the detector the lost_pages table too")
    ap.add_argument("--host-only", action="store_true",
                    help="remove the guest tables and the memory check first (a probe attached by pid)")
    ap.add_argument("--json", help="write runs and summary as JSON here")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="worker processes (default 1)")
    a = ap.parse_args(argv)
    t = time.perf_counter()
    runs = confusion.run_matrix(a.variant, range(a.seeds), tuple(a.mode or MODES), a.dest_compare, a.jobs,
                                   host=a.host_only)
    s = confusion.summarise(runs)
    pd.set_option("display.width", 200)
    pd.set_option("display.max_colwidth", 80)
    cols = ["variant", "mode", "runs", "gt_lost_hint", "found_hint", "gt_lost_not_hint", "found_not_hint", "recall",
            "false_confirmed", "safe_hazards", "c_prime", "unsafe_verdicts", "inconclusive", "detect_ms"]
    print(s[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print()
    print(s[["variant", "mode", "kinds"]].to_string(index=False))
    bad = confusion.check(s)
    print(f"\n{len(runs)} runs in {time.perf_counter() - t:.1f} s; "
          + ("all properties hold" if not bad else f"{len(bad)} properties FAIL:"))
    for b in bad:
        print("  " + b)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"summary": s.to_dict("records"), "runs": runs.to_dict("records"), "failed": bad}, f,
                      indent=1, default=str)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
