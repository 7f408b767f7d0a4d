"""Run bundle v1: the one on-disk format every probe writes and every analysis reads.

A bundle is a directory::

    meta.json                      written by the producer that created the bundle
    meta-<producer>.json           written by each producer that joined it later (append=True)
    <table>/part-<producer>-NNNNN.parquet

Parts are written atomically (temporary file, fsync, rename, fsync of the directory), so a
capture that is killed keeps every part flushed before the kill; ``meta.json`` says
``status: running`` until the producer closes it.  See docs/bundle.md.
"""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from hintscope import __version__, schema
from hintscope.errors import BundleError

META = "meta.json"
# A meta file bigger than this is not something hintscope wrote.
MAX_META_BYTES = 16 << 20
_PART_RE = re.compile(r"^part-([A-Za-z0-9_.-]+)-(\d{5,})\.parquet$")


def clock_anchor(label: str) -> dict[str, int | str]:
    """A CLOCK_MONOTONIC / CLOCK_REALTIME pair, taken as close together as Python allows.

    The realtime read is bracketed by two monotonic reads; their midpoint is the anchor and
    half their distance its uncertainty.
    """
    m0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    r = time.clock_gettime_ns(time.CLOCK_REALTIME)
    m1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    return {"label": label, "monotonic_ns": (m0 + m1) // 2, "realtime_ns": r, "uncertainty_ns": (m1 - m0 + 1) // 2}


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "x"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=_json_default)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def to_arrow(table: str, frame: pd.DataFrame | Mapping[str, Any]) -> pa.Table:
    """Cast rows to the declared schema of ``table``; a column mismatch is a programming error."""
    t = schema.get(table)
    cols = list(frame.columns) if isinstance(frame, pd.DataFrame) else list(frame.keys())
    missing = [c for c in t.names if c not in cols]
    extra = [c for c in cols if c not in t.names]
    if missing or extra:
        raise ValueError(f"table {table}: missing columns {missing}, unknown columns {extra}")
    arrays = []
    for c in t.cols:
        v = frame[c.name]
        if isinstance(v, pd.Series):
            v = v.to_numpy()
        arrays.append(pa.array(v, type=c.arrow_type, from_pandas=True))
    return pa.Table.from_arrays(arrays, schema=t.arrow_schema)


