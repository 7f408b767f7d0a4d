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
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hintscope import __version__, limits, schema
from hintscope.errors import BundleError

META = "meta.json"
# A meta file bigger than this is not something hintscope wrote.
MAX_META_BYTES = limits.MAX_META_BYTES
_PART_RE = re.compile(r"^part-([A-Za-z0-9_.-]+)-(\d{5,})\.parquet$")
# Test hook: seconds every flush that has rows to write first sleeps, standing in for a slow disk
# wherever the flush runs (tests/test_probe_host_writer.py).
SLOW_FLUSH_ENV = "HINTSCOPE_TEST_SLOW_FLUSH_S"


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
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a half-written tmp would only eat the space that is missing
        raise
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
    # a writer that predates a column with a declared old value (bitmap_words.nwords) writes that value
    n = len(frame) if isinstance(frame, pd.DataFrame) else (len(next(iter(frame.values()))) if len(frame) else 0)
    fill = {c.name: c.old_default for c in t.cols if c.name not in cols and c.old_default is not None}
    if fill:
        frame = {**{k: frame[k] for k in cols}, **{k: np.full(n, v) for k, v in fill.items()}}
        cols = list(frame)
    missing = [c for c in t.names if c not in cols]
    extra = [c for c in cols if c not in t.names]
    if missing or extra:
        raise ValueError(f"table {table}: missing columns {missing}, unknown columns {extra}")
    arrays = []
    for c in t.cols:
        v = frame[c.name]
        if isinstance(v, pd.Series):
            v = v.array if isinstance(v.dtype, pd.CategoricalDtype) else v.to_numpy()
        if isinstance(v, pd.Categorical):
            # Dictionary -> values in C; pa.array(categorical, type=string) builds Python strings.
            arrays.append(pa.array(v, from_pandas=True).cast(c.arrow_type))
            continue
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
        try:
            self._slow_flush_s = max(0.0, float(os.environ.get(SLOW_FLUSH_ENV) or 0))
        except ValueError:
            self._slow_flush_s = 0.0
        self.rows: dict[str, int] = {}
        self.unwritten: dict[str, int] = {}  # rows dropped because a part could not be written
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
        self._reserve = self._make_reserve()

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
        """Write one part per buffered table, then meta; BundleError (one line) when the disk refuses.

        Rows of a part that cannot be written are dropped and counted (meta ``unwritten_rows`` and
        ``lost["bundle_write"]``), so a full disk never makes the producer's memory grow.
        """
        failed = None
        if self._slow_flush_s and any(self._buf.values()):
            time.sleep(self._slow_flush_s)
        for table, chunks in list(self._buf.items()):
            if not chunks:
                continue
            at = pa.concat_tables(chunks)
            self._buf[table] = []
            try:
                self._write_part(table, at)
            except OSError as e:
                # Keep going: every table's rows must end up written or counted, or meta "rows"
                # (set by close() right after a failed flush) would claim rows that were never saved.
                self.unwritten[table] = self.unwritten.get(table, 0) + at.num_rows
                self.meta["unwritten_rows"] = dict(sorted(self.unwritten.items()))
                self.add_lost("bundle_write", at.num_rows)
                failed = failed or BundleError(f"{self.path / table}: cannot write part ({e.strerror or e}); "
                                               f"{at.num_rows} rows not saved")
        if failed is not None:
            raise failed
        self._write_meta()

    def close(self, end_reason: str) -> None:
        failed: BaseException | None = None
        try:
            self.flush()
        except BaseException as e:
            failed = e
            raise
        finally:
            if isinstance(failed, BundleError) and not end_reason.startswith("error"):
                end_reason = f"error: {failed} (capture was ending: {end_reason})"
            self.meta["clock_anchors"].append(clock_anchor("end"))
            self.meta["status"] = "complete"
            self.meta["end_reason"] = end_reason
            self.meta["rows"] = {t: n - self.unwritten.get(t, 0) for t, n in sorted(self.rows.items())}
            self._write_meta(final=True)
            self._drop_reserve()

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
        try:
            # Timestamps, sequence numbers and addresses mostly rise: delta encoding stores them
            # in a few bits each (a QEMU trace table shrinks about 6x against the default).
            ints = [fld.name for fld in at.schema if pa.types.is_integer(fld.type)]
            with open(tmp, "wb") as f:
                # Page CRCs: Parquet has no other data checksum, and a flipped bit would
                # otherwise change a value silently (docs/reliability.md).
                pq.write_table(at, f, compression="zstd", write_page_checksum=True,
                               use_dictionary=[c for c in at.column_names if c not in ints],
                               column_encoding={c: "DELTA_BINARY_PACKED" for c in ints})
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(d)
        self._parts[table] = n + 1

    def _write_meta(self, final: bool = False) -> None:
        try:
            write_json_atomic(self.meta_path, self.meta)
            return
        except OSError as e:
            err = e
        # The closing meta says how the capture ended: spend the space reserved for it.
        if final and self._drop_reserve():
            try:
                write_json_atomic(self.meta_path, self.meta)
                return
            except OSError as e:
                err = e
        raise BundleError(f"{self.meta_path}: cannot write meta ({err.strerror or err})")

    def _make_reserve(self) -> Path | None:
        """Space set aside at start so the closing meta can still be written on a full disk."""
        p = self.path / f".reserve-{self._slug}"
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, limits.META_RESERVE_BYTES)
            finally:
                os.close(fd)
            return p
        except OSError:
            p.unlink(missing_ok=True)
            return None

    def _drop_reserve(self) -> bool:
        p, self._reserve = getattr(self, "_reserve", None), None
        if p is None:
            return False
        p.unlink(missing_ok=True)
        return True


