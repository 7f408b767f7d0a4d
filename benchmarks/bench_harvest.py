#!/usr/bin/env python3
"""Per-page volume: a 64 GiB guest's dirty bitmap (16 M pages) expanded into gfns.

The probe stores only nonzero 64-bit bitmap words (``bitmap_words``: 262,144 rows for a 64 GiB slot
with every page dirty, e.g. the first GET of a manual-protect slot with INITIALLY_SET).  Measured in
one run, alternating:

* ``harvest.word_ops``: the compact ops the analysis keeps (pagestate; a fully dirty slot is one range op),
  from per-word rows (schema 1) and from one run-length row (schema 2 ``nwords``);
* ``harvest.bitmap_pages`` (numpy ``unpackbits`` + slot->gfn mapping -> one DataFrame of int64 columns);
* ``harvest.popcount`` (page counts per word, no expansion: what sync-size statistics need);
* baseline: the naive per-page expansion (a Python list of gfn ints, one object per page).

Peak memory is taken with tracemalloc (numpy reports its buffers to it), separately from the timing runs.

    benchmarks/bench_harvest.py                 # 64 GiB, all dirty and 10 % dirty, 3 reps
    benchmarks/bench_harvest.py --quick         # 1 GiB, 1 rep
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as B  # noqa: E402

from hintscope.analysis import harvest, memslots as ms, pagestate as ps  # noqa: E402

GPA = 1 << 32   # the slot sits at 4 GiB, so gfn = page + 0x100000


def words_frame(pages: int, density: float, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    nwords = pages // 64
    if density >= 1:
        mask = np.full(nwords, np.uint64(2**64 - 1))
    else:
        bits = rng.random((nwords, 64)) < density
        mask = np.packbits(bits, axis=1, bitorder="little").view("<u8").reshape(-1)
    keep = mask != 0
    n = int(keep.sum())
    words = pd.DataFrame({"ts_ns": np.full(n, 10**12, np.int64), "seq": np.full(n, 7, np.int64),
                          "op": np.full(n, "get", dtype=object), "slot": np.full(n, 1, np.int32),
                          "word": np.flatnonzero(keep).astype(np.int64), "mask": mask[keep]})
    ev = pd.DataFrame({"ts_ns": [0], "as_id": [0], "slot": [1], "flags": [1], "gpa": [GPA],
                       "size": [pages * 4096], "hva": [0x7F0000000000]}).astype(np.int64)
    return words, ms.intervals(ev)


def bulk(words, iv):
    df = harvest.bitmap_pages(words, "get", iv)
    return len(df), int(df["gfn"].iloc[-1])


def compact(words, iv):
    """What the analysis keeps (pagestate ops: a fully dirty run is one range op), plus the page count
    and the last gfn read off the ops without expanding them."""
    index = ps.GfnIndex.from_intervals(iv)
    ops = harvest.word_ops(words, "get", iv, index)
    last = int(index.to_gfn(np.array([ops.g0[-1] + ops.n[-1] - 1]))[0]) if len(ops) else -1
    return ops.pages, last


def counts(words, iv):
    return int(harvest.popcount(words["mask"].to_numpy()).sum()), None


def naive(words, iv):
    base = GPA >> 12
    gfns = []
    for w, m in zip(words["word"].tolist(), words["mask"].tolist()):
        for b in range(64):
            if (m >> b) & 1:
                gfns.append(base + w * 64 + b)
    return len(gfns), gfns[-1]


def peak(fn, *args) -> float:
    tracemalloc.start()
    tracemalloc.reset_peak()
    r = fn(*args)
    cur, pk = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del r
    return pk


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gib", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("-o", "--output")
    a = ap.parse_args()
    gib, reps = (1, 1) if a.quick else (a.gib, a.reps)
    pages = gib << 18
    rng = np.random.default_rng(1)
    res = {"benchmark": "harvest", "guest_gib": gib, "pages": pages, "reps": reps, "quick": a.quick, "cases": {}}
    rows = []
    fns = {"compact ops (analysis)": compact, "bitmap_pages (numpy)": bulk, "popcount only": counts,
           "naive per-page list": naive}
    for density in (1.0, 0.1):
        words, iv = words_frame(pages, density, rng)
        want = int(harvest.popcount(words["mask"].to_numpy()).sum())
        t = {k: [] for k in fns}
        for rep in range(reps):
            order = list(fns) if rep % 2 == 0 else list(reversed(fns))
            for k in order:
                t0 = time.perf_counter()
                n, last = fns[k](words, iv)
                t[k].append(time.perf_counter() - t0)
                assert n == want, (k, n, want)
        mem = {k: peak(fns[k], words, iv) for k in fns}
        words_bytes = int(words.memory_usage(deep=True).sum())
        case = {"density": density, "dirty_pages": want, "word_rows": len(words), "words_frame_bytes": words_bytes,
                "packed_bitmap_bytes": pages // 8}
        if density >= 1:
            # schema 2: the same slot as one run-length row (nwords); the compact path keeps it one op
            run = words.iloc[:1].assign(nwords=len(words))
            t_run = []
            for _ in range(reps):
                t0 = time.perf_counter()
                n, _ = compact(run, iv)
                t_run.append(time.perf_counter() - t0)
                assert n == want
            case["compact ops, one nwords run"] = {"seconds": B.summary(t_run), "peak_bytes": peak(compact, run, iv)}
        for k in fns:
            s = B.summary(t[k])
            ratio = B.summary([x / y for x, y in zip(t["naive per-page list"], t[k])])
            case[k] = {"seconds": s, "peak_bytes": mem[k], "naive_over_this": ratio,
                       "pages_per_s": want / s["median"]}
            rows.append([f"{density:.0%}", f"{want:,}", k, B.fmt(s), f"{want / s['median'] / 1e6:.1f}",
                         f"{mem[k] / 2**20:,.0f}", B.fmt(ratio)])
        res["cases"][f"density_{density}"] = case
        print(f"density {density:.0%}: {len(words):,} word rows, {words_bytes / 2**20:.1f} MiB as bitmap_words", flush=True)
    print(f"{gib} GiB slot = {pages:,} pages, {reps} reps, median (min-max)")
    print(B.table(rows, ["dirty", "pages", "method", "seconds", "M pages/s", "peak MiB", "naive time / this"]))
    B.write("bench_harvest" + ("_quick" if a.quick else ""), res, a.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
