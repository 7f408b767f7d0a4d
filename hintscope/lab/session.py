"""The migration driver every lab runner shares (dirtier, linux, hintguest).

What is the same for every lab guest lives here: the host probe subprocess (ATTACHED handshake,
SIGINT stop), QMP ``query-migrate`` rows with their guard against bad numbers, the migration loop,
waits for a VM state, the memory check of the paused source against the paused destination, the
serial-log helpers, and the teardown that copies logs and stops every process.  A runner
(``dirtier.py``, ``linux.py``, ``hintguest.py``) adds its guest: how it boots, what it logs, what
it writes into the bundle.  This module imports no runner, so the lab has no import cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np
import pandas as pd

from hintscope.errors import HintscopeError
from hintscope.lab import memdiff
from hintscope.lab.qemu import Qemu
from hintscope.protocol import FINAL_STATES
from hintscope.tap.lab import migration_tap

@dataclass
class MigrationOptions:
    """The options every lab runner has; each runner's options class adds its guest's and may set
    other defaults."""
    bundle: Path
    qemu: str | None = None
    probe: str = "auto"            # auto | on | off: the host probe on the source
    tap: bool = True               # migrate through `hintscope tap` (table page_sends)
    bandwidth_mb: int = 1000       # migration max-bandwidth, MiB/s
    downtime_ms: int = 300
    timeout_s: float = 60.0        # migration must reach a final state within this
    poll_ms: int = 100
    keep_workdir: bool = False


MEMCHECK_METHOD = "pmemsave of paused source (postmigrate) and paused destination, from GPA 0"


# ---------------------------------------------------------------------------------------------
# serial logs (guest output: bounded, undecodable bytes replaced)


def read_serial(path: Path, limit: int = 4 << 20) -> str:
    """The guest's serial output (guest-controlled: bounded, undecodable bytes replaced)."""
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("ascii", errors="replace")
    except FileNotFoundError:
        return ""


async def wait_serial(path: Path, pattern: re.Pattern, timeout: float, what: str,
                      fail: re.Pattern | None = None, limit: int = 4 << 20) -> re.Match:
    """Wait for ``pattern`` in the serial log; a ``fail`` match is the guest reporting an error."""
    deadline = time.monotonic() + timeout
    while True:
        text = read_serial(path, limit)
        if fail and (m := fail.search(text)):
            raise HintscopeError(f"{path}: guest reported: {m.group(0)[:200]}")
        if m := pattern.search(text):
            return m
        if time.monotonic() > deadline:
            raise HintscopeError(f"{path}: no {what} from the guest within {timeout:.0f} s")
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# host probe subprocess


def package_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def probe_unavailable_reason() -> str | None:
    if importlib.util.find_spec("hintscope.probes.host") is None:
        return "hintscope.probes.host is not installed"
    from hintscope.probes.bcc_env import bpf_unavailable_reason

    return bpf_unavailable_reason()


def probe_choice(mode: str) -> str | None:
    """None when the probe is to be used; else why not.  ``--probe on`` without it is a user error."""
    reason = "--probe off" if mode == "off" else probe_unavailable_reason()
    if mode == "on" and reason:
        raise HintscopeError(f"--probe on: {reason}")
    return reason


