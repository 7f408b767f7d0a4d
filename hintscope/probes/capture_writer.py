"""The host probe's writer thread: decodes ring records and writes the bundle off the polling thread.

A Parquet part is written with fsync (bundle.py), which took 0.1-0.45 s per 150k rows on this
machine and over a second at load 7-10; on the thread that polls the BPF ring that stall let the
ring fill and lose events.  So the poller only copies committed records out of the ring and hands
them over here once per flush interval; this thread decodes them (one numpy pass per batch, not
per ring read), appends them to the :class:`~hintscope.bundle.BundleWriter` and flushes.

Ownership: while the thread runs it alone touches the writer (``w.meta``, ``w.rows``, parts).  The
poller passes what it knows (lost counters, consumed records) as a callable run on this thread
right before the flush, so meta is never written from two threads.  Pyarrow encodes, compresses
and writes without the GIL, and fsync releases it, so the poller keeps running while a part is
written.

The backlog is bounded in bytes: when it is full, :attr:`full` tells the poller to leave records
in the ring, where the kernel counts what it then has to drop (meta ``lost.*`` stays exact).  A
failure is kept as one line in :attr:`error` (the poller raises it); the thread keeps going, so
every later batch is still written, or counted in ``lost.bundle_write`` when it cannot be.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from typing import Callable

import numpy as np

from hintscope.bundle import BundleWriter
from hintscope.errors import BundleError
from hintscope.probes.decode import STRIDE, Decoded, decode

DEFAULT_MAX_BACKLOG_BYTES = 256 << 20   # ~2.8 M records, ~18 s at 150k events/s
COALESCE_BYTES = 64 << 20


class CaptureWriter:
    """``buffer()`` and ``submit(buffer, nbytes, update_meta)`` from the poller; ``close()`` drains and joins."""

    def __init__(self, w: BundleWriter, on_decoded: Callable[[Decoded], None],
                 max_backlog_bytes: int = DEFAULT_MAX_BACKLOG_BYTES):
        self.w = w
        self.on_decoded = on_decoded
        self.max_backlog_bytes = max_backlog_bytes
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._backlog = 0
        self._free: list[np.ndarray] = []      # batch buffers back from the thread, pages already mapped
        self.error: BundleError | None = None   # the first failure, one line
        self.dead = False                       # an unexpected exception: batches are counted, not decoded
        self.decode_s = 0.0                     # wall time of decode + append (includes waiting for a CPU)
        self.write_s = 0.0                      # wall time of the flushes
        self.cpu_s = 0.0                        # this thread's CPU time
        self.decode_cpu_s = 0.0                 # ... of which decode + append
        self.write_cpu_s = 0.0                  # ... of which flushes (Parquet encoding, meta)
        self.batches = 0
        self.max_backlog_seen = 0
        self._thread = threading.Thread(target=self._run, name="hintscope-writer", daemon=True)
        self._thread.start()

    @property
    def backlog_bytes(self) -> int:
        return self._backlog

    @property
    def full(self) -> bool:
        return self._backlog >= self.max_backlog_bytes

    def buffer(self, size: int) -> np.ndarray:
        """A batch buffer for the poller: a recycled one when the thread has given one back."""
        with self._lock:
            while self._free:
                b = self._free.pop()
                if len(b) == size:
                    return b
        return np.empty(size, np.uint8)

    def submit(self, buf: np.ndarray | bytes | None, nbytes: int, update_meta: Callable[[], None] | None = None) -> None:
        """Queue ``buf[:nbytes]`` (whole ring records) and a meta update; never blocks.

        The buffer belongs to this thread from now on (it is recycled after decoding).
        """
        if buf is None:
            buf, nbytes = b"", 0
        with self._lock:
            self._backlog += nbytes
            self.max_backlog_seen = max(self.max_backlog_seen, self._backlog)
        self._q.put((buf, nbytes, update_meta))

    def close(self) -> None:
        """Write everything submitted so far, then stop the thread (the caller owns ``w`` again)."""
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()

    # -- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        pending: collections.deque = collections.deque()
        stop = False
        while not stop or pending:
            if not pending and not stop:
                pending.append(self._q.get())
            while True:
                try:
                    pending.append(self._q.get_nowait())
                except queue.Empty:
                    break
            # Behind (slow disk): queued batches are written together, as fewer and larger parts,
            # up to COALESCE_BYTES so that one decode does not hold the whole backlog twice.
            items, size = [], 0
            while pending and (not items or size + (pending[0] or (0, 0))[1] <= COALESCE_BYTES):
                it = pending.popleft()
                if it is None:
                    stop = True
                    continue
                items.append(it)
                size += it[1]
            if items:
                self._write(items)

    def _write(self, items: list) -> None:
        nbytes = sum(it[1] for it in items)
        try:
            if self.dead:
                self.w.add_lost("bundle_write", nbytes // STRIDE)
            else:
                recs = [memoryview(b)[:n] for b, n, _ in items]
                self._decode_append(recs[0] if len(recs) == 1 else b"".join(recs))
            for _, _, update in items:
                if update is not None:
                    update()
            t, c = time.perf_counter(), time.thread_time()
            self.w.flush()
            self.write_s += time.perf_counter() - t
            self.write_cpu_s += time.thread_time() - c
        except BundleError as e:
            # flush() already counted the rows it could not write; later batches may still succeed
            self._fail(e)
        except Exception as e:  # noqa: BLE001 - a writer bug must surface as one line, not kill capture silently
            self.dead = True
            self._fail(BundleError(f"{self.w.path}: writer thread failed ({type(e).__name__}: "
                                   f"{' '.join(str(e).split())[:200]})"))
        finally:
            self.cpu_s = time.thread_time()
            self.batches += 1
            with self._lock:
                self._backlog -= nbytes
                # decode copied every column out: the buffers can be filled again (two spare at most)
                for b, _, _ in items:
                    if isinstance(b, np.ndarray) and len(self._free) < 2:
                        self._free.append(b)

    def _decode_append(self, records: bytes | bytearray) -> None:
        t, c = time.perf_counter(), time.thread_time()
        d = decode(records)
        tables = list(d.tables)
        for i, table in enumerate(tables):
            try:
                self.w.append(table, d.tables[table])
            except Exception:
                # rows that will never reach a part are counted, as flush() counts a part it cannot write
                self.w.add_lost("bundle_write", sum(d.rows(t) for t in tables[i:]))
                raise
        self.on_decoded(d)
        self.decode_s += time.perf_counter() - t
        self.decode_cpu_s += time.thread_time() - c

    def _fail(self, e: BundleError) -> None:
        if self.error is None:
            self.error = e
