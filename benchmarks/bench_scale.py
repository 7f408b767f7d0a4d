#!/usr/bin/env python3
"""Scale: simulate a migration of a 4, 16, 64 and 256 GiB guest, then analyse it; the size table.

Per (variant, mode, size) it runs, each in a fresh process measured with ``wait4`` (CPU time and
peak RSS of that process alone):

* ``hintscope simulate --variant V --mode M --pages N --preset scale --no-dest-compare -o DIR``
  (generate; ``--dest-compare`` keeps the simulated memory check, whose ``lost_pages`` has one row per
  differing page);
* ``hintscope analyze DIR --json`` (load + every check; the JSON is kept);
* at the sizes listed in ``--oracle-gib``, the per-page implementation on the same bundle
  (``tests/oracle_perpage``, kept as the reference) and a comparison of the findings (kind, confidence, gfn_count,
  gfn_first, gfn_last) and verdict.

The machine is 2 shared cores: wall times mostly measure the other tenants, so the table gives CPU
seconds (user + system of the process) and CPU per GiB as a ratio to the smallest size of the same
(variant, mode) in the same run; the target is flat within +-30 %.  Peak RSS is ``ru_maxrss``.

    benchmarks/bench_scale.py                       # 4, 16, 64, 256 GiB; qemu and clear-on-apply; manual and ring
    benchmarks/bench_scale.py --sizes 4,16 --modes manual --variants qemu
    benchmarks/bench_scale.py --quick               # 0.25 and 0.5 GiB, one variant and mode (the smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as B  # noqa: E402

GIB_PAGES = 262_144
ROOT = Path(__file__).resolve().parents[1]
KEYS = ("kind", "confidence", "gfn_count", "gfn_first", "gfn_last")


def measured(cmd: list[str], stdout_path: Path | None = None) -> dict:
    """Run cmd; its wall time, CPU time and peak RSS (from wait4, this child only)."""
    t = time.perf_counter()
    out = open(stdout_path, "wb") if stdout_path else subprocess.DEVNULL
    try:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        err = p.stderr.read()
        _, status, ru = os.wait4(p.pid, 0)
    finally:
        if stdout_path:
            out.close()
    rc = os.waitstatus_to_exitcode(status)
    return {"rc": rc, "wall_s": time.perf_counter() - t, "cpu_s": ru.ru_utime + ru.ru_stime,
            "peak_rss_mib": ru.ru_maxrss / 1024, "stderr": err.decode(errors="replace")[-600:]}


# the per-page detector as it was before the compact data layer (tests/oracle_perpage)
ORACLE = f"""
import json, sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from oracle_perpage import detector
from hintscope.bundle import read_bundle
r = detector.run(read_bundle(sys.argv[1]))
keys = {KEYS!r}
print(json.dumps({{"verdict": r.verdict, "findings": [{{k: f[k] for k in keys}} for f in r.frame.to_dict("records")]}},
                 default=int))