_I64 = (-(1 << 63), (1 << 63) - 1)


def _is_int(v: Any, lo: int = _I64[0], hi: int = _I64[1]) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _sanitize_meta(meta: dict[str, Any], path: Path, problems: list[str]) -> None:
    """Drop (and note) meta entries of the wrong shape in the keys this module and every reader rely on.

    Meta is hostile input too; without this a wrong type surfaces later as an AttributeError.
    """
    def note(what: str) -> None:
        problems.append(f"{path}: {what}, ignored")

    for k in ("status", "producer", "end_reason"):
        if k in meta and meta[k] is not None and not isinstance(meta[k], str):
            note(f"{k} is a JSON {type(meta[k]).__name__}, expected a string")
            meta[k] = "invalid" if k == "status" else str(meta[k])[:200]
    for k, ok in (("sources", lambda v: isinstance(v, dict)), ("producers", lambda v: isinstance(v, dict)),
                  ("lost", lambda v: _is_int(v, 0)), ("rows", lambda v: _is_int(v, 0))):
        if k not in meta:
            continue
        d = meta[k]
        if not isinstance(d, dict):
            note(f"{k} is a JSON {type(d).__name__}, expected an object")
            meta[k] = {}
            continue
        bad = [n for n, v in d.items() if not ok(v)]
        if bad:
            note(f"{len(bad)} malformed {k} entries (first {str(bad[0])[:60]!r})")
            meta[k] = {n: v for n, v in d.items() if n not in bad}
    if "clock_anchors" in meta:
        a = meta["clock_anchors"]
        if not isinstance(a, list):
            note(f"clock_anchors is a JSON {type(a).__name__}, expected a list")
            meta["clock_anchors"] = []
        else:
            good = [x for x in a if isinstance(x, dict) and _is_int(x.get("monotonic_ns"))
                    and _is_int(x.get("realtime_ns"))]
            if len(good) != len(a):
                note(f"{len(a) - len(good)} malformed clock anchors")
            meta["clock_anchors"] = good


