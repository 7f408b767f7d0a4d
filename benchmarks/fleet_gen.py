"""Fleet scale test: N simulated bundles indexed serially, embedded (processes) and on a Dask LocalCluster.

    .venv/bin/python benchmarks/fleet_gen.py -n 1000 --work /tmp/fleet-bench   (results/fleet_gen.json)

1. generate N bundles once (hintscope.fleet.simfleet: variants, modes, sizes, seeds; QEMU version labels);
2. index them with each engine into its own index, in the same run: the serial loop (the baseline)
   on a random sample, half before and half after the parallel engines so that a change in the
   machine's background load shows up as a difference between the halves; the embedded engine
   (2 processes) and Dask (LocalCluster, 2 worker processes) on all N;
3. re-index with new bundles added: only those are analysed;
4. query per (qemu, dirty_mode, hint) and check the share of runs with a lost-write finding against
   the simulator's ground truth (meta["sim"]["truth"]["lost"] > 0) recorded at generation.

Only ratios are compared: the machine has 2 cores shared with other jobs.  The bundles stay in
--work (not committed); the JSON and the plot go to benchmarks/results/ and docs/.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

from hintscope.fleet import simfleet  # noqa: E402
from hintscope.fleet.engines import Engine  # noqa: E402
from hintscope.fleet.index import build  # noqa: E402
from hintscope.fleet.query import query  # noqa: E402


def du(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def run_engine(name: str, eng: Engine, bundles: list[str], idx: Path) -> dict:
    if idx.exists():
        shutil.rmtree(idx)
    load0 = os.getloadavg()[0]
    st = build(bundles, idx, eng, progress=False)
    print(f"  {name}: {st.line()}", flush=True)
    return {"engine": st.engine, "bundles": st.given, "indexed": st.indexed, "errors": st.errors,
            "seconds": round(st.seconds, 2), "runs_per_s": round(st.rate, 3), "loadavg_before": load0}


def interleaved(args, bundles: list[str], work: Path, res: dict) -> int:
    engines = {"serial": Engine("serial"), "embedded": Engine("processes", jobs=args.workers),
               "dask": Engine("dask", jobs=args.workers)}
    names = list(engines)
    rng = random.Random(11)
    rounds = []
    for k in range(args.interleave):
        sample = rng.sample(bundles, args.sample)
        row = {}
        for name in names[k % 3:] + names[:k % 3]:   # rotate who goes first
            row[name] = run_engine(f"round {k} {name}", engines[name], sample, work / f"idx-r-{name}")
        rounds.append(row)
    res["rounds"] = rounds
    res["sample"] = args.sample
    ratios = {n: [r[n]["runs_per_s"] / r["serial"]["runs_per_s"] for r in rounds] for n in ("embedded", "dask")}
    res["ratio_vs_serial_per_round"] = {n: [round(x, 2) for x in v] for n, v in ratios.items()}
    res["ratio_vs_serial"] = {n: _bench.summary(v) for n, v in ratios.items()}
    print(f"per-round ratio vs serial: embedded {_bench.fmt(res['ratio_vs_serial']['embedded'])}, "
          f"dask {_bench.fmt(res['ratio_vs_serial']['dask'])}")
    _bench.write("fleet_gen_interleaved", res, args.output)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--work", default="/tmp/fleet-bench")
    ap.add_argument("--serial-sample", type=int, default=250, help="bundles in the serial baseline (0 = all)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help="use the run record of an earlier generation in --work "
                    "(an interrupted generation resumes by itself: finished bundles are kept)")
    ap.add_argument("--plot", default=None, help="also write the fleet plot here (docs/fleet-*.png)")
    ap.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                    help="instead of the full runs: ROUNDS rounds, each indexing a fresh random sample of "
                         "--sample bundles with every engine in rotating order (ratios under changing load)")
    ap.add_argument("--sample", type=int, default=100)
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args()
    work = Path(args.work)
    broot = work / "bundles"
    res: dict = {"n": args.n, "workers": args.workers}

    t = time.perf_counter()
    record = work / "runs.json"
    if args.reuse and record.exists():
        import json
        runs = json.loads(record.read_text())
    else:
        runs = simfleet.generate(args.n, broot, jobs=args.workers)
        import json
        record.write_text(json.dumps(runs))
    res["generate_s"] = round(time.perf_counter() - t, 1)
    res["bundles_bytes"] = du(broot)
    print(f"generated {len(runs)} bundles in {res['generate_s']} s ({res['bundles_bytes'] / 1e6:.0f} MB)", flush=True)
    bundles = [r["bundle"] for r in runs]
    if args.interleave:
        return interleaved(args, bundles, work, res)

    rng = random.Random(7)
    sample = bundles if not args.serial_sample else rng.sample(bundles, min(args.serial_sample, len(bundles)))
    half = len(sample) // 2
    eng = {}
    eng["serial_a"] = run_engine("serial (first half of sample)", Engine("serial"), sample[:half], work / "idx-serial-a")
    eng["embedded"] = run_engine("embedded", Engine("processes", jobs=args.workers), bundles, work / "idx-embedded")
    eng["dask"] = run_engine("dask", Engine("dask", jobs=args.workers), bundles, work / "idx-dask")
    eng["serial_b"] = run_engine("serial (second half of sample)", Engine("serial"), sample[half:], work / "idx-serial-b")
    ser_n = eng["serial_a"]["indexed"] + eng["serial_b"]["indexed"]
    ser_s = eng["serial_a"]["seconds"] + eng["serial_b"]["seconds"]
    serial_rate = ser_n / ser_s
    res["engines"] = eng
    res["serial_runs_per_s"] = round(serial_rate, 3)
    res["ratio_vs_serial"] = {k: round(eng[k]["runs_per_s"] / serial_rate, 2) for k in ("embedded", "dask")}
    res["serial_halves_ratio"] = round(eng["serial_b"]["runs_per_s"] / eng["serial_a"]["runs_per_s"], 2)
    idx = work / "idx-embedded"
    res["index_bytes"] = du(idx)
    res["index_files"] = sum(1 for _ in idx.rglob("*.parquet"))
    res["index_bytes_per_run"] = round(res["index_bytes"] / len(bundles), 1)

    # incremental: add new bundles; only they are analysed
    extra = simfleet.plan(args.n + 20)[args.n:]
    new = [simfleet.write_run(r, broot) for r in extra]
    t = time.perf_counter()
    st = build(bundles + [r["bundle"] for r in new], idx, Engine("processes", jobs=args.workers), progress=False)
    res["incremental"] = {"given": st.given, "indexed": st.indexed, "skipped": st.skipped,
                          "seconds": round(time.perf_counter() - t, 2)}
    print(f"  incremental: {st.line()}", flush=True)
    runs = runs + new

    # query vs ground truth
    t = time.perf_counter()
    q = query(idx, ["qemu", "dirty_mode", "hint"], ["lost_write_findings", "lost_pages_found", "hazards",
                                                     "bytes_saved_upper_bound"])
    res["query_s"] = round(time.perf_counter() - t, 3)
    truth = simfleet.truth_rates(runs, ("qemu", "mode"))
    rows, bad = [], []
    for r in q.to_dicts():
        g = truth[(r["qemu"], r["dirty_mode"])]
        exp_rate = g["lost_runs"] / g["runs"]
        got = r["lost_write_findings.rate"]
        ok = r["runs"] == g["runs"] and abs(got - exp_rate) < 1e-12
        if not ok:
            bad.append((r["qemu"], r["dirty_mode"]))
        rows.append({"qemu": r["qemu"], "dirty_mode": r["dirty_mode"], "hint": r["hint"], "runs": r["runs"],
                     "lost_write_rate": round(got, 4), "truth_lost_rate": round(exp_rate, 4),
                     "lost_pages_found": int(r["lost_pages_found.mean"] * r["runs"] + 0.5),
                     "truth_lost_pages": g["lost_pages"], "hazard_rate": round(r["hazards.rate"], 4),
                     "bytes_saved_median": r["bytes_saved_upper_bound.median"], "match": ok})
    res["groups"] = rows
    res["truth_match"] = not bad
    res["truth_mismatch"] = bad
    print(_bench.table([[x["qemu"], x["dirty_mode"], x["runs"], x["lost_write_rate"], x["truth_lost_rate"],
                         x["lost_pages_found"], x["truth_lost_pages"], x["hazard_rate"], "yes" if x["match"] else "NO"]
                        for x in rows],
                       ["qemu", "mode", "runs", "lost-write rate", "truth", "pages found", "truth pages",
                        "hazard rate", "match"]))
    print(f"serial {serial_rate:.2f} runs/s; embedded x{res['ratio_vs_serial']['embedded']}, dask "
          f"x{res['ratio_vs_serial']['dask']}; index {res['index_bytes'] / 1e6:.2f} MB "
          f"({res['index_bytes_per_run']} B/run); truth match: {res['truth_match']}")
    if args.plot:
        from hintscope.fleet.plot import plot
        plot(idx, "bytes_saved_upper_bound", "qemu", ["dirty_mode"], args.plot)
        plot(idx, "lost_write_findings", "date", ["qemu"], str(Path(args.plot).with_name("fleet-lost-by-date.png")), stat="mean")
    _bench.write("fleet_gen", res, args.output)
    return 0 if res["truth_match"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
