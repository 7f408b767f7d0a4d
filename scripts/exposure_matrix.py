"""Linux-guest exposure matrix (docs/findings.md, "Linux guests: exposure").

    .venv/bin/python scripts/exposure_matrix.py run  [--cells CELL ...] [--reps N] [--until HH:MM]
    .venv/bin/python scripts/exposure_matrix.py table            # markdown table + plot from the runs file

A cell is ``workload:kernel:init_on_alloc:start`` (e.g. ``anon:6.12:0:bulk``).  ``run`` migrates each cell
with ``hintscope lab migrate --guest linux`` (a subprocess per run, so one crash does not end the matrix),
appends one JSON line per run to docs/linux-exposure/runs.jsonl (analysis.exposure.run_exposure plus the
run's health, memory check and burst timing) and skips cells that already have --reps runs there.
``--until`` stops starting runs after that UTC time.  Bundles stay under --out (not committed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "docs" / "linux-exposure" / "runs.jsonl"
PLOT = ROOT / "docs" / "linux-exposure" / "exposure.png"
QEMU10 = "/opt/hintscope/qemu-bpo/usr/bin/qemu-system-x86_64"
WORKLOADS = ("anon", "pagecache", "fork")
KERNELS = ("6.1", "6.12")
# priority order: every workload and both init_on_alloc at the bulk round, then mid-migration
DEFAULT_CELLS = [f"{w}:{k}:{i}:{at}" for at in ("bulk", "mid") for i in (1, 0) for w in WORKLOADS for k in KERNELS]


def parse_cell(c: str) -> dict:
    w, k, i, at = c.split(":")
    if w not in WORKLOADS or k not in KERNELS or i not in ("0", "1") or at not in ("bulk", "mid"):
        raise SystemExit(f"bad cell {c!r}: workload:kernel:init_on_alloc:start, e.g. anon:6.1:1:bulk")
    return {"workload": w, "kernel": k, "init_on_alloc": int(i), "start": at}


def load_runs() -> list[dict]:
    if not RESULTS.exists():
        return []
    return [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]


def burst_facts(bundle: Path) -> dict:
    """When the burst started, in which host round, and how the run ended (from the bundle)."""
    from hintscope.analysis import exposure
    from hintscope.bundle import read_bundle

    b = read_bundle(bundle)
    lab = b.meta.get("lab", {})
    out = {"health_ok": lab.get("dst_health", {}).get("ok"), "dst_status": lab.get("dst_health", {}).get("status"),
           "oops": bool(lab.get("dst_health", {}).get("oops")),
           "migration_ms": lab.get("migration", {}).get("total_time_ms"),
           "syncs": (lab.get("migration", {}).get("ram") or {}).get("dirty-sync-count"),
           "page_diffs": lab.get("guest_result", {}).get("page_diffs"),
           "kernel_release": b.meta.get("guest", {}).get("kernel", {}).get("release"),
           "wall_s": lab.get("timings_s", {}).get("total")}
    if b.has("guest_reports"):
        r = b.table("guest_reports")
        br = r[r["word"] == "BURST"]
        st = br[br["v0"] == 2]
        tr = br[br["v0"] == 1]
        out["burst_started"] = bool(len(st))
        if len(st):
            f = exposure._facts(bundle)
            g = int(st["guest_ns"].iloc[0])
            lo, hi = f.band.to_host([g])
            ge = f.guest_events
            run_exit = ge.loc[ge["event"] == "run_exit", "guest_ns"]
            run_enter = ge.loc[ge["event"] == "run_enter", "guest_ns"]
            out["burst_start_after_hint_run_start_ms"] = (
                round((g - int(run_enter.min())) / 1e6, 1) if len(run_enter) else None)
            out["burst_start_after_hint_run_end_ms"] = round((g - int(run_exit.min())) / 1e6, 1) if len(run_exit) else None
            if np.isfinite(lo[0]):
                out["burst_start_epoch"] = int(exposure.epoch_of(f, np.array([(lo[0] + hi[0]) / 2]))[0])
            out["trigger_memfree_kb"] = int(tr["v2"].iloc[0]) if len(tr) else None
    return out


def run_cell(cell: dict, rep: int, out_dir: Path, smp: int, extra: list[str]) -> dict:
    name = f"{cell['workload']}-{cell['kernel']}-ioa{cell['init_on_alloc']}-{cell['start']}-r{rep}"
    bundle = out_dir / name
    if bundle.exists():
        subprocess.run(["rm", "-rf", str(bundle)], check=True)
    argv = [str(ROOT / ".venv/bin/hintscope"), "lab", "migrate", "--guest", "linux", "--smp", str(smp),
            "--qemu", QEMU10, "--guest-kernel", cell["kernel"], "--init-on-alloc", str(cell["init_on_alloc"]),
            "--burst", cell["workload"], "--burst-at", cell["start"], "-o", str(bundle), *extra]
    t0 = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True)
    row = {**cell, "rep": rep, "bundle": str(bundle), "exit": p.returncode, "seconds": round(time.monotonic() - t0, 1),
           "smp": smp, "qemu": "10.0.2", "argv": argv[1:],
           "utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if not (bundle / "meta.json").exists() and not any(bundle.glob("meta*.json")):
        row["error"] = (p.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return row
    try:
        from hintscope.analysis import exposure
        row.update(exposure.run_exposure(bundle))
        row.update(burst_facts(bundle))
    except Exception as e:  # a damaged bundle is a recorded result, not the end of the matrix
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    if p.returncode not in (0, 1):
        row["error"] = row.get("error") or (p.stderr.strip().splitlines() or ["?"])[-1][:300]
    return row


def cmd_run(a) -> int:
    cells = [parse_cell(c) for c in (a.cells or DEFAULT_CELLS)]
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for rep in range(a.reps):
        for cell in cells:
            done = [r for r in load_runs() if all(r.get(k) == v for k, v in cell.items())]
            if len(done) > rep:
                continue
            if a.until and dt.datetime.now(dt.timezone.utc).strftime("%H:%M") >= a.until:
                print(f"stop: past {a.until} UTC", flush=True)
                return 0
            row = run_cell(cell, rep, out_dir, a.smp, a.extra or [])
            with open(RESULTS, "a") as f:
                f.write(json.dumps(row, default=str) + "\n")
            print(json.dumps({k: row.get(k) for k in ("workload", "kernel", "init_on_alloc", "start", "rep", "exit",
                                                       "seconds", "hinted_blocks", "returned_early",
                                                       "returned_before_apply", "written_before_apply", "exposed",
                                                       "health_ok", "error")}), flush=True)
    return 0


def cmd_recompute(a) -> int:
    """Recompute every row's numbers from its bundle (after a change to analysis/exposure.py)."""
    from hintscope.analysis import exposure
    rows = load_runs()
    for r in rows:
        b = Path(r["bundle"])
        if not any(b.glob("meta*.json")):
            continue
        try:
            r.update(exposure.run_exposure(b))
            r.update(burst_facts(b))
            r.pop("error", None) if r.get("exit") in (0, 1) else None
        except Exception as e:
            r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    RESULTS.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    print(f"{len(rows)} rows recomputed")
    return 0