async def read_until(stream: asyncio.StreamReader, marker: bytes, timeout: float,
                     sink: Callable[[bytes], None]) -> bool:
    """Hand a helper's stdout lines to ``sink`` until one starts with ``marker`` (True) or the
    stream ends (False); asyncio.TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        line = await asyncio.wait_for(stream.readline(), max(0.1, deadline - time.monotonic()))
        if not line:
            return False
        sink(line)
        if line.strip().startswith(marker):
            return True


class HostProbe:
    """``python -m hintscope probe host`` attached to one PID, stopped with SIGINT."""

    def __init__(self, pid: int, bundle: Path, trace_log: Path | None, log_path: Path,
                 extra: list[str] | None = None):
        self.pid, self.bundle, self.trace_log, self.log_path = pid, bundle, trace_log, log_path
        self.extra = list(extra or [])  # e.g. ["--append"] to join a bundle the caller created
        self.proc: asyncio.subprocess.Process | None = None
        self.argv: list[str] = []
        self._drain: asyncio.Task | None = None
        self._log = None

    async def start(self, timeout: float = 120.0) -> None:
        argv = [sys.executable, "-m", "hintscope", "probe", "host", "--pid", str(self.pid), "-o", str(self.bundle),
                *self.extra]
        # A log outside the bundle is copied in by the probe at stop; the lab's own log is already
        # at files/qemu-trace.log (copying it onto itself would fail).
        if (self.trace_log is not None and self.bundle.resolve() not in self.trace_log.resolve().parents
                and "--qemu-trace-log" in await self._help()):
            argv += ["--qemu-trace-log", str(self.trace_log)]
        self.argv = argv
        self._log = open(self.log_path, "ab")
        self.proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                         stderr=self._log, env=package_env())

        def log_line(line: bytes) -> None:
            self._log.write(line)
            self._log.flush()
        try:
            attached = await read_until(self.proc.stdout, b"ATTACHED", timeout, log_line)
        except asyncio.TimeoutError:
            await self.stop()
            raise HintscopeError(f"host probe did not print ATTACHED within {timeout:.0f} s (log {self.log_path})") from None
        if not attached:
            rc = await self.proc.wait()
            raise HintscopeError(f"host probe exited with {rc} before ATTACHED: {self._log_tail()}")
        self._drain = asyncio.create_task(self._drain_stdout())

    async def _help(self) -> str:
        p = await asyncio.create_subprocess_exec(sys.executable, "-m", "hintscope", "probe", "host", "--help",
                                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                                                 env=package_env())
        out, _ = await p.communicate()
        return out.decode(errors="replace")

    async def _drain_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self._log.write(line)
        self._log.flush()

    def _log_tail(self) -> str:
        self._log.flush()
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1][:300] if lines else "no output"

    async def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        if self._drain:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._drain, 5)
        if self._log:
            self._log.close()
        return self.proc.returncode


# ---------------------------------------------------------------------------------------------
# QMP and the migration


def qmp_row(ts_ns: int, wall_ns: int, info: dict[str, Any]) -> dict[str, Any]:
    """One `qmp` table row. QMP replies are VMM output: anything but an int64-sized number is -1."""
    ram = info.get("ram")
    ram = ram if isinstance(ram, dict) else {}

    def num(d: dict, k: str) -> int:
        v = d.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return -1
        if isinstance(v, float) and not math.isfinite(v):
            return -1
        v = int(v)
        return v if -(2**63) <= v < 2**63 else -1

    status = info.get("status", "")
    return {
        "ts_ns": ts_ns, "wall_ns": wall_ns, "status": status[:64] if isinstance(status, str) else "?",
        "total_time": num(info, "total-time"), "transferred": num(ram, "transferred"),
        "normal": num(ram, "normal"), "duplicate": num(ram, "duplicate"),
        "dirty_sync_count": num(ram, "dirty-sync-count"), "remaining": num(ram, "remaining"),
        "dirty_pages_rate": num(ram, "dirty-pages-rate"), "raw": json.dumps(info, sort_keys=True),
    }


async def drive_migration(src: Qemu, uri: str, *, bandwidth_mb: int, downtime_ms: int, timeout_s: float,
                          poll_ms: int = 100, rows: list[dict[str, Any]] | None = None,
                          on_poll: Callable[[], Awaitable[None]] | None = None,
                          hint: str = "lower --rate or narrow --pages") -> list[dict[str, Any]]:
    """Start the migration and poll it to a final state.  Snapshots go to ``rows`` as they arrive
    (so a caller keeps them when this raises); ``on_poll`` runs after each non-final snapshot (a
    runner that changes migration parameters mid-way)."""
    await src.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    await src.cmd("migrate-set-parameters", {"max-bandwidth": bandwidth_mb << 20, "downtime-limit": downtime_ms})
    await src.cmd("migrate", {"uri": uri})
    rows = [] if rows is None else rows
    deadline = time.monotonic() + timeout_s
    while True:
        info = await src.cmd("query-migrate")
        rows.append(qmp_row(time.clock_gettime_ns(time.CLOCK_MONOTONIC), time.time_ns(),
                            info if isinstance(info, dict) else {}))
        if rows[-1]["status"] in FINAL_STATES:
            return rows
        if on_poll is not None:
            await on_poll()
        if time.monotonic() > deadline:
            with contextlib.suppress(HintscopeError):
                await src.cmd("migrate_cancel")
            raise HintscopeError(f"migration still {rows[-1]['status']} after {timeout_s:.0f} s "
                                 f"(remaining {rows[-1]['remaining']} bytes); {hint}")
        await asyncio.sleep(poll_ms / 1000)


async def migrate_recorded(src: Qemu, writer, work: Path, summary: dict[str, Any], *, tap: bool, forward: str,
                           **drive: Any) -> list[dict[str, Any]]:
    """:func:`drive_migration` through the migration-stream tap (when ``tap``), which forwards to
    ``forward`` and joins the bundle; every QMP snapshot lands in table ``qmp``, also when it fails."""
    rows: list[dict[str, Any]] = []
    try:
        async with migration_tap(tap, writer.path, forward, work, summary) as uri:
            await drive_migration(src, uri, rows=rows, **drive)
    finally:
        if rows:
            writer.append("qmp", pd.DataFrame(rows))
    return rows


def migration_outcome(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The last snapshot's outcome (meta lab.migration); raises when the migration did not complete."""
    final = json.loads(rows[-1]["raw"])
    out = {"status": final.get("status"), "total_time_ms": final.get("total-time"),
           "downtime_ms": final.get("downtime"), "setup_time_ms": final.get("setup-time"),
           "ram": final.get("ram"), "polls": len(rows)}
    if final.get("status") != "completed":
        out["error"] = str(final.get("error-desc", "no reason"))[:300]
    return out