def _merge_meta(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for k, v in extra.items():
        if k in ("sources", "lost") and isinstance(v, dict):
            base.setdefault(k, {}).update(v)
        elif k in ("clock_anchors", "problems") and isinstance(v, list) and isinstance(base.get(k, []), list):
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
        # NaN / Infinity are not JSON: read them as null.  ValueError also covers integers
        # longer than Python's int-string limit.
        obj = json.loads(path.read_bytes(), parse_constant=lambda _: None)
    except BundleError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BundleError(f"{path}: unreadable meta ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise BundleError(f"{path}: meta is a JSON {type(obj).__name__}, expected an object")
    return obj


@dataclass
class Bundle:
    path: Path
    meta: dict[str, Any]
    problems: list[str] = field(default_factory=list)
    # table -> what was left out of it (skipped parts, dropped rows): the analysis marks its source partial
    damaged: dict[str, list[str]] = field(default_factory=dict)
    major: int = schema.SCHEMA_MAJOR     # the bundle's schema major (older ones are upgraded on read)
    _cache: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)

    def _damage(self, table: str, what: str) -> None:
        self.problems.append(what)
        self.damaged.setdefault(table, []).append(what)

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
        if len(files) > limits.MAX_PARTS_PER_TABLE:
            self._damage(name, f"{d}: {len(files)} parts, more than {limits.MAX_PARTS_PER_TABLE}; "
                               f"the last {len(files) - limits.MAX_PARTS_PER_TABLE} parts were not read")
            files = files[: limits.MAX_PARTS_PER_TABLE]
        total = n_read = 0
        for f in files:
            try:
                at = self._read_part(t, f, limits.MAX_TABLE_ROWS - total)
                at = self._conform(t, at, f, self.major)
                at = self._drop_nulls(name, at, f)
            except BundleError as e:
                self._damage(name, str(e))
                continue
            except Exception as e:  # pyarrow raises many types on hostile bytes
                # One line: pyarrow messages carry newlines, and the text is attacker-shaped.
                msg = " ".join(f"{type(e).__name__}: {e}".split())[:200]
                self._damage(name, f"{f}: unreadable Parquet part ({msg}), skipped")
                continue
            total += at.num_rows
            parts.append(at)
            n_read += 1
            if len(parts) >= 256:
                # Thousands of tiny tables cost ~20 KB each in Arrow overhead: merge as we go.
                parts = [pa.concat_tables(parts).combine_chunks()]
        at = pa.concat_tables(parts) if parts else t.arrow_schema.empty_table()
        df = at.to_pandas()
        if "ts_ns" in df.columns and n_read > 1:
            df = df.sort_values("ts_ns", kind="stable", ignore_index=True)
        self._cache[name] = df
        return df

    @staticmethod
    def _read_part(t: schema.Table, f: Path, rows_left: int) -> pa.Table:
        """Read one part after checking, from its footer, that decoding it stays within the caps."""
        st = f.lstat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block, a symlink may point anywhere
            raise BundleError(f"{f}: not a regular file, skipped")
        with open(f, "rb") as fh:
            pf = pq.ParquetFile(fh, page_checksum_verification=True)
            md = pf.metadata
            if md.num_rows > min(limits.MAX_PART_ROWS, rows_left):
                raise BundleError(f"{f}: declares {md.num_rows} rows, more than the cap "
                                  f"({min(limits.MAX_PART_ROWS, rows_left)} left for this table); part skipped")
            size = sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups))
            if size > limits.MAX_PART_UNCOMPRESSED:
                raise BundleError(f"{f}: declares {size} uncompressed bytes, more than the cap "
                                  f"({limits.MAX_PART_UNCOMPRESSED}); part skipped")
            strings = [c.name for c in t.cols if c.dtype == "string" and c.name in pf.schema_arrow.names]
            # Strings stay dictionary-encoded until their decoded size is known (a repeated
            # long value is a compression bomb that the footer does not reveal).
            if strings:
                pf = pq.ParquetFile(fh, metadata=md, read_dictionary=strings, page_checksum_verification=True)
            at = pf.read()
        for c in strings:
            col = at.column(c)
            if pa.types.is_dictionary(col.type):
                n = 0
                for ch in col.chunks:
                    lens = pc.binary_length(ch.dictionary).fill_null(0)
                    n += pc.sum(pc.take(lens, ch.indices.fill_null(0))).as_py() or 0
                if n > limits.MAX_PART_UNCOMPRESSED:
                    raise BundleError(f"{f}: column {c} decodes to {n} bytes, more than the cap "
                                      f"({limits.MAX_PART_UNCOMPRESSED}); part skipped")
        return at

    def _drop_nulls(self, name: str, at: pa.Table, f: Path) -> pa.Table:
        """hintscope writes no nulls; rows with one are dropped (and counted), the rest kept."""
        if not any(c.null_count for c in at.columns):
            return at
        ok = None
        for c in at.columns:
            if c.null_count:
                v = pc.is_valid(c)
                ok = v if ok is None else pc.and_(ok, v)
        kept = at.filter(ok)
        self._damage(name, f"{f}: {at.num_rows - kept.num_rows} rows with missing values dropped")
        return kept

    @staticmethod
    def _conform(t: schema.Table, at: pa.Table, f: Path, major: int = schema.SCHEMA_MAJOR) -> pa.Table:
        # a column a later major added takes its declared old value in an older bundle
        upgraded = {c.name for c in t.cols if c.since > major and c.old_default is not None
                    and c.name not in at.column_names}
        missing = [c for c in t.names if c not in at.column_names and c not in upgraded]
        if missing:
            raise BundleError(f"{f}: missing columns {missing}, part skipped")
        cols = []
        for c in t.cols:
            if c.name in upgraded:
                cols.append(pa.array(np.full(at.num_rows, c.old_default), type=c.arrow_type))
                continue
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
    if not major.isdigit() or int(major) not in schema.READABLE_MAJORS:
        raise BundleError(f"{p / META}: schema version {version[:20]!r} is not supported "
                          f"(this hintscope reads {', '.join(f'{m}.x' for m in schema.READABLE_MAJORS)})")
    b = Bundle(p, meta, major=int(major))
    _sanitize_meta(meta, p / META, b.problems)
    meta.pop("producers", None)  # only merging below creates it; a foreign one would mask their status
    for extra in sorted(p.glob("meta-*.json")):
        try:
            em = _read_json(extra)
        except BundleError as e:
            b.problems.append(str(e))
            continue
        _sanitize_meta(em, extra, b.problems)
        em.pop("producers", None)
        if not isinstance(em.get("producer"), str):
            em["producer"] = extra.stem.removeprefix("meta-")
        _merge_meta(meta, em)
    if not b.complete:
        b.problems.append(f"{p}: capture did not finish (a producer never closed the bundle)")
    return b


