"""Resource caps shared by every reader of guest- or trace-produced input.

hintscope runs as root on hypervisor hosts and reads files a guest (or a QEMU a guest may
control) produced.  Every reader bounds what it will allocate *before* allocating it, using the
numbers here, so that a hostile file ends in a one-line :class:`~hintscope.errors.HintscopeError`
or a partial load noted in ``problems``, never in an OOM kill or a hang.

The caps are far above what a real capture produces (see docs/reliability.md for the numbers
they were sized against) and can be lowered for tests with :func:`override`.

:func:`run_capped` runs a reader in a child process under ``RLIMIT_AS`` and a wall-clock
deadline; the hostile-input tests use it to prove the memory bound.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from typing import Iterator

# --- bundles ---------------------------------------------------------------------------------
# meta.json / meta-*.json: hintscope writes a few KiB.
MAX_META_BYTES = 16 << 20
# Parquet parts per table: one per flush (the probe flushes about once a second), so a 5 h
# capture stays below this.  Beyond it the remaining parts are not read and the skip is noted
# in Bundle.problems (opening a part costs ~3 ms: 10**6 parts would take most of an hour).
MAX_PARTS_PER_TABLE = 20_000
# Rows one part may declare in its footer: a flush holds at most a few seconds of events.
MAX_PART_ROWS = 50_000_000
# Uncompressed bytes one part may declare: guards against compression bombs before decoding.
MAX_PART_UNCOMPRESSED = 1 << 30
# Rows one table may hold in total after loading all parts.
MAX_TABLE_ROWS = 200_000_000
# Disk space a BundleWriter sets aside at start (.reserve-<producer>) so that, on a full disk,
# the closing meta.json (end_reason, rows, unwritten_rows) can still be written.
META_RESERVE_BYTES = 256 << 10

# --- text streams ----------------------------------------------------------------------------
MAX_LINE = 4096                    # QEMU trace / guest stream: one record per line
# QEMU -trace log.  A parsed event costs ~220 B (vs ~87 B of text), so the event cap, not the
# byte cap, bounds memory: 2 M events ~ 0.45 GiB of frame; 256 MiB of text ~ 3 M real lines.
MAX_TRACE_BYTES = 256 << 20
MAX_TRACE_EVENTS = 2_000_000
# Guest stream: a lab run writes ~10**4..10**5 records.  Parsing costs ~0.6 KB per line at peak
# (one regex match per line), so the line cap bounds memory: 10**6 lines stay under 1 GiB.
MAX_STREAM_BYTES = 256 << 20
MAX_STREAM_LINES = 1_000_000
MAX_SERIAL_BYTES = 4 << 20         # guest serial console output
MAX_QMP_JSON_BYTES = 1 << 20       # one QMP reply

# --- test helper -----------------------------------------------------------------------------
# The address-space cap the hostile-input tests run readers under.
TEST_RLIMIT_AS = 3 << 29           # 1.5 GiB


@contextlib.contextmanager
def override(**caps: int) -> Iterator[None]:
    """Temporarily lower (or raise) caps of this module, e.g. ``override(MAX_PARTS_PER_TABLE=10)``."""
    mod = sys.modules[__name__]
    old = {}
    for k, v in caps.items():
        if not hasattr(mod, k):
            raise AttributeError(f"no cap {k}")
        old[k] = getattr(mod, k)
        setattr(mod, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(mod, k, v)


@dataclass
class CappedRun:
    returncode: int | None          # None: killed at the deadline
    stdout: str
    stderr: str
    timed_out: bool

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr


def run_capped(code: str, *, as_bytes: int = TEST_RLIMIT_AS, timeout: float = 60.0,
               cwd: str | None = None, env: dict[str, str] | None = None) -> CappedRun:
    """Run Python ``code`` in a fresh interpreter with ``RLIMIT_AS`` = ``as_bytes`` and a deadline.

    The child inherits this interpreter (same venv).  Used by tests; not on any hot path.
    """

    def _limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (as_bytes, as_bytes))
        # A core dump of a 1.5 GiB child is not wanted either.
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    e = dict(os.environ if env is None else env)
    # Thread pools size their stacks/arenas per CPU; keep the child's baseline small and stable.
    e.setdefault("OMP_NUM_THREADS", "1")
    e.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                           preexec_fn=_limit, cwd=cwd, env=e)
    except subprocess.TimeoutExpired as t:
        out = t.stdout.decode(errors="replace") if isinstance(t.stdout, bytes) else (t.stdout or "")
        err = t.stderr.decode(errors="replace") if isinstance(t.stderr, bytes) else (t.stderr or "")
        return CappedRun(None, out, err, True)
    return CappedRun(p.returncode, p.stdout, p.stderr, False)
