#!/usr/bin/env python3
"""Host-probe cost on a real KVM migration: probe on vs off, alternating pairs, bitmap and dirty ring.

Each run is ``hintscope lab migrate --guest dirtier --rate 0`` (the bare-metal guest writing its pages
as fast as it can) through the lab's Python API, with ``--probe on`` or ``--probe off``.  The order
alternates within each pair (on/off, off/on, ...) so slow drifts of the machine's load hit both.

Measured per run:
* migration total time (QMP ``total-time``, ms);
* guest dirtying throughput (page writes/s) over the ``pre_ms`` window right before ``migrate``, when
  the probe (if on) is attached and draining: from the dirtier's heartbeat lines (seq, guest TSC);
* probe runs: lost events per source (meta ``lost``), records, and the ring occupancy in ring mode.

The ratio on/off is computed per pair (median over pairs), so the other tenants' load mostly cancels.

    benchmarks/bench_lab_overhead.py                 # 5 pairs bitmap + 5 pairs ring (~8 min)
    benchmarks/bench_lab_overhead.py --quick         # 1 pair, bitmap only
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as B  # noqa: E402

from hintscope.bundle import read_bundle  # noqa: E402
from hintscope.lab.dirtier import LabOptions, run_lab  # noqa: E402

HB = re.compile(r"DIRTIER hb=(\d+) round=(\d+) seq=(\d+) tsc=(\d+)\n")
TSC_HZ = re.compile(r"tsc_hz=(\d+)")


def dirty_rate(serial: str, seq_before: int, window_s: float) -> float | None:
    """Page writes/s over the heartbeats of the last ``window_s`` seconds up to the one read before migrate."""
    hz = TSC_HZ.search(serial)
    hbs = [(int(s), int(t)) for _, _, s, t in HB.findall(serial)]
    if not hz or not hbs:
        return None
    hz = int(hz.group(1))
    end = next((i for i, (s, _) in enumerate(hbs) if s >= seq_before), None)
    if end is None:
        return None
    s1, t1 = hbs[end]
    start = next(i for i, (s, t) in enumerate(hbs) if t >= t1 - window_s * hz)
    s0, t0 = hbs[start]
    if t1 <= t0:
        return None
    return (s1 - s0) / ((t1 - t0) / hz)


def one_run(mode: str, probe: bool, work: Path, pre_ms: int, k: int) -> dict:
    bundle = work / f"{mode}-{'on' if probe else 'off'}-{k}"
    o = LabOptions(bundle=bundle, rate=0, probe="on" if probe else "off", pre_ms=pre_ms,
                   dirty_ring=65536 if mode == "ring" else 0, fill_mb=8, bandwidth_mb=32, memcheck=True)
    t = time.monotonic()
    s = asyncio.run(run_lab(o))
    wall = time.monotonic() - t
    b = read_bundle(bundle)
    serial = (bundle / "files" / "src-serial.log").read_text(errors="replace")
    hb = s.get("src_heartbeat", {}).get("before_migrate") or {}
    rate = dirty_rate(serial, hb.get("seq", 0), pre_ms / 1000 - 0.3)
    lost = b.meta.get("lost", {}) or {}
    hp = b.meta.get("host_probe", {}) or {}
    r = {"mode": mode, "probe": probe, "total_time_ms": s["migration"]["total_time_ms"],
         "downtime_ms": s["migration"]["downtime_ms"], "dirty_rate": rate, "wall_s": round(wall, 2),
         "lost": lost, "lost_total": sum(int(v) for v in lost.values()), "records": hp.get("records"),
         "rows": b.meta.get("rows"), "lost_pages": s.get("memcheck", {}).get("lost_writes"),
         "ring_occupancy": s.get("ring_occupancy"), "syncs": None,
         "dirty_sync_count": (s["migration"].get("ram") or {}).get("dirty-sync-count"),
         "loadavg": __import__("os").getloadavg()[0]}
    shutil.rmtree(bundle, ignore_errors=True)
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 pair, bitmap mode only (smoke)")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--modes", default="bitmap,ring")
    ap.add_argument("--pre-ms", type=int, default=3000, help="guest runs this long (probe attached) before migrate")
    ap.add_argument("-o", "--output")
    a = ap.parse_args()
    pairs, modes = (1, ["bitmap"]) if a.quick else (a.pairs, a.modes.split(","))
    pre_ms = 1200 if a.quick else a.pre_ms
    runs = []
    work = Path(tempfile.mkdtemp(prefix="hs-perf-lab-", dir="/tmp"))
    try:
        for i in range(pairs):
            for mode in modes:
                order = (True, False) if i % 2 == 0 else (False, True)
                for probe in order:
                    r = one_run(mode, probe, work, pre_ms, i)
                    r["pair"] = i
                    runs.append(r)
                    print(f"pair {i} {mode:6s} probe={'on ' if probe else 'off'} total {r['total_time_ms']} ms "
                          f"dirty {r['dirty_rate'] and round(r['dirty_rate'])} /s lost {r['lost_total']} "
                          f"records {r['records']} lost_pages {r['lost_pages']} load {r['loadavg']:.1f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {"benchmark": "lab_overhead", "quick": a.quick, "pre_ms": pre_ms, "runs": runs, "modes": {}}
    rows = []
    for mode in modes:
        on = {r["pair"]: r for r in runs if r["mode"] == mode and r["probe"]}
        off = {r["pair"]: r for r in runs if r["mode"] == mode and not r["probe"]}
        m = {}
        for metric in ("total_time_ms", "dirty_rate"):
            ratios = [on[p][metric] / off[p][metric] for p in on if p in off and on[p][metric] and off[p][metric]]
            m[metric] = {"on": B.summary([r[metric] for r in on.values()]),
                         "off": B.summary([r[metric] for r in off.values()]),
                         "ratio_on_off": B.summary(ratios)}
            rows.append([mode, metric, B.fmt(m[metric]["off"]), B.fmt(m[metric]["on"]),
                         B.fmt(m[metric]["ratio_on_off"], digits=3)])
        m["lost_events_total"] = sum(r["lost_total"] for r in on.values())
        m["records"] = B.summary([r["records"] or 0 for r in on.values()])
        m["lost_pages"] = {"on": [r["lost_pages"] for r in on.values()], "off": [r["lost_pages"] for r in off.values()]}
        rows.append([mode, "probe lost events (sum)", "-", str(m["lost_events_total"]), "-"])
        rows.append([mode, "probe records/run", "-", B.fmt(m["records"]), "-"])
        res["modes"][mode] = m
    print(B.table(rows, ["mode", "metric", "probe off median (min-max)", "probe on", "on/off per pair"]))
    B.write("bench_lab_overhead" + ("_quick" if a.quick else ""), res, a.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