def mono_from_wall(meta: Mapping[str, Any], wall_ns: np.ndarray) -> np.ndarray:
    """Map CLOCK_REALTIME ns onto CLOCK_MONOTONIC ns through the bundle's clock anchors.

    With two or more anchors the offset is interpolated linearly in time (NTP slew); with
    one it is constant.  Offsets and times are taken relative to the first anchor in int64, so
    only the small slew between anchors goes through float64: exact to the nanosecond (float64
    of the absolute ~1.8e18 values would be off by up to 256 ns).
    """
    anchors = sorted(meta.get("clock_anchors", []), key=lambda a: a["realtime_ns"])
    if not anchors:
        raise BundleError("bundle meta has no clock anchors; cannot map wall-clock events")
    # Anchors are read from meta (hostile input): refuse values whose arithmetic would leave int64
    # rather than wrap.  Real values are about 1.8e18 (2026); 2**62 leaves a century of headroom.
    lim = 1 << 62
    r_py = [int(a["realtime_ns"]) for a in anchors]
    off_py = [int(a["monotonic_ns"]) - int(a["realtime_ns"]) for a in anchors]
    if any(abs(x) >= lim for x in r_py + off_py) or any(abs(o - off_py[0]) >= 1 << 53 for o in off_py):
        raise BundleError("bundle meta clock anchors map wall-clock events outside the int64 ns range")
    r = np.array(r_py, dtype=np.int64)
    off = np.array(off_py, dtype=np.int64)
    w = np.asarray(wall_ns, dtype=np.int64)
    if len(w) and (np.abs(w.astype(np.float64)).max() >= 2.0**62
                   or np.abs(w.astype(np.float64) + float(off[0])).max() >= 2.0**62):
        raise BundleError("bundle meta clock anchors map wall-clock events outside the int64 ns range")
    # Times relative to the first anchor are exact in int64; outside the anchors np.interp holds the
    # end offset, so clipping to the anchor span first keeps the float conversion exact for anchors
    # less than 104 days (2**53 ns) apart.
    rel_r = r - r[0]
    rel_w = np.clip(w, r[0], r[-1]) - r[0]
    slew = np.rint(np.interp(rel_w.astype(np.float64), rel_r.astype(np.float64),
                             (off - off[0]).astype(np.float64))).astype(np.int64)
    return w + off[0] + slew
