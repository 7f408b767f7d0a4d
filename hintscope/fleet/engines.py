"""Where the per-bundle task runs: in this process, in local worker processes, or on Dask.

Every engine maps the same :func:`hintscope.fleet.row.index_one` over ``(path, hash)`` pairs,
one task per bundle, and yields the Arrow row tables as they complete (any order).  A task
whose worker dies becomes an error row with no hash, so the next index retries that bundle.

- ``serial``: a plain loop here (the baseline the benchmark measures against);
- ``processes`` (the default, "embedded"): :class:`concurrent.futures.ProcessPoolExecutor`;
- ``dask``: a ``dask.distributed`` client, on a ``LocalCluster`` of N worker processes
  (``--dask-local N``) or an existing scheduler (``--scheduler tcp://HOST:PORT``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa

from hintscope.errors import HintscopeError
from hintscope.fleet.row import error_row, index_one

Task = tuple[str, "str | None"]


@dataclass
class Engine:
    kind: str = "processes"          # serial | processes | dask
    jobs: int | None = None          # worker processes (processes, dask-local)
    scheduler: str | None = None     # dask scheduler address
    connect_timeout_s: float = 20.0  # giving up on an unreachable scheduler

    def describe(self) -> str:
        if self.kind == "dask":
            return f"dask {self.scheduler}" if self.scheduler else f"dask LocalCluster, {self.workers()} worker processes"
        if self.kind == "processes":
            return f"embedded, {self.workers()} processes"
        return "serial"

    def workers(self) -> int:
        return max(1, self.jobs or os.cpu_count() or 1)

    def run(self, tasks: Sequence[Task]) -> Iterator[pa.Table]:
        if not tasks:
            return iter(())
        if self.kind == "serial":
            return (index_one(p, h) for p, h in tasks)
        if self.kind == "processes":
            return _processes(tasks, self.workers())
        if self.kind == "dask":
            return _dask(tasks, self.workers(), self.scheduler, self.connect_timeout_s)
        raise HintscopeError(f"unknown engine {self.kind!r}")


def _processes(tasks: Sequence[Task], n: int) -> Iterator[pa.Table]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # forkserver: workers start clean (no inherited threads, rich display or open bundle files)
    ctx = mp.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=min(n, len(tasks)), mp_context=ctx) as ex:
        futs = {ex.submit(index_one, p, h): p for p, h in tasks}
        for fut in as_completed(futs):
            try:
                yield fut.result()
            except Exception as e:   # BrokenProcessPool: a worker died (OOM kill, crash)
                yield error_row(futs[fut], f"{futs[fut]}: worker failed ({type(e).__name__}: {e})"[:300], None)


def _dask(tasks: Sequence[Task], n: int, scheduler: str | None, timeout_s: float = 20.0) -> Iterator[pa.Table]:
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise HintscopeError("the Dask engine needs dask.distributed (pip install 'dask[distributed]')") from None
    cluster = None
    try:
        if scheduler:
            client = Client(scheduler, timeout=f"{timeout_s}s")
        else:
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                                   silence_logs=40)
            client = Client(cluster)
    except (OSError, TimeoutError) as e:
        raise HintscopeError(f"dask: cannot reach the scheduler {scheduler or '(local)'}: {e}") from None
    try:
        # pure=False: the same path re-indexed after a change must run again, not hit Dask's cache
        futs = client.map(index_one, [p for p, _ in tasks], [h for _, h in tasks], pure=False)
        path_of = {f.key: p for f, (p, _) in zip(futs, tasks)}
        for fut in as_completed(futs):
            try:
                # Tables deserialised from the wire sit in unaligned buffers (Acero warns on write):
                # one row each, so a copy into fresh Arrow memory costs nothing.
                t = fut.result()
                yield pa.Table.from_pylist(t.to_pylist(), schema=t.schema)
            except Exception as e:   # KilledWorker and friends
                p = path_of.get(fut.key, "?")
                yield error_row(p, f"{p}: dask task failed ({type(e).__name__}: {e})"[:300], None)
            fut.release()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
