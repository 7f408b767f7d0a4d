#!/usr/bin/env python3
"""Evidence for a c' fix: the hintguest matrix on several QEMU binaries, side by side, summarised.

    sudo .venv/bin/python scripts/fix_evidence.py \\
        --qemu stock-10.0.2=/opt/hintscope/qemu-10.0.2-stock/bin/qemu-system-x86_64 \\
        --qemu patched=$(scripts/build-qemu.sh --patch patches/0001-*.patch) \\
        --cells early-reuse,late-reuse,polite,stale-id,zero,zero-off --runs 3 \\
        --out-dir /work/coord/evidence/fix -o benchmarks/results/fix_evidence

Each run is one ``hintscope lab hintguest`` migration (KVM bitmap mode, manual protect, probe on)
into its own bundle under --out-dir. Runs are interleaved (run 1 of every cell on every QEMU,
then run 2, ...) so the machine's load drifts over all QEMUs alike. A bundle that already exists
is summarised again, not re-run, so an interrupted matrix resumes.

Per run it records: lost writes (memory check), bytes transferred, normal and zero pages sent,
total time, downtime, syncs, the KVM_CLEAR_DIRTY_LOG calls per thread (count and time spent, from
the probe's ioctl enter/exit stamps) and the detector's verdict and finding counts
(``hintscope analyze --json``). Writes ``OUT.csv`` (one row per run) and ``OUT.json`` (rows, plus
per QEMU and cell: means, and the hint-on/off transfer ratios against the same QEMU's hint-off
cell measured in the same matrix).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hintscope.bundle import read_bundle  # noqa: E402
from hintscope.errors import HintscopeError  # noqa: E402

# cell -> `lab hintguest` arguments. The hint-off cells keep the guest's writes and timing and let
# QEMU drop every hint (stale cmd id in the start message): the same workload with no saving.
CELLS = {
    "early-reuse": ["--behaviour", "early-reuse"],
    "late-reuse": ["--behaviour", "late-reuse"],
    "polite": ["--behaviour", "polite"],
    "stale-id": ["--behaviour", "early-reuse", "--stale-id"],
    "zero": ["--behaviour", "polite", "--zero-before-hint"],
    "zero-off": ["--behaviour", "polite", "--zero-before-hint", "--stale-id"],
}
HINT_OFF = {"early-reuse": "stale-id", "late-reuse": "stale-id", "polite": "stale-id", "zero": "zero-off"}
CLEAR = "CLEAR_DIRTY_LOG"


def clear_costs(b) -> dict[str, float]:
    """KVM_CLEAR_DIRTY_LOG calls by thread role, from the probe's ioctls (enter/exit) and qemu_events.

    mig_*: the migration thread (the one that runs the dirty-log syncs); apply_*: the thread that
    runs qemu_guest_free_page_hint; postsync_*: migration-thread clears before the next hint cmd id
    is announced (between a sync's fetch end and the following notify_config), which is where a
    re-arm at AFTER_BITMAP_SYNC issues its clears."""
    out: dict[str, float] = {}
    if not (b.has("ioctls") and b.has("qemu_events")):
        return out
    io, ev = b.table("ioctls"), b.table("qemu_events")
    cl = io[io["name"] == CLEAR]
    dur_us = (cl["ts_ns"] - cl["enter_ns"]) / 1e3
    mig_tids = set(ev.loc[ev["event"] == "sync_fetch_begin", "tid"])
    apply_tids = set(ev.loc[ev["event"] == "hint_apply", "tid"])
    for role, tids in (("mig", mig_tids), ("apply", apply_tids)):
        sel = cl["tid"].isin(tids)
        out[f"{role}_clears"] = int(sel.sum())
        out[f"{role}_clear_us"] = round(float(dur_us[sel].sum()), 1)
    ends = np.sort(ev.loc[ev["event"] == "sync_fetch_end", "ts_ns"].to_numpy())
    cfg = np.sort(ev.loc[ev["event"] == "notify_config", "ts_ns"].to_numpy())
    post = np.zeros(len(cl), dtype=bool)
    ts = cl["ts_ns"].to_numpy()
    for e in ends:
        nxt = cfg[cfg > e]
        hi = nxt[0] if len(nxt) else e + 50_000_000
        post |= (ts > e) & (ts <= hi)
    post &= cl["tid"].isin(mig_tids).to_numpy()
    out["postsync_clears"] = int(post.sum())
    out["postsync_clear_us"] = round(float(dur_us[post].sum()), 1)
    out["clear_max_us"] = round(float(dur_us.max()), 1) if len(dur_us) else 0.0
    return out


def analyze(bundle: Path, tree: Path, cache: Path | None) -> dict[str, object]:
    """``hintscope analyze BUNDLE --json`` run from source tree ``tree`` (this repo, or a snapshot of
    it with a detector change under test); the JSON is kept in ``cache`` so a re-summary is cheap."""
    j = None
    if cache is not None and cache.exists():
        with contextlib.suppress(json.JSONDecodeError, OSError):
            j = json.loads(cache.read_text())
    if j is None:
        r = subprocess.run([sys.executable, "-m", "hintscope", "analyze", str(bundle), "--json"], cwd=tree,
                           env=dict(os.environ, PYTHONPATH=str(tree)), capture_output=True, text=True, timeout=900)
        try:
            j = json.loads(r.stdout)
        except json.JSONDecodeError:
            return {"verdict": f"analyze failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-200:]}"}
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(j))
    # The lead moves verdict/findings to the top level this session; read both layouts.
    inner = j.get("findings") if isinstance(j.get("findings"), dict) else {}
    verdict = j.get("verdict") or inner.get("verdict")
    fl = j.get("findings") if isinstance(j.get("findings"), list) else (inner.get("findings") or {})
    if isinstance(fl, dict):
        fl = fl.get("findings") or []
    out: dict[str, object] = {"verdict": verdict if isinstance(verdict, str) else json.dumps(verdict)[:200]}
    for kind in ("rearm-in-apply", "rearm-wipe"):
        fs = [f for f in fl if isinstance(f, dict) and f.get("kind") == kind]
        out[f"{kind}_findings"] = len(fs)
        out[f"{kind}_pages"] = int(sum(int(f.get("gfn_count") or 0) for f in fs))
    out["safety_findings"] = sum(1 for f in fl if isinstance(f, dict) and f.get("severity") == "safety"
                                 and f.get("confidence") in ("confirmed", "hazard"))
    return out


def summarise(bundle: Path, qemu: str, cell: str, run: int, tree: Path | None, cache: Path | None) -> dict[str, object]:
    row: dict[str, object] = {"qemu": qemu, "cell": cell, "run": run, "bundle": str(bundle)}
    try:
        b = read_bundle(bundle)
    except HintscopeError as e:
        return row | {"status": f"unreadable: {e}"}
    hg = b.meta.get("hintguest") or {}
    mig = hg.get("migration") or {}
    ram = mig.get("ram") or {}
    res = hg.get("result") or {}
    mc = b.meta.get("memcheck") or hg.get("memcheck") or {}
    row.update({
        "status": mig.get("status", "no migration result"),
        "qemu_label": hg.get("qemu_label") or hg.get("qemu_version"),
        "lost_writes": mc.get("lost_writes"), "reuse_writes": hg.get("reuse_writes_in_source_ram"),
        "lost_reuse_writes": res.get("lost_reuse_writes"), "hinted_held_pages": mc.get("hinted_held_pages"),
        "transferred": ram.get("transferred"), "normal_pages": ram.get("normal"), "zero_pages": ram.get("duplicate"),
        "total_time_ms": mig.get("total-time"), "downtime_ms": mig.get("downtime"),
        "syncs": ram.get("dirty-sync-count"),
        "applies": (res.get("host") or {}).get("applies"),
    })
    row.update(clear_costs(b))
    if tree is not None and b.complete:
        row.update(analyze(bundle, tree, cache))
    return row


def run_one(bundle: Path, qemu_path: str, cell: str, log: Path) -> int:
    argv = [sys.executable, "-m", "hintscope", "lab", "hintguest", *CELLS[cell], "--qemu", qemu_path,
            "--probe", "on", "-o", str(bundle)]
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(argv)}\n")
        f.flush()
        t = time.monotonic()
        rc = subprocess.run(argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=600).returncode
        f.write(f"exit {rc} after {time.monotonic() - t:.0f} s\n")
    return rc


def aggregate(rows: pd.DataFrame) -> list[dict[str, object]]:
    ok = rows[rows["status"] == "completed"]
    num = ["lost_writes", "lost_reuse_writes", "hinted_held_pages", "reuse_writes", "transferred", "normal_pages", "zero_pages",
           "total_time_ms", "downtime_ms", "syncs", "mig_clears", "mig_clear_us", "apply_clears", "apply_clear_us",
           "postsync_clears", "postsync_clear_us", "rearm-in-apply_pages", "rearm-wipe_pages"]
    num = [c for c in num if c in ok]
    out = []
    for (q, c), g in ok.groupby(["qemu", "cell"], sort=False):
        d: dict[str, object] = {"qemu": q, "cell": c, "runs": int(len(g)),
                                "lost_writes_per_run": [None if pd.isna(v) else int(v) for v in g["lost_writes"]]}
        for col in num:
            v = pd.to_numeric(g[col], errors="coerce")
            d[f"{col}_mean"] = None if v.isna().all() else round(float(v.mean()), 1)
        if "rearm-in-apply_findings" in g:
            d["runs_with_c_prime_hazard"] = int((pd.to_numeric(g["rearm-in-apply_findings"], errors="coerce") > 0).sum())
        off = ok[(ok["qemu"] == q) & (ok["cell"] == HINT_OFF.get(c, ""))]
        if len(off):
            d["hint_off_cell"] = HINT_OFF[c]
            d["transferred_on_over_off"] = round(float(g["transferred"].mean() / off["transferred"].mean()), 4)
            d["normal_pages_on_over_off"] = round(float(g["normal_pages"].mean() / off["normal_pages"].mean()), 4)
            d["bytes_saved_mean"] = round(float(off["transferred"].mean() - g["transferred"].mean()))
        out.append(d)
    return out


def markdown(agg: list[dict[str, object]]) -> str:
    """The aggregate as the table docs/findings.md quotes (means over the runs of each cell)."""
    def f(v, nd=0):
        return "—" if v is None else (f"{v:,.{nd}f}" if isinstance(v, (int, float)) else str(v))
    head = ("| QEMU | cell | runs | lost writes per run | runs with c′ hazard | hinted pages never sent | MB sent | "
            "normal pages | zero pages | on/off bytes | total ms | downtime ms | CLEAR ms: mig thread (post-sync) / apply |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for d in agg:
        mb = d.get("transferred_mean")
        lines.append("| " + " | ".join([
            str(d["qemu"]), str(d["cell"]), str(d["runs"]), ", ".join(str(x) for x in d["lost_writes_per_run"]),
            f(d.get("runs_with_c_prime_hazard")), f(d.get("hinted_held_pages_mean")),
            f(None if mb is None else mb / 1e6, 1), f(d.get("normal_pages_mean")), f(d.get("zero_pages_mean")),
            f(d.get("transferred_on_over_off"), 2), f(d.get("total_time_ms_mean")), f(d.get("downtime_ms_mean")),
            f"{f(_ms(d.get('mig_clear_us_mean')), 1)} ({f(_ms(d.get('postsync_clear_us_mean')), 1)}) / "
            f"{f(_ms(d.get('apply_clear_us_mean')), 1)}"]) + " |")
    return "\n".join(lines) + "\n"


def _ms(us):
    return None if us is None else us / 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qemu", action="append", required=True, metavar="LABEL=PATH")
    ap.add_argument("--cells", default=",".join(CELLS))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out-dir", required=True, type=Path, help="bundles go here (not in git: 10-60 MB each)")
    ap.add_argument("-o", "--output", required=True, type=Path, help="results prefix: writes .csv and .json")
    ap.add_argument("--collect-only", action="store_true", help="summarise existing bundles, run nothing")
    ap.add_argument("--no-analysis", action="store_true", help="skip hintscope analyze")
    ap.add_argument("--analysis-tree", type=Path, default=REPO,
                    help="hintscope source tree to analyse with (default this one); results cached under "
                         "OUT_DIR/analysis-<tree name>/")
    a = ap.parse_args()
    qemus = []
    for item in a.qemu:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            ap.error(f"--qemu {item!r}: expected LABEL=PATH")
        qemus.append((label, path))
    cells = [c for c in a.cells.split(",") if c]
    bad = [c for c in cells if c not in CELLS]
    if bad:
        ap.error(f"--cells: unknown {', '.join(bad)} (known: {', '.join(CELLS)})")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    log = a.out_dir / "runs.log"
    rows = []
    for run in range(1, a.runs + 1):
        for cell in cells:
            for label, path in qemus:
                bundle = a.out_dir / label / f"{cell}-r{run}"
                if not (bundle / "meta.json").exists():
                    if a.collect_only:
                        continue
                    bundle.parent.mkdir(parents=True, exist_ok=True)
                    print(f"[{time.strftime('%H:%M:%S')}] {label} {cell} run {run}", flush=True)
                    run_one(bundle, path, cell, log)
                if (bundle / "meta.json").exists():
                    tree = None if a.no_analysis else a.analysis_tree.resolve()
                    cache = (a.out_dir / f"analysis-{tree.name}" / label / f"{cell}-r{run}.json") if tree else None
                    rows.append(summarise(bundle, label, cell, run, tree, cache))
    df = pd.DataFrame(rows)
    a.output.parent.mkdir(parents=True, exist_ok=True)
    df.drop(columns=["bundle"], errors="ignore").to_csv(a.output.with_suffix(".csv"), index=False)
    summary = {"made_by": "scripts/fix_evidence.py", "argv": sys.argv[1:], "qemus": dict(qemus),
               "cells": {c: CELLS[c] for c in cells}, "hint_off": HINT_OFF,
               "aggregate": aggregate(df) if len(df) else [], "rows": json.loads(df.to_json(orient="records"))}
    a.output.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    a.output.with_suffix(".md").write_text(markdown(summary["aggregate"]))
    print(f"{len(df)} runs summarised -> {a.output.with_suffix('.csv')}, .json, .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
