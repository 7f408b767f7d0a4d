#!/usr/bin/env python3
"""Simulator scale: time and peak RSS of ``hintscope simulate --preset scale`` at 1 to 256 GiB.

Each size runs once in a fresh process under ``/usr/bin/time -v`` (wall, user + system CPU, peak
RSS), with a 1 GiB baseline run right before it, so every size has a ratio to a baseline measured
under the same load (the machine is 2 cores shared with other jobs).  Linear growth means CPU per
GiB stays flat across sizes.

    benchmarks/bench_sim_scale.py                          # qemu/manual at 1, 4, 16, 64, 256 GiB
    benchmarks/bench_sim_scale.py --sizes 1,4 --variant clear-on-apply --mode ring
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as B  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GIB_PAGES = 262_144


def command(variant: str, mode: str, gib: float, out: Path) -> list[str]:
    return [sys.executable, "-m", "hintscope", "simulate", "--variant", variant, "--mode", mode,
            "--pages", str(int(gib * GIB_PAGES)), "--preset", "scale", "-o", str(out)]


def timed(cmd: list[str]) -> dict:
    p = subprocess.run(["/usr/bin/time", "-v"] + cmd, cwd=ROOT, capture_output=True, text=True)
    err = p.stderr

    def field(name: str) -> str:
        m = re.search(rf"^\s*{re.escape(name)}: (.*)$", err, re.M)
        return m.group(1).strip() if m else ""
    wall = field("Elapsed (wall clock) time (h:mm:ss or m:ss)")
    parts = [float(x) for x in wall.split(":")] if wall else [0.0]
    sec = sum(x * 60 ** i for i, x in enumerate(reversed(parts)))
    return {"rc": p.returncode, "wall_s": sec, "cpu_s": float(field("User time (seconds)") or 0)
            + float(field("System time (seconds)") or 0),
            "peak_rss_mib": int(field("Maximum resident set size (kbytes)") or 0) / 1024,
            "stdout": p.stdout.strip()[-300:], "stderr": "" if p.returncode == 0 else err[-600:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,4,16,64,256", help="GiB, comma separated")
    ap.add_argument("--variant", default="qemu")
    ap.add_argument("--mode", default="manual")
    ap.add_argument("--baseline-gib", type=float, default=1.0)
    ap.add_argument("--out", help="result JSON (default benchmarks/results/sim_scale.json)")
    a = ap.parse_args(argv)
    rows, res = [], {"variant": a.variant, "mode": a.mode, "baseline_gib": a.baseline_gib,
                     "command": " ".join(command(a.variant, a.mode, 0, Path("DIR"))[1:]).replace(
                         "--pages 0", "--pages N"), "runs": []}
    tmp = Path(tempfile.mkdtemp(prefix="sim-scale-"))
    try:
        for gib in [float(x) for x in a.sizes.split(",")]:
            base = timed(command(a.variant, a.mode, a.baseline_gib, tmp / "base"))
            shutil.rmtree(tmp / "base", ignore_errors=True)
            r = timed(command(a.variant, a.mode, gib, tmp / "b"))
            size = sum(f.stat().st_size for f in (tmp / "b").rglob("*") if f.is_file()) if (tmp / "b").exists() else 0
            shutil.rmtree(tmp / "b", ignore_errors=True)
            run = {"gib": gib, "pages": int(gib * GIB_PAGES), **r, "bundle_bytes": size, "baseline": base,
                   "cpu_per_gib_s": r["cpu_s"] / gib, "wall_per_gib_s": r["wall_s"] / gib,
                   "cpu_ratio_to_baseline": r["cpu_s"] / base["cpu_s"] if base["cpu_s"] else None,
                   "per_gib_ratio_to_baseline": (r["cpu_s"] / gib) / (base["cpu_s"] / a.baseline_gib)
                   if base["cpu_s"] else None}
            res["runs"].append(run)
            rows.append([f"{gib:g}", f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['cpu_s'] / gib:.3f}",
                         f"{r['peak_rss_mib']:.0f}", f"{base['cpu_s']:.2f}", f"{run['cpu_ratio_to_baseline']:.1f}",
                         f"{run['per_gib_ratio_to_baseline']:.2f}", str(r["rc"])])
            print(B.table(rows[-1:], ["GiB", "wall s", "CPU s", "CPU s/GiB", "peak RSS MiB", "base CPU s",
                                      "x base", "per-GiB x base", "rc"]).splitlines()[-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(B.table(rows, ["GiB", "wall s", "CPU s", "CPU s/GiB", "peak RSS MiB", "base CPU s", "x base",
                         "per-GiB x base", "rc"]))
    B.write("sim_scale", res, a.out)
    return 0 if all(r["rc"] == 0 for r in res["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