SIM_KEYS = ("hinted_blocks", "returned_early", "returned_before_apply", "returned_before_apply_maybe",
            "reused_pages", "written_before_apply", "hint_to_apply_ms_median", "first_return_after_hint_ms",
            "shrinker_interval_ms_median", "blocks_per_shrinker_call")


def cmd_sim(a) -> int:
    """The simulator's shrinker-reuse variant through the same accounting, next to the measured runs."""
    from hintscope.analysis import exposure
    from hintscope.sim import variants
    from hintscope.sim.write import simulate

    k = variants.get("shrinker-reuse").knobs
    print(f"shrinker-reuse knobs: shrink_period_ns={k.shrink_period_ns:.0f} shrink_blocks={k.shrink_blocks} "
          f"apply_latency_ns={k.apply_latency_ns}")
    rows = []
    for seed in range(a.seeds):
        r = exposure.run_exposure(simulate("shrinker-reuse", seed, "manual", dest_compare=False))
        rows.append(r)
        print("sim seed", seed, json.dumps({x: r.get(x) for x in SIM_KEYS}))
    runs = [r for r in load_runs() if "hinted_blocks" in r]

    def rate(rs, num, den):
        n, d = sum((r.get(num) or 0) for r in rs), sum((r.get(den) or 0) for r in rs)
        return f"{n}/{d} = {n / d:.1%}" if d else "-"

    for name, rs in (("simulator shrinker-reuse", rows), ("measured, all runs", runs),
                     *((f"measured, {w}", [r for r in runs if r["workload"] == w]) for w in WORKLOADS)):
        if not rs:
            continue
        med = [r.get("hint_to_apply_ms_median") for r in rs if r.get("hint_to_apply_ms_median") is not None]
        print(f"| {name} | {len(rs)} | {rate(rs, 'returned_early', 'hinted_blocks')} | "
              f"{rate(rs, 'returned_before_apply', 'hinted_blocks')} | "
              f"{rate(rs, 'returned_before_apply', 'returned_early')} | "
              f"{np.median(med) if med else float('nan'):.2f} |")
    return 0


def _cell_key(r: dict) -> tuple:
    return (r["start"], r["workload"], r["kernel"], r["init_on_alloc"])