def require_completed(outcome: dict[str, Any]) -> None:
    if outcome.get("status") != "completed":
        raise HintscopeError(f"migration ended {outcome.get('status')}: {outcome.get('error', 'no reason')}")


async def wait_status(vm: Qemu, want: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        st = await vm.status()
        if st in want:
            return st
        if time.monotonic() > deadline:
            raise HintscopeError(f"QEMU {vm.cfg.name} stayed {st!r}, expected {sorted(want)}")
        await asyncio.sleep(0.05)


async def paused_both(src: Qemu, dst: Qemu, src_timeout: float = 10, dst_timeout: float = 30) -> dict[str, str]:
    """After ``completed``: the source must reach postmigrate and the destination (-S) stay paused."""
    return {"src": await wait_status(src, {"postmigrate"}, src_timeout),
            "dst": await wait_status(dst, {"paused"}, dst_timeout)}


# ---------------------------------------------------------------------------------------------
# memory check


async def save_images(src: Qemu, dst: Qemu, mem_mb: int, scratch: Path) -> tuple[Path, Path]:
    """pmemsave guest RAM from GPA 0 of both paused VMs into ``scratch``."""
    scratch.mkdir(parents=True, exist_ok=True)
    size = mem_mb << 20
    s_img, d_img = scratch / "src.ram", scratch / "dst.ram"
    await src.cmd("pmemsave", {"val": 0, "size": size, "filename": str(s_img)}, timeout=120)
    await dst.cmd("pmemsave", {"val": 0, "size": size, "filename": str(d_img)}, timeout=120)
    return s_img, d_img


def drop_scratch(scratch: Path) -> None:
    if not os.environ.get("HINTSCOPE_KEEP_SCRATCH"):  # debugging aid: keep the RAM images
        shutil.rmtree(scratch, ignore_errors=True)


async def memory_check(src: Qemu, dst: Qemu, mem_mb: int, scratch: Path) -> memdiff.MemDiff:
    try:
        s_img, d_img = await save_images(src, dst, mem_mb, scratch)
        return await asyncio.to_thread(memdiff.compare_images, s_img, d_img)
    finally:
        drop_scratch(scratch)


def record_memcheck(writer, diff: memdiff.MemDiff, seconds: float) -> dict[str, Any]:
    """``lost_pages`` and meta ``memcheck``.  kvmclock records differ by design (KVM rewrites them per
    host): listed in meta, kept out of ``lost_pages`` so that every row there is a page the
    migration failed to carry.  Whether a difference is a loss is the analysis' call."""
    mc = diff.summary()
    mc["seconds"] = round(seconds, 3)
    mc["method"] = MEMCHECK_METHOD
    d = diff.differing
    kvmclock = (d["classification"] == "kvmclock").to_numpy(bool) if len(d) else np.zeros(0, bool)
    mc["kvmclock_gfns"] = [int(g) for g in d.loc[kvmclock, "gfn"]]
    writer.meta["memcheck"] = mc
    writer.append("lost_pages", d[~kvmclock])
    return mc


# ---------------------------------------------------------------------------------------------
# errors and teardown


def first_leaf(eg: BaseExceptionGroup) -> BaseException:
    """The first real error in a task group's failure (a HintscopeError when there is one)."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for x in e.exceptions:
                walk(x)
        else:
            leaves.append(e)

    walk(eg)
    return next((e for e in leaves if isinstance(e, HintscopeError)), leaves[0])


def check_dirty_ring(entries: int) -> None:
    if entries and (entries & (entries - 1) or not 1024 <= entries <= 65536):
        raise HintscopeError(f"--dirty-ring {entries}: expected a power of two in 1024..65536")


def check_new_bundle(bundle: Path) -> None:
    if (bundle / "meta.json").exists():
        raise HintscopeError(f"{bundle}: a bundle already exists there (choose another -o)")


def finish_workdir(work: Path, keep: bool, summary: dict[str, Any]) -> None:
    if keep:
        summary["workdir"] = str(work)
    else:
        shutil.rmtree(work, ignore_errors=True)


def end_reason(e: BaseException) -> str:
    return "sigint" if isinstance(e, asyncio.CancelledError) else f"error: {e}"


async def teardown(vms: list[Qemu], probe: HostProbe | None, files: Path, summary: dict[str, Any],
                   logs: dict[str, Path] | None = None) -> None:
    """Copy the logs into ``files``, stop the probe, then QEMU whatever happened before.

    Called from ``finally``: it must not raise while anything is left running."""
    logs = {**{f"{vm.cfg.name}-serial.log": vm.cfg.serial_path for vm in vms}, **(logs or {})}
    for name, path in logs.items():
        with contextlib.suppress(OSError):
            shutil.copyfile(path, files / name)
    if probe is not None:
        try:
            summary.setdefault("probe", {})["exit"] = await probe.stop()
        except Exception as e:  # noqa: BLE001 - a misbehaving probe must not leave QEMU running
            summary.setdefault("probe", {})["stop_error"] = str(e)[:200]
        with contextlib.suppress(OSError):
            shutil.copyfile(probe.log_path, files / "probe.log")
    for vm in vms:
        try:
            summary.setdefault("qemu_exit", {})[vm.cfg.name] = await vm.stop()
        except Exception as e:  # noqa: BLE001 - the next VM must still be stopped
            summary.setdefault("qemu_exit", {})[vm.cfg.name] = f"stop failed: {e}"[:200]
