#!/usr/bin/env python3
"""Analysis memory: peak memory of load + detect over the detector benchmark's synthetic capture,
against the bundle's own in-memory size (the pandas tables, deep).

The capture (10 M dirty-ring pushes + 100 k hinted pages by default) is made by
``benchmarks/bench_detector.py --keep DIR`` (the detector engineer's benchmark; its timings are in its
own JSON).  Then, in a fresh interpreter per repetition (so earlier runs do not hold the peak):
RSS after the imports; ``read_bundle`` + every table (tables' deep size = the bundle's in-memory size);
``detector.detect`` + ``verdict``; peak RSS (``ru_maxrss``) minus the RSS after imports = the
analysis' peak.  Goal: peak < 3x the in-memory size.

    benchmarks/bench_analysis_memory.py              # 10 M pushes, 3 reps
    benchmarks/bench_analysis_memory.py --quick      # 200 k pushes, 1 rep
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as B  # noqa: E402

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from hintscope.analysis import detector
from hintscope.bundle import read_bundle
def rss():
    for l in Path("/proc/self/status").read_text().splitlines():
        if l.startswith("VmRSS"):
            return int(l.split()[1]) * 1024
base = rss()
t = time.perf_counter()
b = read_bundle(sys.argv[1])
tables = {n: b.table(n) for n in json.loads(sys.argv[2])}
load_s = time.perf_counter() - t
size = int(sum(df.memory_usage(deep=True).sum() for df in tables.values()))
after_load = rss()
t = time.perf_counter()
res = detector.run(b)
f, v = res.frame, res.verdict
detect_s = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"base_rss": base, "after_load_rss": after_load, "peak_rss": peak, "in_memory_bytes": size,
                  "load_s": load_s, "detect_s": detect_s, "verdict": v}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pushes", type=int, default=10_000_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("-o", "--output")
    a = ap.parse_args()
    pushes, reps = (200_000, 1) if a.quick else (a.pushes, a.reps)
    work = Path(tempfile.mkdtemp(prefix="hs-perf-mem-", dir="/tmp"))
    try:
        keep = work / "cap"
        subprocess.run([sys.executable, str(Path(__file__).with_name("bench_detector.py")), *(["--quick"] if a.quick else ["--pushes", str(pushes)]),
                        "--keep", str(keep), "-o", str(work / "det.json")], check=True, capture_output=True)
        bundle = keep / "bundle"
        names = sorted(p.name for p in bundle.iterdir() if p.is_dir() and any(p.glob("*.parquet")))
        runs = []
        for _ in range(reps):
            r = subprocess.run([sys.executable, "-c", CHILD, str(bundle), json.dumps(names)],
                               check=True, capture_output=True, text=True)
            runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        disk = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = runs[0]["in_memory_bytes"]
    peak = B.summary([r["peak_rss"] - r["base_rss"] for r in runs])
    ratio = B.summary([(r["peak_rss"] - r["base_rss"]) / r["in_memory_bytes"] for r in runs])
    tot = B.summary([r["load_s"] + r["detect_s"] for r in runs])
    res = {"benchmark": "analysis_memory", "pushes": pushes, "tables": names, "bundle_disk_bytes": disk,
           "in_memory_bytes": size, "peak_over_base_bytes": peak, "peak_over_in_memory": ratio,
           "load_plus_detect_s": tot, "runs": runs, "quick": a.quick}
    print(f"{pushes:,} pushes: bundle {disk / 2**20:.0f} MiB on disk, {size / 2**20:.0f} MiB in memory "
          f"(tables {', '.join(names)})")
    print(B.table([["analysis peak RSS - RSS after imports (MiB)", B.fmt(peak, 2**-20)],
                   ["peak / in-memory size (goal < 3)", B.fmt(ratio)],
                   ["load + detect seconds (fresh process)", B.fmt(tot)]], ["metric", f"median (min-max), {reps} reps"]))
    B.write("bench_analysis_memory" + ("_quick" if a.quick else ""), res, a.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
