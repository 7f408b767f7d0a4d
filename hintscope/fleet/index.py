"""``hintscope fleet index``: many bundles -> one Parquet dataset, one row per run, partitioned by date.

The index is a directory ``INDEX/date=YYYY-MM-DD/part-<batch>-<n>.parquet`` (hive partitioning,
schema :data:`hintscope.fleet.row.SCHEMA`).  It is incremental: each bundle's content hash is
computed here first, and a bundle whose latest row has the same hash is skipped without being
dispatched.  Re-indexing a changed bundle appends a newer row; readers keep the latest row per
bundle path (:func:`hintscope.fleet.query.load`).  Rows are written every ``FLUSH_ROWS`` results,
so an interrupted batch keeps what it finished.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds

from hintscope.errors import HintscopeError
from hintscope.fleet.engines import Engine
from hintscope.fleet.row import SCHEMA, bundle_hash, error_row

FLUSH_ROWS = 256
META = "meta.json"


@dataclass
class IndexStats:
    given: int = 0
    skipped: int = 0
    indexed: int = 0
    errors: int = 0
    seconds: float = 0.0
    engine: str = ""
    error_rows: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.indexed / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"{self.given} bundles: {self.indexed} indexed ({self.errors} errors), {self.skipped} unchanged "
                f"and skipped; {self.seconds:.1f} s, {self.rate:.2f} runs/s ({self.engine})")


def expand(paths: list[str]) -> list[str]:
    """Bundle directories; a directory that is not a bundle but holds bundles stands for them."""
    out: list[str] = []
    for p in paths:
        q = Path(p)
        if q.is_dir() and not (q / META).exists():
            kids = sorted(c for c in q.iterdir() if c.is_dir() and (c / META).exists())
            if kids:
                out += [str(c.resolve()) for c in kids]
                continue
        out.append(str(q.resolve()) if q.exists() else str(q.absolute()))
    return list(dict.fromkeys(out))


def existing(index: Path) -> dict[str, str | None]:
    """bundle path -> hash of its latest row in the index (None: retry it)."""
    if not index.exists():
        return {}
    try:
        t = ds.dataset(index, format="parquet", partitioning="hive").to_table(columns=["bundle", "hash", "indexed_ns"])
    except (pa.ArrowInvalid, OSError) as e:
        raise HintscopeError(f"{index}: not a readable fleet index ({' '.join(str(e).split())[:200]})") from None
    latest: dict[str, tuple[int, str | None]] = {}
    for b, h, t_ns in zip(*(t.column(c).to_pylist() for c in ("bundle", "hash", "indexed_ns"))):
        if b not in latest or (t_ns or 0) >= latest[b][0]:
            latest[b] = (t_ns or 0, h)
    return {b: h for b, (_, h) in latest.items()}


class _Writer:
    def __init__(self, index: Path):
        self.index = index
        self.batch = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.buf: list[pa.Table] = []
        self.n = 0

    def add(self, t: pa.Table) -> None:
        self.buf.append(t)
        if len(self.buf) >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        t = pa.concat_tables(self.buf)
        self.buf = []
        ds.write_dataset(t, self.index, format="parquet", schema=SCHEMA,
                         partitioning=ds.partitioning(pa.schema([("date", pa.string())]), flavor="hive"),
                         basename_template=f"part-{self.batch}-{self.n}-{{i}}.parquet",
                         existing_data_behavior="overwrite_or_ignore")
        self.n += 1


def build(bundles: list[str], index: str | os.PathLike, engine: Engine | None = None,
          progress: bool | None = None, force: bool = False) -> IndexStats:
    engine = engine or Engine()
    index = Path(index)
    if index.exists() and not index.is_dir():
        raise HintscopeError(f"{index}: exists and is not a directory")
    paths = expand(bundles)
    st = IndexStats(given=len(paths), engine=engine.describe())
    seen = {} if force else existing(index)
    t0 = time.perf_counter()
    w = _Writer(index)
    tasks: list[tuple[str, str | None]] = []
    for p in paths:
        try:
            h = bundle_hash(p)
        except OSError as e:
            # Unreadable here: an error row now (hash None, so retried next time), no task.
            w.add(error_row(p, f"{p}: cannot read ({e.strerror or e})", None))
            st.errors += 1
            st.indexed += 1
            st.error_rows.append(p)
            continue
        if p in seen and seen[p] == h:
            st.skipped += 1
            continue
        tasks.append((p, h))
    # bundles that could not even be hashed count as done (they are error rows already)
    with _progress(progress, len(tasks) + st.errors, st.errors) as tick:
        for t in engine.run(tasks):
            w.add(t)
            st.indexed += 1
            if t.column("status")[0].as_py() == "error":
                st.errors += 1
                st.error_rows.append(t.column("bundle")[0].as_py())
            tick(st)
    w.flush()
    st.seconds = time.perf_counter() - t0
    return st


class _progress:
    """rich progress on a terminal (done/total, runs/s, errors); silent otherwise."""

    def __init__(self, enabled: bool | None, total: int, done: int = 0):
        self.enabled, self.total, self.done0 = enabled, total, done
        self.prog = None

    def __enter__(self):
        from rich.console import Console

        console = Console(stderr=True)
        on = console.is_terminal if self.enabled is None else self.enabled
        if not on or not self.total:
            return lambda st: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.prog = Progress(TextColumn("indexing"), BarColumn(bar_width=30), MofNCompleteColumn(),
                             TextColumn("{task.fields[rate]:.1f} runs/s"), TextColumn("{task.fields[errors]} errors"),
                             TimeElapsedColumn(), console=console, transient=False)
        self.prog.__enter__()
        task = self.prog.add_task("index", total=self.total, completed=self.done0, rate=0.0, errors=self.done0)
        t0 = time.perf_counter()
        done = [self.done0]

        def tick(st: IndexStats) -> None:
            done[0] += 1
            el = time.perf_counter() - t0
            self.prog.update(task, completed=done[0], rate=(done[0] - self.done0) / el if el > 0 else 0.0,
                             errors=st.errors)
        return tick

    def __exit__(self, *exc):
        if self.prog is not None:
            self.prog.__exit__(*exc)
        sys.stderr.flush()
        return False