"""


def findings_key(j: dict) -> tuple:
    fs = sorted(tuple(f.get(k) for k in KEYS) for f in j.get("findings", []))
    return (j.get("verdict"), tuple(fs))


def one(variant: str, mode: str, gib: float, tmp: Path, oracle: bool, seed: int, dest: bool) -> dict:
    pages = int(gib * GIB_PAGES)
    d = tmp / f"{variant}-{mode}-{gib:g}"
    py = sys.executable
    gen = measured([py, "-m", "hintscope", "simulate", "--variant", variant, "--mode", mode, "--seed", str(seed),
                    "--pages", str(pages), "--preset", "scale", "-o", str(d)] + ([] if dest else ["--no-dest-compare"]))
    row = {"variant": variant, "mode": mode, "gib": gib, "pages": pages, "generate": gen}
    if gen["rc"] != 0:
        return row
    row["bundle_mib"] = sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 2**20
    meta = json.loads((d / "meta.json").read_text())
    row["truth"] = meta.get("sim", {}).get("truth")
    js = tmp / "analyze.json"
    an = measured([py, "-m", "hintscope", "analyze", str(d), "--json"], js)
    row["analyze"] = an
    try:
        j = json.loads(js.read_text())
        row["verdict"] = j.get("verdict")
        row["findings"] = [{k: f.get(k) for k in KEYS} for f in j.get("findings", [])]
    except ValueError:
        row["verdict"] = None
    if oracle and row.get("verdict") is not None:
        jo = tmp / "oracle.json"
        orc = measured([py, "-c", ORACLE, str(d)], jo)
        row["oracle"] = orc
        try:
            row["oracle_equal"] = findings_key(json.loads(jo.read_text())) == findings_key(j)
        except ValueError:
            row["oracle_equal"] = None
    shutil.rmtree(d, ignore_errors=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="4,16,64,256", help="guest sizes in GiB")
    ap.add_argument("--variants", default="qemu,clear-on-apply")
    ap.add_argument("--modes", default="manual,ring")
    ap.add_argument("--oracle-gib", default="1,4", help="sizes at which the per-page oracle also runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dest-compare", action="store_true",
                    help="keep the simulated memory check (lost_pages: one row per page that differs, ~125k per "
                         "GiB, hinted free pages included); off by default: it is not a compact table")
    ap.add_argument("--tmp", default=None, help="scratch directory (default: a temp dir; bundles are deleted)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("-o", "--output")
    a = ap.parse_args()
    if a.quick:
        a.sizes, a.variants, a.modes, a.oracle_gib = "0.25,0.5", "qemu", "manual", "0.25,0.5"
    sizes = [float(x) for x in a.sizes.split(",")]
    oracle = {float(x) for x in a.oracle_gib.split(",") if x}
    rows = []
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        for variant in a.variants.split(","):
            for mode in a.modes.split(","):
                for gib in sizes:
                    r = one(variant, mode, gib, Path(tmp), gib in oracle, a.seed, a.dest_compare)
                    rows.append(r)
                    an = r.get("analyze", {})
                    print(f"{variant} {mode} {gib:g} GiB: generate {r['generate']['cpu_s']:.1f} CPU-s "
                          f"rc {r['generate']['rc']}, analyze {an.get('cpu_s', float('nan')):.1f} CPU-s "
                          f"{an.get('peak_rss_mib', float('nan')):.0f} MiB, oracle equal {r.get('oracle_equal')}",
                          flush=True)
    # CPU per GiB against the smallest size of the same (variant, mode), same run
    for r in rows:
        base = min((x for x in rows if x["variant"] == r["variant"] and x["mode"] == r["mode"]
                    and x.get("verdict")), key=lambda x: x["gib"], default=None)
        if base and r.get("verdict"):
            per = r["analyze"]["cpu_s"] / r["gib"]
            r["analyze_cpu_per_gib_ratio"] = per / (base["analyze"]["cpu_s"] / base["gib"])
        if r["generate"]["rc"] == 0:
            r["generate_cpu_per_gib"] = r["generate"]["cpu_s"] / r["gib"]
    head = ["variant", "mode", "GiB", "pages", "gen CPU-s", "gen s/GiB", "gen MiB", "analyze CPU-s",
            "per-GiB ratio", "analyze MiB", "verdict", "findings", "oracle equal"]
    body = []
    for r in rows:
        an = r.get("analyze", {})
        body.append([r["variant"], r["mode"], f"{r['gib']:g}", r["pages"], f"{r['generate']['cpu_s']:.1f}",
                     f"{r.get('generate_cpu_per_gib', float('nan')):.2f}", f"{r['generate']['peak_rss_mib']:.0f}",
                     f"{an.get('cpu_s', float('nan')):.2f}", f"{r.get('analyze_cpu_per_gib_ratio', float('nan')):.2f}",
                     f"{an.get('peak_rss_mib', float('nan')):.0f}", str(r.get("verdict"))[:28],
                     len(r.get("findings", [])), r.get("oracle_equal", "-")])
    print(B.table(body, head))
    B.write("bench_scale", {"rows": rows, "table": B.table(body, head), "dest_compare": a.dest_compare}, a.output)
    # analyze exits 0, 1 (a finding) or 3 (inconclusive) with a verdict; 2 is an input error
    failed = [r for r in rows if r["generate"]["rc"] != 0 or not r.get("verdict")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