def cmd_table(a) -> int:
    runs = [r for r in load_runs() if "hinted_blocks" in r]
    keys = sorted({_cell_key(r) for r in runs}, key=lambda k: (k[0] != "bulk", WORKLOADS.index(k[1]), k[2], -k[3]))
    cols = ["start", "workload", "kernel", "init_on_alloc", "runs", "hinted blocks", "shrinker calls",
            "returned early (before DONE)", "returned before apply", "pages reused", "written before apply",
            "exposed: dirty, unarmed (inferred)", "lost at 1 GiB chunk (inferred)", "lost at 128 MiB chunk (inferred)",
            "burst start - bulk hint run end (ms)", "closest return after apply (ms)",
            "memcheck: lost-write / in returned blocks", "dst healthy"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def s(rs, k):
        v = [r.get(k) or 0 for r in rs]
        return "/".join(str(int(x)) for x in v)

    for key in keys:
        rs = [r for r in runs if _cell_key(r) == key]
        lines.append("| " + " | ".join([key[0], key[1], key[2], str(key[3]), str(len(rs)), s(rs, "hinted_blocks"),
                                        s(rs, "shrinker_calls"), s(rs, "returned_before_done"),
                                        s(rs, "returned_before_apply"), s(rs, "reused_pages"),
                                        s(rs, "written_before_apply"), s(rs, "exposed"), s(rs, "exposed_chunk"),
                                        s(rs, "exposed_chunk_128m"),
                                        "/".join(f"{r.get('burst_start_after_hint_run_end_ms'):+.0f}"
                                                 if r.get("burst_start_after_hint_run_end_ms") is not None else "-"
                                                 for r in rs),
                                        "/".join(f"{r.get('min_return_after_apply_ms'):.1f}"
                                                 if r.get("min_return_after_apply_ms") is not None else "-"
                                                 for r in rs),
                                        "/".join(f"{(r.get('page_diffs') or {}).get('lost-write', 0)}:"
                                                 f"{(r.get('page_diffs') or {}).get('hinted-returned', 0)}" for r in rs),
                                        "/".join("y" if r.get("health_ok") else "n" for r in rs)]) + " |")
    print("\n".join(lines))
    failed = [r for r in load_runs() if "hinted_blocks" not in r]
    for r in failed:
        print(f"\nrun without exposure numbers: {_cell_key(r)} rep {r.get('rep')}: {r.get('error')}")
    if runs and not a.no_plot:
        plot(runs, keys)
    return 0


def plot(runs: list[dict], keys: list[tuple]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{k[1]}\n{k[2]} ioa={k[3]}\n{k[0]}" for k in keys]
    series = [("returned_before_done", "blocks returned early (before DONE)"),
              ("returned_before_apply", "blocks returned before their apply"),
              ("reused_pages", "hinted pages reused (/1024)"),
              ("written_before_apply", "pages written before their apply")]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(max(9, len(keys) * 0.75), 8), sharex=True)
    w = 0.8 / len(series)
    x = np.arange(len(keys))
    for j, (k, lab) in enumerate(series):
        vals = [np.mean([(r.get(k) or 0) / (1024 if k == "reused_pages" else 1)
                         for r in runs if _cell_key(r) == key]) for key in keys]
        ax.bar(x + (j - 1.5) * w, vals, w, label=lab)
    ax.set_ylabel("per run (mean over runs)")
    ax.set_title("Linux guest under TCG (QEMU 10.0.2, 2 vCPUs): early returns and writes into hinted blocks")
    ax.legend(fontsize=7)
    for i, key in enumerate(keys):
        rs = [r for r in runs if _cell_key(r) == key]
        mn = [r.get("min_return_after_apply_ms") for r in rs if r.get("min_return_after_apply_ms") is not None]
        md = [r.get("median_return_after_apply_ms") for r in rs if r.get("median_return_after_apply_ms") is not None]
        ax2.scatter([i] * len(mn), mn, marker="v", color="C3", label="closest return (min)" if i == 0 else None)
        ax2.scatter([i] * len(md), md, marker="o", color="C0", label="median return" if i == 0 else None)
    ax2.set_yscale("symlog", linthresh=1.0)   # a negative margin (a return before the apply) stays visible
    ax2.set_ylabel("shrinker return after\nthe block's apply (ms)")
    ax2.set_title("how far the real driver's early returns stay behind the host's apply (< 0 would be exposure)",
                  fontsize=9)
    ax2.legend(fontsize=7)
    ax2.set_xticks(x)
    ax2.set_xticklabels(labels, fontsize=7)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=100)
    print(f"\nplot: {PLOT.relative_to(ROOT)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--cells", nargs="*")
    r.add_argument("--reps", type=int, default=1)
    r.add_argument("--smp", type=int, default=2)
    r.add_argument("--until", help="UTC HH:MM after which no run starts")
    r.add_argument("--out", default="/tmp/hs-exposure")
    r.add_argument("--extra", nargs=argparse.REMAINDER, help="more `lab migrate` options")
    r.set_defaults(func=cmd_run)
    sub.add_parser("recompute").set_defaults(func=cmd_recompute)
    sm = sub.add_parser("sim")
    sm.add_argument("--seeds", type=int, default=3)
    sm.set_defaults(func=cmd_sim)
    t = sub.add_parser("table")
    t.add_argument("--no-plot", action="store_true")
    t.set_defaults(func=cmd_table)
    a = ap.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    raise SystemExit(main())
