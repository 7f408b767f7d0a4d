"""One run -> one index row: the per-bundle task every engine runs.

:func:`index_one` is the only function shipped to workers (processes or Dask).  It never raises:
a bundle that cannot be read or analysed becomes an error row naming the file and the reason,
so one damaged bundle never stops a batch.  Rows are Arrow tables of :data:`SCHEMA`, so results
from every engine concatenate without conversion.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import stat
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from hintscope.analysis.findings import HARD, LOST_KINDS, SEVERITY
from hintscope.fleet.labels import run_labels

# Labels with a column of their own (what a fleet groups by); others stay in labels_json.
LABELS = ["qemu", "qemu_build", "host_kernel", "guest", "guest_kernel", "guest_mb", "vcpus", "accel", "dirty_ring", "balloon",
          "hint", "workload", "variant", "seed", "producer"]
# Metrics (int64): migration and hinting numbers from the analysis summary, finding counts.
METRICS = ["total_time_ms", "downtime_ms", "transferred", "normal_pages", "syncs", "epochs", "harvested_pages",
           "hint_applies", "applied_pages", "skipped_pages", "late_pages", "resent_pages", "bytes_saved_upper_bound",
           "lost_writes", "findings", "hazards", "confirmed", "lost_write_findings", "lost_pages_found"]
KIND_COLS = {k: "kind_" + k.replace("-", "_") for k in SEVERITY}
TRUTH = ["sim_truth_lost", "sim_truth_lost_hint", "sim_truth_stale"]

SCHEMA = pa.schema(
    [("bundle", pa.string()), ("run", pa.string()), ("hash", pa.string()), ("status", pa.string()),
     ("error", pa.string()), ("date", pa.string()), ("created_ns", pa.int64()), ("indexed_ns", pa.int64()),
     ("analyze_s", pa.float64()), ("dirty_mode", pa.string()), ("verdict", pa.string()),
     ("verdict_class", pa.string()), ("outcome", pa.string())]
    + [(k, pa.string()) for k in LABELS] + [("labels_json", pa.string())]
    + [(m, pa.int64()) for m in METRICS] + [(c, pa.int64()) for c in KIND_COLS.values()]
    + [("by_kind_json", pa.string())] + [(t, pa.int64()) for t in TRUTH] + [("sim_safe_design", pa.bool_())])

_HASH_CHUNK = 1 << 20


def bundle_hash(path: str | os.PathLike) -> str:
    """blake2b over every regular file of the bundle (relative path, size, bytes), in path order.

    Symlinks and special files are not followed (a bundle is hostile input); their names still
    enter the hash, so replacing a file by a link changes it.  Raises OSError when unreadable.
    """
    root = Path(path)
    h = hashlib.blake2b(digest_size=16)
    st = root.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(f"{root}: not a bundle directory")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root)).encode()
            s = p.lstat()
            if not stat.S_ISREG(s.st_mode):
                h.update(b"L" + rel + b"\0")
                continue
            h.update(b"F" + rel + b"\0" + str(s.st_size).encode() + b"\0")
            with open(p, "rb") as fh:
                while chunk := fh.read(_HASH_CHUNK):
                    h.update(chunk)
    return h.hexdigest()


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def _date(ns: int | None) -> str:
    if not ns:
        return "unknown"
    return _dt.datetime.fromtimestamp(ns / 1e9, _dt.timezone.utc).strftime("%Y-%m-%d")


def _int(x: Any) -> int | None:
    return int(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x) < 2**62 else None


def error_row(path: str, reason: str, digest: str | None) -> pa.Table:
    """A run that could not be indexed; digest None makes the next index retry it."""
    row = {"bundle": str(path), "run": Path(path).name, "hash": digest, "status": "error", "error": reason,
           "date": "unknown", "indexed_ns": time.time_ns()}
    return pa.Table.from_pylist([row], schema=SCHEMA)


def _row(path: str, digest: str) -> dict[str, Any]:
    import json

    from hintscope.analysis import summary
    from hintscope.bundle import read_bundle

    t0 = time.perf_counter()
    b = read_bundle(path)
    res = summary.analyze(b)
    dt = time.perf_counter() - t0
    s, f = res["summary"], res["findings"]
    meta = b.meta
    labels = run_labels(meta)
    created = _int(meta.get("created_realtime_ns"))
    mig, hints = s.get("migration") or {}, s.get("hints") or {}
    mc = s.get("memcheck") or {}
    fr = f.frame
    hard = fr[fr["confidence"].isin(HARD)] if len(fr) else fr
    lost = hard[hard["kind"].isin(LOST_KINDS)] if len(hard) else hard
    v = str(f.verdict)
    row: dict[str, Any] = {
        "bundle": str(path), "run": Path(path).name, "hash": digest, "status": "ok", "error": None,
        "date": _date(created), "created_ns": created, "indexed_ns": time.time_ns(), "analyze_s": round(dt, 4),
        "dirty_mode": str(s.get("dirty_mode")), "verdict": v[:400],
        "verdict_class": "unsafe" if v.startswith("unsafe") else "safe" if v.startswith("no unsafe")
        else "inconclusive", "outcome": str(mig.get("outcome")),
        **{k: labels.get(k) for k in LABELS},
        "labels_json": json.dumps({k: v for k, v in labels.items() if k not in LABELS}, sort_keys=True),
        "total_time_ms": _int(mig.get("total_time_ms")), "downtime_ms": _int(mig.get("downtime_ms")),
        "transferred": _int(mig.get("transferred")), "normal_pages": _int(mig.get("normal")),
        "syncs": _int(s.get("syncs")), "epochs": _int(s.get("epochs")),
        "harvested_pages": _int(s.get("harvested_pages")), "hint_applies": _int(hints.get("applies")),
        "applied_pages": _int(hints.get("applied_pages")), "skipped_pages": _int(hints.get("skipped_pages")),
        "late_pages": _int(hints.get("late_pages")), "resent_pages": _int(hints.get("resent_pages")),
        "bytes_saved_upper_bound": _int(hints.get("bytes_saved_upper_bound")),
        "lost_writes": _int(mc.get("lost_writes")),
        "findings": int(len(fr)),
        "hazards": int((hard["severity"] == "safety").sum()) if len(hard) else 0,
        "confirmed": int((fr["confidence"] == "confirmed").sum()) if len(fr) else 0,
        "lost_write_findings": int(len(lost)),
        "lost_pages_found": int(lost["gfn_count"].sum()) if len(lost) else 0,
        "by_kind_json": json.dumps({str(k): int(n) for k, n in dict(f.by_kind).items()}, sort_keys=True),
    }
    for k, col in KIND_COLS.items():
        row[col] = int(dict(f.by_kind).get(k, 0))
    sim = meta.get("sim") if isinstance(meta.get("sim"), dict) else None
    truth = sim.get("truth") if sim and isinstance(sim.get("truth"), dict) else {}
    for t in TRUTH:
        row[t] = _int(truth.get(t.removeprefix("sim_truth_")))
    row["sim_safe_design"] = sim.get("safe_design") if sim and isinstance(sim.get("safe_design"), bool) else None
    return row


def index_one(path: str, digest: str | None = None) -> pa.Table:
    """The index row of one bundle (status "ok"), or an error row; never raises."""
    try:
        if digest is None:
            digest = bundle_hash(path)
    except OSError as e:
        return error_row(path, f"{path}: cannot read ({e.strerror or e})", None)
    try:
        return pa.Table.from_pylist([_row(path, digest)], schema=SCHEMA)
    except MemoryError:
        return error_row(path, f"{path}: out of memory while analysing", digest)
    except Exception as e:   # hostile input raises many types; the batch goes on
        return error_row(path, f"{path}: {_one_line(e)}", digest)
