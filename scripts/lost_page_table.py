#!/usr/bin/env python3
"""Per-page table of a run's destination losses, with the detector's classification of each page.

For every page the lab's memory check found different (table ``lost_pages``), one row: the
memory check's class, whether the page lies in a block the guest hinted (and when), whether it
belongs to the workload's stamped writer buffer, and the finding(s) the detector reports for it
(``unexplained`` when none does). Usage: scripts/lost_page_table.py BUNDLE [-o CSV]
"""

import argparse
import sys

import numpy as np
import pandas as pd

from hintscope.analysis import detector
from hintscope.bundle import read_bundle

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("bundle")
ap.add_argument("-o", "--output", help="CSV path (default: stdout)")
a = ap.parse_args()
b = read_bundle(a.bundle)
lp = b.table("lost_pages")
out = pd.DataFrame({"gfn": lp["gfn"].to_numpy().astype(np.int64), "memcheck": lp["classification"].astype(str)})
if b.has("guest_page_diffs"):
    g = b.table("guest_page_diffs")
    out = out.merge(pd.DataFrame({"gfn": g["gfn"].to_numpy().astype(np.int64), "guest_class": g["cls"].astype(str),
                                  "hinted_ns": g["hinted_ns"].to_numpy(np.int64),
                                  "writer_page": g["writer_page"].to_numpy(bool)}), on="gfn", how="left")
f = detector.detect(b)
kinds = (f[["kind", "confidence", "gfns"]].explode("gfns").dropna(subset=["gfns"])
         .assign(gfn=lambda d: d["gfns"].astype(np.int64))
         .groupby("gfn").agg(finding=("kind", lambda k: "+".join(sorted(set(k)))),
                             confidence=("confidence", lambda k: "+".join(sorted(set(k))))).reset_index())
out = out.merge(kinds, on="gfn", how="left").fillna({"finding": "unexplained", "confidence": ""})
out["gfn"] = out["gfn"].map(hex)
out.to_csv(a.output or sys.stdout, index=False)
if a.output:
    print(f"{a.output}: {len(out)} pages; findings: {out['finding'].value_counts().to_dict()}", file=sys.stderr)