class BundleWriter:
    """Writes one producer's share of a bundle; see the module docstring for the layout."""

    def __init__(self, path: str | os.PathLike, producer: str, append: bool = False):
        self.path = Path(path)
        self.producer = producer
        self._slug = _slug(producer)
        self._buf: dict[str, list[pa.Table]] = {}
        self._parts: dict[str, int] = {}
        self.rows: dict[str, int] = {}
        self.path.mkdir(parents=True, exist_ok=True)
        if append:
            if not (self.path / META).exists():
                raise BundleError(f"{self.path}: cannot append, no {META}")
            self.meta_path = self.path / f"meta-{self._slug}.json"
        else:
            if (self.path / META).exists():
                raise BundleError(f"{self.path}: a bundle already exists there (choose another -o)")
            self.meta_path = self.path / META
        self.meta: dict[str, Any] = {
            "producer": producer,
            "status": "running",
            "sources": {},
            "lost": {},
            "clock_anchors": [clock_anchor("start")],
        }
        if not append:
            self.meta.update({
                "schema": schema.SCHEMA_NAME,
                "schema_version": schema.SCHEMA_VERSION,
                "hintscope_version": __version__,
                "created_realtime_ns": time.time_ns(),
                "host": {"kernel": platform.release(), "hostname": socket.gethostname(), "machine": platform.machine()},
            })
        self._write_meta()

    # -- producer API -------------------------------------------------------------------
    def set_source(self, name: str, status: str, reason: str | None = None, **details: Any) -> None:
        if status not in ("captured", "partial", "unavailable"):
            raise ValueError(f"bad source status {status}")
        entry = self.meta["sources"].setdefault(name, {})
        entry.update(details)
        entry["status"] = status
        entry["reason"] = reason

    def add_lost(self, source: str, n: int) -> None:
        self.meta["lost"][source] = int(self.meta["lost"].get(source, 0)) + int(n)

    def append(self, table: str, frame: pd.DataFrame | Mapping[str, Any]) -> None:
        at = to_arrow(table, frame)
        if at.num_rows:
            self._buf.setdefault(table, []).append(at)
            self.rows[table] = self.rows.get(table, 0) + at.num_rows

    def flush(self) -> None:
        for table, chunks in list(self._buf.items()):
            if not chunks:
                continue
            self._write_part(table, pa.concat_tables(chunks))
            self._buf[table] = []
        self._write_meta()

    def close(self, end_reason: str) -> None:
        try:
            self.flush()
        finally:
            self.meta["clock_anchors"].append(clock_anchor("end"))
            self.meta["status"] = "complete"
            self.meta["end_reason"] = end_reason
            self.meta["rows"] = dict(sorted(self.rows.items()))
            self._write_meta()

    def attach_file(self, name: str) -> Path:
        """Path for a raw file stored with the bundle (e.g. a QEMU trace log)."""
        p = self.path / "files"
        p.mkdir(exist_ok=True)
        return p / _slug(name)

    # -- internals -----------------------------------------------------------------------
    def _write_part(self, table: str, at: pa.Table) -> None:
        d = self.path / table
        d.mkdir(exist_ok=True)
        n = self._parts.get(table)
        if n is None:
            n = 1 + max((int(m.group(2)) for f in d.iterdir()
                         if (m := _PART_RE.match(f.name)) and m.group(1) == self._slug), default=-1)
        final = d / f"part-{self._slug}-{n:05d}.parquet"
        tmp = d / f".{final.name}.tmp"
        with open(tmp, "wb") as f:
            pq.write_table(at, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(d)
        self._parts[table] = n + 1

    def _write_meta(self) -> None:
        write_json_atomic(self.meta_path, self.meta)


def _merge_meta(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for k, v in extra.items():
        if k in ("sources", "lost") and isinstance(v, dict):
            base.setdefault(k, {}).update(v)
        elif k == "clock_anchors" and isinstance(v, list):
            base.setdefault(k, []).extend(v)
        elif k in ("producer", "status", "end_reason", "rows"):
            base.setdefault("producers", {}).setdefault(extra.get("producer", "?"), {})[k] = v
        elif k not in base:
            base[k] = v


def _read_json(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
        if size > MAX_META_BYTES:
            raise BundleError(f"{path}: {size} bytes, larger than any meta file hintscope writes")
        obj = json.loads(path.read_bytes())
    except BundleError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BundleError(f"{path}: unreadable meta ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise BundleError(f"{path}: meta is a JSON {type(obj).__name__}, expected an object")
    return obj


@dataclass
class Bundle:
    path: Path
    meta: dict[str, Any]
    problems: list[str] = field(default_factory=list)
    _cache: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)

    @property
    def complete(self) -> bool:
        """True when every producer closed its share (a killed capture leaves ``running``)."""
        statuses = [self.meta.get("status")] + [p.get("status") for p in self.meta.get("producers", {}).values()]
        return all(s == "complete" for s in statuses)

    def tables(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if p.is_dir() and p.name in schema.all_tables())

    def has(self, name: str) -> bool:
        d = self.path / name
        return d.is_dir() and any(_PART_RE.match(f.name) for f in d.iterdir())

    def file(self, name: str) -> Path | None:
        p = self.path / "files" / name
        return p if p.is_file() else None

    def table(self, name: str) -> pd.DataFrame:
        """All rows of ``name`` with the schema's dtypes; empty frame when the bundle lacks it.

        A damaged part is skipped and noted in :attr:`problems`: the other parts still load.
        """
        if name in self._cache:
            return self._cache[name]
        t = schema.get(name)
        parts = []
        d = self.path / name
        files = sorted(f for f in d.iterdir() if _PART_RE.match(f.name)) if d.is_dir() else []
        for f in files:
            try:
                at = pq.read_table(f)
                at = self._conform(t, at, f)
            except BundleError as e:
                self.problems.append(str(e))
                continue
            except Exception as e:  # pyarrow raises many types on hostile bytes
                self.problems.append(f"{f}: unreadable Parquet part ({type(e).__name__}: {str(e)[:160]}), skipped")
                continue
            parts.append(at)
        at = pa.concat_tables(parts) if parts else t.arrow_schema.empty_table()
        df = at.to_pandas()
        if "ts_ns" in df.columns and len(parts) > 1:
            df = df.sort_values("ts_ns", kind="stable", ignore_index=True)
        self._cache[name] = df
        return df

    @staticmethod
    def _conform(t: schema.Table, at: pa.Table, f: Path) -> pa.Table:
        missing = [c for c in t.names if c not in at.column_names]
        if missing:
            raise BundleError(f"{f}: missing columns {missing}, part skipped")
        cols = []
        for c in t.cols:
            col = at.column(c.name)
            if col.type != c.arrow_type:
                try:
                    col = col.cast(c.arrow_type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    raise BundleError(f"{f}: column {c.name} is {col.type}, expected {c.dtype}; part skipped") from None
            cols.append(col)
        return pa.Table.from_arrays(cols, schema=t.arrow_schema)


def read_bundle(path: str | os.PathLike) -> Bundle:
    """Open a bundle; raises :class:`BundleError` (one line) when it cannot be used at all."""
    p = Path(path)
    if not p.exists():
        raise BundleError(f"{p}: no such bundle")
    if not p.is_dir():
        raise BundleError(f"{p}: not a bundle directory")
    if not (p / META).is_file():
        raise BundleError(f"{p}: not a hintscope bundle (no {META})")
    meta = _read_json(p / META)
    if meta.get("schema") != schema.SCHEMA_NAME:
        raise BundleError(f"{p / META}: schema is {str(meta.get('schema'))[:60]!r}, expected {schema.SCHEMA_NAME!r}")
    version = str(meta.get("schema_version", ""))
    major = version.split(".")[0]
    if not major.isdigit() or int(major) != schema.SCHEMA_MAJOR:
        raise BundleError(f"{p / META}: schema version {version[:20]!r} is not supported "
                          f"(this hintscope reads {schema.SCHEMA_MAJOR}.x)")
    b = Bundle(p, meta)
    for extra in sorted(p.glob("meta-*.json")):
        try:
            _merge_meta(meta, _read_json(extra))
        except BundleError as e:
            b.problems.append(str(e))
    if not b.complete:
        b.problems.append(f"{p}: capture did not finish (a producer never closed the bundle)")
    return b


def mono_from_wall(meta: Mapping[str, Any], wall_ns: np.ndarray) -> np.ndarray:
    """Map CLOCK_REALTIME ns onto CLOCK_MONOTONIC ns through the bundle's clock anchors.

    With two or more anchors the offset is interpolated linearly in time (NTP slew); with
    one it is constant.
    """
    anchors = sorted(meta.get("clock_anchors", []), key=lambda a: a["realtime_ns"])
    if not anchors:
        raise BundleError("bundle meta has no clock anchors; cannot map wall-clock events")
    r = np.array([a["realtime_ns"] for a in anchors], dtype=np.float64)
    off = np.array([a["monotonic_ns"] - a["realtime_ns"] for a in anchors], dtype=np.float64)
    w = np.asarray(wall_ns, dtype=np.int64)
    return w + np.rint(np.interp(w.astype(np.float64), r, off)).astype(np.int64)
