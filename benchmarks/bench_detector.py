#!/usr/bin/env python3
"""Detector throughput on a synthetic dirty-ring capture: 10 M ring pushes, 100 k hinted pages.

The tables are generated directly (numpy), with the same schema the probes write: the simulator
is a per-event model and would take minutes at this size.  Measured in one run:

* write: BundleWriter -> Parquet (not part of the figure of merit);
* load: read_bundle + every table the detector reads;
* detect: ``detector.detect`` + ``verdict`` on the loaded bundle;
* wall and CPU (process) time are both reported: on a shared machine the wall time mostly measures
  the other tenants (``loadavg_1m`` is recorded);
* polars: ``join_asof`` of the same sizes (pushes x hinted pages, by gfn and plain), the anchor the
  detector's time is compared with (docs/detector.md).

    benchmarks/bench_detector.py                   # 10 M pushes, writes bench_detector.json
    benchmarks/bench_detector.py --quick           # 200 k pushes, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import warnings

import numpy as np
import pandas as pd

from hintscope.analysis import detector
from hintscope.bundle import BundleWriter, read_bundle

HVA = 0x7F00_0000_0000
CMD_ID_MIN = 0x80000000


def synth(n_push: int, n_hint_pages: int, pages: int, syncs: int = 20, order: int = 4, seed: int = 0) -> dict:
    """Frames of a ring-mode QEMU capture: syncs, pushes, sends, hint applies, guest hints and reuse."""
    rng = np.random.default_rng(seed)
    t0 = 5_000_000_000_000
    ep = 50_000_000                                       # 50 ms epochs
    before = t0 + 1_000_000 + np.arange(syncs) * ep
    fb, fe, after = before + 5_000, before + 2_000_000, before + 2_010_000
    q = []

    def ev(ts, name, a0=0, a1=0, a2=0, tid=4001):
        ts = np.asarray(ts, np.int64)
        q.append(pd.DataFrame({"ts_ns": ts, "tid": np.int32(tid), "event": name, "a0": np.asarray(a0, np.uint64),
                               "a1": np.asarray(a1, np.uint64), "a2": np.asarray(a2, np.uint64), "ret": np.int64(0)}))

    ev(before, "precopy_notify", 0, 1); ev(after, "precopy_notify", 0, 2)
    ev(fb, "sync_fetch_begin"); ev(fe, "sync_fetch_end"); ev(after + 1, "notify_config")
    ev([t0 + 500_000], "migrate_state", 0, 0, 1); ev([before[-1] + ep], "migrate_state", 0, 4, 8)
    # dirty-ring pushes, spread over the epochs, reset at each fetch
    pts = np.sort(rng.integers(t0 + 1_000_000, before[-1], n_push))
    push = pd.DataFrame({"ts_ns": pts, "tid": np.int32(4010), "vcpu": rng.integers(0, 2, n_push).astype(np.int32),
                         "dirty_index": np.arange(n_push, dtype=np.uint32), "reset_index": np.uint32(0),
                         "slot": np.int32(0), "offset": rng.integers(0, pages, n_push).astype(np.uint64)})
    ioctls = pd.DataFrame({"ts_ns": fb + 1_000_000, "enter_ns": fb + 10_000, "tid": np.int32(4001),
                           "seq": np.arange(syncs, dtype=np.int64) + 10, "fd": np.int32(12),
                           "cmd": np.uint32(0xAEC7), "name": "RESET_DIRTY_RINGS", "slot": np.int32(-1), "ret": 0,
                           "first_page": -1, "num_pages": -1, "pages": -1, "cap": -1, "arg0": np.uint64(0)})
    # every page sent once in the bulk round, dirty pages resent after each sync
    bulk = after[0] + np.arange(pages, dtype=np.int64) * 10
    ev(bulk, "page_send", HVA + np.arange(pages, dtype=np.int64) * 4096, 4096)
    # guest hints (blocks of 2^order pages) applied 20-200 us later in epoch 1..syncs-1
    nb = n_hint_pages >> order
    blocks = rng.choice(pages >> order, nb, replace=False)
    e = rng.integers(0, syncs - 1, nb)
    add = after[e] + 100_000 + rng.integers(0, 30_000_000, nb)
    app = add + rng.integers(20_000, 200_000, nb)
    ev(app, "hint_apply", HVA + blocks * (4096 << order), 4096 << order, tid=4002)
    ev(app + 15_000, "hint_apply_ret", tid=4002)
    qe = pd.concat(q, ignore_index=True).sort_values("ts_ns", kind="stable", ignore_index=True)
    delta = 3_600_000_000_000
    gh = pd.DataFrame({"guest_ns": add - delta, "side": "src", "tid": np.int32(300),
                       "pfn": (blocks << order).astype(np.uint64), "order": np.int32(order),
                       "cmd_id": (CMD_ID_MIN + 1 + e).astype(np.uint32), "run": e.astype(np.int32)})
    reads = after + 30_000 - delta
    ge = pd.DataFrame({"guest_ns": np.r_[reads - 10_000, reads], "seq": np.arange(2 * syncs, dtype=np.int64),
                       "side": "src", "cpu": np.int32(0), "tid": np.int32(300),
                       "event": ["config_changed"] * syncs + ["cmd_id"] * syncs,
                       "a0": np.r_[np.zeros(syncs), CMD_ID_MIN + 1 + np.arange(syncs)].astype(np.uint64),
                       "a1": np.uint64(0), "a2": np.uint64(0)}).sort_values("guest_ns", ignore_index=True)
    nr = max(1, nb // 10)
    ri = rng.choice(nb, nr, replace=False)
    ret = add[ri] + 5_000
    gr = pd.DataFrame({"guest_ns": ret - delta, "side": "src", "tid": np.int32(300), "pfn": gh["pfn"].to_numpy()[ri],
                       "order": np.int32(order), "reason": "shrinker"})
    gu = pd.DataFrame({"guest_ns": ret + 10_000 - delta, "side": "src", "tid": np.int32(300),
                       "pfn": gh["pfn"].to_numpy()[ri], "order": np.int32(order), "gfp": np.uint64(0xCC0),
                       "block_pfn": gh["pfn"].to_numpy()[ri], "returned_ns": ret - delta})
    ms = pd.DataFrame({"ts_ns": [t0], "tid": np.int32(4000), "seq": [1], "slot": np.int32(0), "as_id": np.int32(0),
                       "flags": np.uint32(1), "gpa": np.uint64(0), "size": np.uint64(pages * 4096),
                       "hva": np.uint64(HVA), "ret": [0]})
    rr = pd.DataFrame({"ts_ns": np.repeat(fb + 1_000_000, 2), "tid": np.int32(4001),
                       "vcpu": np.tile([0, 1], syncs).astype(np.int32), "dirty_index": np.uint32(0),
                       "reset_index": np.uint32(0)})
    return {"qemu_events": qe, "ring_push": push, "ring_reset": rr, "ioctls": ioctls, "memslots": ms,
            "guest_hints": gh, "guest_events": ge, "guest_returns": gr, "guest_reuse": gu}


def polars_anchor(push: pd.DataFrame, hint_pages: int, order: int, repeat: int = 3) -> dict:
    import polars as pl
    warnings.filterwarnings("ignore", message="Sortedness of columns")
    rng = np.random.default_rng(1)
    left = pl.DataFrame({"ts": push["ts_ns"].to_numpy(), "gfn": push["offset"].to_numpy().astype(np.int64)})
    rts = np.sort(rng.integers(int(left["ts"].min()), int(left["ts"].max()), hint_pages))
    right = pl.DataFrame({"ts": rts, "gfn": rng.integers(0, int(left["gfn"].max()) + 1, hint_pages),
                          "x": np.arange(hint_pages)})
    out = {}
    for name, kw in (("plain", {}), ("by_gfn", {"by": "gfn"})):
        best = np.inf
        for _ in range(repeat):
            t = time.perf_counter()
            if kw:
                r = left.sort(["gfn", "ts"]).join_asof(right.sort(["gfn", "ts"]), on="ts", **kw)
            else:
                r = left.join_asof(right.drop("gfn"), on="ts")
            best = min(best, time.perf_counter() - t)
        out[name] = best
        assert len(r) == len(left)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 200 k pushes, 10 k hinted pages")
    ap.add_argument("--pushes", type=int, default=None)
    ap.add_argument("--hint-pages", type=int, default=None)
    ap.add_argument("-o", "--output", default="bench_detector.json")
    ap.add_argument("--keep", help="keep the synthetic bundle here instead of a temporary directory")
    a = ap.parse_args(argv)
    n_push = a.pushes or (200_000 if a.quick else 10_000_000)
    n_hint = a.hint_pages or (10_000 if a.quick else 100_000)
    pages = max(1 << 16, n_push // 5)
    order = 4
    t = time.perf_counter()
    frames = synth(n_push, n_hint, pages, order=order)
    gen_s = time.perf_counter() - t
    tmp = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="hs-bench-"))
    path = tmp / "bundle"
    try:
        t = time.perf_counter()
        w = BundleWriter(path, producer="bench")
        for s in ("host_ioctl", "host_ring", "qemu_uprobes", "guest_probe"):
            w.set_source(s, "captured")
        for name, df in frames.items():
            w.append(name, df)
        w.close(end_reason="duration")
        write_s = time.perf_counter() - t
        t, c = time.perf_counter(), time.process_time()
        b = read_bundle(path)
        for name in frames:
            b.table(name)
        load_s, load_cpu = time.perf_counter() - t, time.process_time() - c
        t, c = time.perf_counter(), time.process_time()
        res = detector.run(b)
        f, v = res.frame, res.verdict
        detect_s, detect_cpu = time.perf_counter() - t, time.process_time() - c
        anchor = polars_anchor(frames["ring_push"], n_hint, order)
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    res = {
        "pushes": n_push, "hinted_pages": n_hint, "page_sends": pages, "guest_pages": pages,
        "generate_s": round(gen_s, 3), "write_s": round(write_s, 3), "load_s": round(load_s, 3),
        "detect_s": round(detect_s, 3), "load_cpu_s": round(load_cpu, 3), "detect_cpu_s": round(detect_cpu, 3),
        "loadavg_1m": round(os.getloadavg()[0], 2), "polars_join_asof_s": {k: round(x, 4) for k, x in anchor.items()},
        "detect_over_polars_by_gfn": round(detect_s / anchor["by_gfn"], 1),
        "detect_over_polars_plain": round(detect_s / anchor["plain"], 1),
        "events_per_s": round((n_push + pages) / detect_s),
        "findings": f["kind"].value_counts().to_dict(), "verdict": v,
        "python": platform.python_version(), "pandas": pd.__version__, "numpy": np.__version__,
        "cpus": os.cpu_count(), "quick": bool(a.quick),
    }
    Path(a.output).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
