#!/usr/bin/env python3
"""Decode rate: ring-buffer record bytes -> pandas DataFrames, bulk numpy vs per-record callbacks.

Input: synthetic 96-byte ring slots exactly as host.bpf.c writes them (``decode.synthetic_records``).

* bulk: ``decode.decode(buf)`` -> one pandas DataFrame per table (the goal's "into DataFrames");
* arrow (what the probe does per poll): ``decode.decode`` + ``bundle.to_arrow`` (BundleWriter.append);
* baseline (what BCC's ``open_ring_buffer`` does): C calls a ctypes callback once per record (a tiny
  C driver compiled here with gcc walks the buffer like libbpf's ``ring_buffer__poll``); the Python
  handler casts to a ctypes Structure, reads the fields and appends a tuple; a DataFrame is built
  from the tuples at the end.

Bulk and baseline alternate within each repetition; the ratio is taken per repetition.

    benchmarks/bench_decode.py                 # 1 M records per kind, 5 reps
    benchmarks/bench_decode.py --quick         # 20 k records, 2 reps
"""

from __future__ import annotations

import argparse
import ctypes as ct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as B  # noqa: E402

from hintscope.bundle import to_arrow  # noqa: E402
from hintscope.probes import decode as D  # noqa: E402

DRIVER_C = r"""
#include <stddef.h>
typedef int (*cb_t)(void *ctx, void *data, size_t size);
/* Like libbpf ring_buffer__poll: one callback per committed record, data after the 8-byte header. */
long drive(cb_t cb, char *buf, long n, long stride) {
    long i;
    for (i = 0; i < n; i++)
        if (cb(NULL, buf + i * stride + 8, (size_t)(stride - 8)) < 0) break;
    return i;
}
"""
CB = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_size_t)


class Hdr(ct.Structure):
    _fields_ = [("type", ct.c_uint16), ("aux", ct.c_uint16), ("tid", ct.c_uint32), ("ts", ct.c_uint64)]


class RingRec(ct.Structure):
    _fields_ = [("h", Hdr), ("vcpu", ct.c_int32), ("dirty_index", ct.c_uint32), ("reset_index", ct.c_uint32),
                ("slot", ct.c_uint32), ("offset", ct.c_uint64)]


class IoctlRec(ct.Structure):
    _fields_ = [("h", Hdr), ("enter_ns", ct.c_uint64), ("seq", ct.c_uint32), ("cmd", ct.c_uint32),
                ("fd", ct.c_int32), ("slot", ct.c_int32), ("ret", ct.c_int64),
                ("a0", ct.c_uint64), ("a1", ct.c_uint64), ("a2", ct.c_uint64), ("a3", ct.c_uint64)]


class QemuRec(ct.Structure):
    _fields_ = [("h", Hdr), ("a0", ct.c_uint64), ("a1", ct.c_uint64), ("a2", ct.c_uint64), ("ret", ct.c_int64)]


def load_driver(work: Path) -> ct.CDLL:
    src = work / "drive.c"
    src.write_text(DRIVER_C)
    so = work / "drive.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(so), str(src)], check=True)
    lib = ct.CDLL(str(so))
    lib.drive.argtypes = [CB, ct.c_char_p, ct.c_long, ct.c_long]
    lib.drive.restype = ct.c_long
    return lib


def baseline(lib: ct.CDLL, buf: bytes, kind: str) -> pd.DataFrame:
    rows: list[tuple] = []
    append = rows.append
    if kind == "ring_push":
        P = ct.POINTER(RingRec)

        def handler(ctx, data, size):
            r = ct.cast(data, P).contents
            append((r.h.ts, r.h.tid, r.vcpu, r.dirty_index, r.reset_index, r.slot, r.offset))
            return 0
        cols = ["ts_ns", "tid", "vcpu", "dirty_index", "reset_index", "slot", "offset"]
    elif kind == "ioctl":
        P = ct.POINTER(IoctlRec)

        def handler(ctx, data, size):
            r = ct.cast(data, P).contents
            append((r.h.ts, r.enter_ns, r.h.tid, r.seq, r.fd, r.cmd, r.slot, r.ret, r.a0, r.a1, r.a2, r.a3))
            return 0
        cols = ["ts_ns", "enter_ns", "tid", "seq", "fd", "cmd", "slot", "ret", "a0", "a1", "a2", "a3"]
    else:
        P = ct.POINTER(QemuRec)

        def handler(ctx, data, size):
            r = ct.cast(data, P).contents
            append((r.h.ts, r.h.tid, r.h.aux, r.a0, r.a1, r.a2, r.ret))
            return 0
        cols = ["ts_ns", "tid", "event", "a0", "a1", "a2", "ret"]
    n = lib.drive(CB(handler), buf, len(buf) // D.STRIDE, D.STRIDE)
    assert n == len(buf) // D.STRIDE
    return pd.DataFrame.from_records(rows, columns=cols)


def bulk(buf: bytes) -> dict[str, pd.DataFrame]:
    d = D.decode(buf)
    return {t: pd.DataFrame(cols) for t, cols in d.tables.items()}


def arrow(buf: bytes) -> dict:
    """What the probe does per poll: decode, then BundleWriter.append's cast to the Arrow schema."""
    d = D.decode(buf)
    return {t: to_arrow(t, cols) for t, cols in d.tables.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("-n", type=int, default=1_000_000, help="records per kind")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("-o", "--output")
    a = ap.parse_args()
    n, reps = (20_000, 2) if a.quick else (a.n, a.reps)
    kinds = ["ring_push", "ioctl", "qemu", "bitmap"]
    with tempfile.TemporaryDirectory(prefix="hs-perf-dec-") as work:
        lib = load_driver(Path(work))
        bufs = {k: D.synthetic_records(k, n) for k in kinds}
        rates = {k: {"bulk": [], "arrow": [], "callback": [], "ratio": []} for k in kinds}
        for rep in range(reps):
            for k in kinds:
                buf = bufs[k]
                order = ("bulk", "arrow", "callback") if rep % 2 == 0 else ("callback", "arrow", "bulk")
                t = {}
                for what in order:
                    if what == "callback" and k == "bitmap":
                        continue   # bitmap records expand to words; only the bulk path is measured
                    t0 = time.perf_counter()
                    out = {"bulk": bulk, "arrow": arrow}[what](buf) if what != "callback" else baseline(lib, buf, k)
                    t[what] = time.perf_counter() - t0
                    rows = sum(df.shape[0] for df in out.values()) if isinstance(out, dict) else len(out)
                    assert rows > 0
                    rates[k][what].append(n / t[what])
                if "callback" in t:
                    rates[k]["ratio"].append(t["callback"] / t["bulk"])
    res = {"benchmark": "decode", "records_per_kind": n, "reps": reps, "quick": a.quick, "kinds": {}}
    rows = []
    for k in kinds:
        s = {w: B.summary(v) for w, v in rates[k].items()}
        res["kinds"][k] = s | {"raw": rates[k]}
        rows.append([k, B.fmt(s["bulk"], 1e-6), B.fmt(s["arrow"], 1e-6), B.fmt(s["callback"], 1e-6), B.fmt(s["ratio"])])
    print(f"{n} records per kind, {reps} reps (median (min-max))")
    print(B.table(rows, ["records", "bulk -> DataFrames M rec/s", "bulk -> Arrow (probe path)", "ctypes callback -> DataFrame", "speed-up DataFrames bulk/callback"]))
    B.write("bench_decode" + ("_quick" if a.quick else ""), res, a.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
