"""``hintscope lab migrate``: a real QEMU live migration on loopback, probed, with a memory check.

Steps (docs/lab.md has timings):
 1. build the bare-metal dirtier guest (cached) and start the source QEMU running it, plus a
    destination QEMU with ``-incoming unix:... -S`` (it stays paused after the migration);
 2. attach the host probe to the source (``python -m hintscope probe host``; waits for ATTACHED);
 3. drive the migration over QMP and store every ``query-migrate`` snapshot (table ``qmp``);
 4. after ``completed``: ``pmemsave`` the paused source and the paused destination and compare
    them page by page (table ``lost_pages``, meta ``memcheck``);
 5. resume the destination and check the guest's heartbeat on its serial port;
 6. stop the probe (SIGINT) and close the bundle.

The probe writes the bundle it creates; the lab joins it with ``BundleWriter(append=True)``.
Without the probe (no root/BPF, or ``--probe off``) the lab creates the bundle itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hintscope.bundle import BundleWriter
from hintscope.errors import HintscopeError
from hintscope.lab import build, memdiff
from hintscope.lab.crosscheck import IoctlCounter
from hintscope.tap.lab import migration_tap
from hintscope.lab.qemu import (TRACE_EVENTS, Qemu, ram_map, QemuConfig, available_trace_events, find_qemu,
                                qemu_label, qemu_version, resolve_accel)
from hintscope.protocol import FINAL_STATES

PRODUCER = "lab migrate"
FILL_AT = 0x1000  # gfn where the guest's --fill region starts (16 MiB)
PAGES_RE = re.compile(r"^(0x[0-9a-fA-F]+|\d+)(-(0x[0-9a-fA-F]+|\d+))?$")


# ---------------------------------------------------------------------------------------------
# options


@dataclass
class LabOptions:
    bundle: Path
    guest: str = "dirtier"
    pages: str = "0x400-0x4ff"
    rate: int = 20000
    rounds: int = 0
    fill_mb: int = 0               # guest fills this much RAM once at start (bulk-round payload)
    accel: str = "auto"
    dirty_ring: int = 0
    mem_mb: int = 256
    hint: bool = True
    qemu: str | None = None
    probe: str = "auto"            # auto | on | off
    bandwidth_mb: int = 1000       # migration max-bandwidth, MiB/s
    downtime_ms: int = 300
    pre_ms: int = 500              # guest runs this long under the probe before `migrate`
    timeout_s: float = 60.0        # migration must reach a final state within this
    poll_ms: int = 100
    memcheck: bool = True
    crosscheck: bool = False       # count the source's dirty-log ioctls with bpftrace too (tests)
    keep_workdir: bool = False
    tap: bool = True               # migrate through `hintscope tap` (table page_sends)
    extra_qemu: list[str] = field(default_factory=list)


def parse_pages(spec: str) -> list[tuple[int, int]]:
    """'0x400-0x4ff,0x800' -> [(0x400, 0x4ff), (0x800, 0x800)]; same grammar as the guest."""
    out = []
    for part in spec.split(","):
        m = PAGES_RE.match(part.strip())
        if not m:
            raise HintscopeError(f"--pages {spec!r}: bad element {part!r} (expected GFN or GFN-GFN, hex with 0x)")
        a = int(m.group(1), 0)
        b = int(m.group(3), 0) if m.group(3) else a
        if b < a:
            raise HintscopeError(f"--pages {spec!r}: range {part!r} ends below its start")
        out.append((a, b))
    if not out or len(out) > 64:
        raise HintscopeError(f"--pages {spec!r}: expected 1 to 64 ranges")
    return out


def _check_opts(o: LabOptions) -> list[tuple[int, int]]:
    if o.guest != "dirtier":
        raise HintscopeError(f"--guest {o.guest}: only 'dirtier' is built in")
    if not 16 <= o.mem_mb <= 3072:
        raise HintscopeError(f"--mem {o.mem_mb}: expected 16..3072 MiB (the RAM must sit below the PCI hole)")
    if o.dirty_ring and (o.dirty_ring & (o.dirty_ring - 1) or not 1024 <= o.dirty_ring <= 65536):
        raise HintscopeError(f"--dirty-ring {o.dirty_ring}: expected a power of two in 1024..65536")
    if o.rate < 0 or o.rounds < 0:
        raise HintscopeError("--rate and --rounds must be >= 0")
    ranges = parse_pages(o.pages)
    mem_pages = o.mem_mb << 8
    for a, b in ranges:
        if a < 0x108 or b >= mem_pages:
            raise HintscopeError(f"--pages {o.pages}: 0x{a:x}-0x{b:x} outside 0x108..0x{mem_pages - 1:x} "
                                 "(above the guest image, inside --mem)")
    if o.fill_mb:
        f0, f1 = FILL_AT, FILL_AT + o.fill_mb * 256 - 1
        if f1 >= mem_pages or any(a <= f1 and b >= f0 for a, b in ranges):
            raise HintscopeError(f"--prefill {o.fill_mb}: gfns 0x{f0:x}-0x{f1:x} must fit in --mem and miss --pages")
    if sum(b - a + 1 for a, b in ranges) * 4096 > (o.mem_mb << 20) // 2:
        raise HintscopeError(f"--pages {o.pages}: more than half the guest RAM; keep the dirty set bounded")
    return ranges


# ---------------------------------------------------------------------------------------------
# serial log of the dirtier

# Only whole lines: the serial file is read while the guest is still writing it.
READY_RE = re.compile(r"DIRTIER ready ([^\n]*)\n")
HB_RE = re.compile(r"DIRTIER hb=(\d+) round=(\d+) seq=(\d+) tsc=\d+\n")


def _kv(line: str) -> dict[str, str]:
    return dict(t.split("=", 1) for t in line.split() if "=" in t)


def read_serial(path: Path, limit: int = 4 << 20) -> str:
    """The guest's serial output (guest-controlled: bounded, undecodable bytes replaced)."""
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("ascii", errors="replace")
    except FileNotFoundError:
        return ""


async def wait_serial(path: Path, pattern: re.Pattern, timeout: float, what: str,
                      fail: re.Pattern | None = None) -> re.Match:
    deadline = time.monotonic() + timeout
    while True:
        text = read_serial(path)
        if fail and (m := fail.search(text)):
            raise HintscopeError(f"{path}: guest reported: {m.group(0)[:200]}")
        if m := pattern.search(text):
            return m
        if time.monotonic() > deadline:
            raise HintscopeError(f"{path}: no {what} from the guest within {timeout:.0f} s")
        await asyncio.sleep(0.05)


def last_heartbeat(text: str) -> dict[str, int] | None:
    hbs = HB_RE.findall(text)
    if not hbs:
        return None
    hb, rnd, seq = hbs[-1]
    return {"hb": int(hb), "round": int(rnd), "seq": int(seq), "lines": len(hbs)}


# ---------------------------------------------------------------------------------------------
# host probe subprocess


def _package_env() -> dict[str, str]:
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
                                                         stderr=self._log, env=_package_env())
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), max(0.1, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                await self.stop()
                raise HintscopeError(f"host probe did not print ATTACHED within {timeout:.0f} s (log {self.log_path})")
            if not line:
                rc = await self.proc.wait()
                raise HintscopeError(f"host probe exited with {rc} before ATTACHED: {self._log_tail()}")
            self._log.write(line)
            self._log.flush()
            if line.strip().startswith(b"ATTACHED"):
                break
        self._drain = asyncio.create_task(self._drain_stdout())

    async def _help(self) -> str:
        p = await asyncio.create_subprocess_exec(sys.executable, "-m", "hintscope", "probe", "host", "--help",
                                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                                                 env=_package_env())
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
# QMP polling


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


async def drive_migration(src: Qemu, uri: str, o: LabOptions,
                          rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Start the migration and poll it to a final state; snapshots go to ``rows`` as they arrive
    (so a caller keeps them when this raises)."""
    await src.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    await src.cmd("migrate-set-parameters", {"max-bandwidth": o.bandwidth_mb << 20,
                                             "downtime-limit": o.downtime_ms})
    await src.cmd("migrate", {"uri": uri})
    rows = [] if rows is None else rows
    deadline = time.monotonic() + o.timeout_s
    while True:
        info = await src.cmd("query-migrate")
        rows.append(qmp_row(time.clock_gettime_ns(time.CLOCK_MONOTONIC), time.time_ns(), info))
        if rows[-1]["status"] in FINAL_STATES:
            return rows
        if time.monotonic() > deadline:
            with contextlib.suppress(HintscopeError):
                await src.cmd("migrate_cancel")
            raise HintscopeError(f"migration still {rows[-1]['status']} after {o.timeout_s:.0f} s "
                                 f"(remaining {rows[-1]['remaining']} bytes); lower --rate or narrow --pages")
        await asyncio.sleep(o.poll_ms / 1000)


async def wait_status(vm: Qemu, want: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        st = await vm.status()
        if st in want:
            return st
        if time.monotonic() > deadline:
            raise HintscopeError(f"QEMU {vm.cfg.name} stayed {st!r}, expected {sorted(want)}")
        await asyncio.sleep(0.05)


async def memory_check(src: Qemu, dst: Qemu, mem_mb: int, scratch: Path) -> memdiff.MemDiff:
    scratch.mkdir(parents=True, exist_ok=True)
    size = mem_mb << 20
    s_img, d_img = scratch / "src.ram", scratch / "dst.ram"
    try:
        await src.cmd("pmemsave", {"val": 0, "size": size, "filename": str(s_img)}, timeout=120)
        await dst.cmd("pmemsave", {"val": 0, "size": size, "filename": str(d_img)}, timeout=120)
        return await asyncio.to_thread(memdiff.compare_images, s_img, d_img)
    finally:
        if not os.environ.get("HINTSCOPE_KEEP_SCRATCH"):  # debugging aid: keep the RAM images
            shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the run


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _truth_frame(ranges: list[tuple[int, int]], fill_mb: int, ready: dict[str, str]) -> pd.DataFrame:
    rows = [(a, b, "target") for a, b in ranges]
    if fill_mb:
        rows.append((FILL_AT, FILL_AT + fill_mb * 256 - 1, "fill"))
    # The guest's own bss/stack pages, as it reports them (guest text: validated, bounded).
    if m := re.fullmatch(r"(0x[0-9a-f]{1,8})-(0x[0-9a-f]{1,8})", ready.get("bss", "")):
        a, b = int(m.group(1), 16), int(m.group(2), 16)
        if 0x100 <= a <= b < a + 256:
            rows.append((a, b, "image"))
    return pd.DataFrame({"first_gfn": np.array([r[0] for r in rows], dtype=np.uint64),
                         "last_gfn": np.array([r[1] for r in rows], dtype=np.uint64),
                         "role": [r[2] for r in rows]})


async def run_lab(o: LabOptions) -> dict[str, Any]:
    """Run one probed migration into ``o.bundle``; returns the summary also stored in meta['lab']."""
    ranges = _check_opts(o)
    qemu = find_qemu(o.qemu)
    accel = resolve_accel(o.accel)
    if o.dirty_ring and accel != "kvm":
        raise HintscopeError("--dirty-ring needs --accel kvm")
    bundle = Path(o.bundle)
    if (bundle / "meta.json").exists():
        raise HintscopeError(f"{bundle}: a bundle already exists there (choose another -o)")
    if o.probe == "off":
        probe_reason = "--probe off"
    else:
        probe_reason = probe_unavailable_reason()
    if o.probe == "on" and probe_reason:
        raise HintscopeError(f"--probe on: {probe_reason}")
    use_probe = probe_reason is None

    t0 = time.monotonic()
    elf = await asyncio.to_thread(build.build_guest, o.guest)
    t_build = time.monotonic() - t0
    version = qemu_version(qemu)
    known = available_trace_events(qemu)
    events = [e for e in TRACE_EVENTS if e in known]

    bundle.mkdir(parents=True, exist_ok=True)
    files = bundle / "files"
    files.mkdir(exist_ok=True)
    trace_log = files / "qemu-trace.log"
    work = Path(tempfile.mkdtemp(prefix="hs-lab-", dir="/tmp"))
    events_file = work / "trace-events"
    events_file.write_text("\n".join(events) + "\n")
    append = f"pages={o.pages} rate={o.rate} rounds={o.rounds} fill_mb={o.fill_mb} fill_at=0x{FILL_AT:x} log_ms=250"
    mig_sock = work / "mig.sock"
    common = dict(workdir=work, qemu=qemu, accel=accel, dirty_ring=o.dirty_ring, mem_mb=o.mem_mb,
                  kernel=str(elf), append=append, hint=o.hint, extra=list(o.extra_qemu))
    src = Qemu(QemuConfig(name="src", trace_events_file=events_file, trace_file=trace_log, **common))
    dst = Qemu(QemuConfig(name="dst", incoming=f"unix:{mig_sock}", **common))
    probe: HostProbe | None = None
    counter: IoctlCounter | None = None
    writer: BundleWriter | None = None
    summary: dict[str, Any] = {"bundle": str(bundle), "probe": {"used": use_probe, "reason": probe_reason}}
    end_reason = "error: interrupted"
    try:
        t1 = time.monotonic()
        await src.start()
        if use_probe:
            probe = HostProbe(src.pid, bundle, trace_log, work / "probe.log")
        if o.crosscheck:
            counter = IoctlCounter(src.pid, work / "bpftrace.log")

        async def timed(name: str, aw) -> Any:
            r = await aw
            summary.setdefault("timings_s", {})[name] = round(time.monotonic() - t1, 3)
            return r

        # The destination's start, the guest's boot and the tracers' attach overlap (each takes seconds
        # on a loaded host); a failure in one cancels the others, and `finally` stops what started.
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(dst.start())
                ready_t = tg.create_task(timed("boot_to_ready", wait_serial(
                    src.cfg.serial_path, READY_RE, 30, "'DIRTIER ready' line", fail=re.compile(r"DIRTIER error: [^\n]*\n"))))
                if probe:
                    tg.create_task(timed("probe_attached", probe.start()))
                if counter:
                    tg.create_task(timed("crosscheck_attached", counter.start()))
        except BaseExceptionGroup as eg:
            raise _first_leaf(eg) from None
        ready = _kv(ready_t.result().group(1)[:2000])  # guest text: bounded
        writer = BundleWriter(bundle, PRODUCER, append=use_probe)
        writer.append("ram_map", await ram_map(src, o.mem_mb << 20))
        if not use_probe:
            writer.meta["vmm"] = {"pid": src.pid, "binary": qemu, "version": version}
        writer.set_source("lab_qmp", "captured", interval_ms=o.poll_ms)
        writer.set_source("qemu_trace", "captured", None, file="files/qemu-trace.log", events=events)
        writer.meta["qemu_trace"] = {"file": "files/qemu-trace.log", "events": events, "pid": src.pid,
                                     "clock": "CLOCK_REALTIME (-msg timestamp=on)", "vmm": "source"}
        writer.meta["lab"] = summary
        summary.update({
            "guest": o.guest, "guest_elf": str(elf), "guest_elf_sha256": _sha256(elf),
            "guest_params": {"pages": o.pages, "rate": o.rate, "rounds": o.rounds, "fill_mb": o.fill_mb,
                             "append": append},
            "guest_ready": ready, "accel": accel, "dirty_ring": o.dirty_ring, "mem_mb": o.mem_mb,
            "hint": o.hint, "qemu": qemu, "qemu_version": version, "qemu_label": qemu_label(qemu, version), "qmp_version": src.greeting.get("QMP", {}).get("version"),
            "src_pid": src.pid, "dst_pid": dst.pid,
            "src_argv": src.cfg.argv(), "dst_argv": dst.cfg.argv(),
            "probe": {"used": use_probe, "reason": probe_reason, "argv": probe.argv if probe else None},
            "crosscheck": None,
            "migration": {"uri": f"unix:{mig_sock}", "max_bandwidth": o.bandwidth_mb << 20,
                          "downtime_limit_ms": o.downtime_ms},
            "timings_s": {"build": round(t_build, 3), **summary.get("timings_s", {})},
        })
        writer.append("guest_truth_pages", _truth_frame(ranges, o.fill_mb, ready))
        writer.flush()

        await asyncio.sleep(o.pre_ms / 1000)
        src_hb_before = last_heartbeat(read_serial(src.cfg.serial_path))
        rows: list[dict[str, Any]] = []
        t3 = time.monotonic()
        try:
            async with migration_tap(o.tap, bundle, f"unix:{mig_sock}", work, summary) as uri:
                await drive_migration(src, uri, o, rows)
        finally:
            if rows:
                writer.append("qmp", pd.DataFrame(rows))
        t_mig = time.monotonic() - t3
        final = json.loads(rows[-1]["raw"])
        summary["migration"].update({
            "status": final.get("status"), "total_time_ms": final.get("total-time"),
            "downtime_ms": final.get("downtime"), "setup_time_ms": final.get("setup-time"),
            "ram": final.get("ram"), "polls": len(rows),
        })
        summary["timings_s"]["migrate_wall"] = round(t_mig, 3)
        writer.flush()
        if final.get("status") != "completed":
            raise HintscopeError(f"migration ended {final.get('status')}: {final.get('error-desc', 'no reason')}")

        src_state = await wait_status(src, {"postmigrate"}, 10)
        dst_state = await wait_status(dst, {"paused"}, 30)
        summary["states_after"] = {"src": src_state, "dst": dst_state}
        src_hb = last_heartbeat(read_serial(src.cfg.serial_path))
        summary["src_heartbeat"] = {"before_migrate": src_hb_before, "at_end": src_hb}

        if o.memcheck:
            t4 = time.monotonic()
            diff = await memory_check(src, dst, o.mem_mb, bundle / ".scratch")
            mc = diff.summary()
            mc["seconds"] = round(time.monotonic() - t4, 3)
            mc["method"] = "pmemsave of paused source (postmigrate) and paused destination, from GPA 0"
            # kvmclock records differ by design (KVM rewrites them per host): listed in meta, kept out of
            # the lost_pages table so that every row there is a page the migration failed to carry.
            d = diff.differing
            kvmclock = d["classification"] == "kvmclock"
            mc["kvmclock_gfns"] = [int(g) for g in d.loc[kvmclock, "gfn"]]
            writer.meta["memcheck"] = summary["memcheck"] = mc
            writer.append("lost_pages", d[~kvmclock])
            summary["timings_s"]["memcheck"] = mc["seconds"]

        await dst.cmd("cont")
        health = await destination_health(dst, src_hb)
        summary["dst_health"] = health
        end_reason = "target-exit"
    except asyncio.CancelledError:
        end_reason = "sigint"
        raise
    except HintscopeError as e:
        end_reason = f"error: {e}"
        raise
    finally:
        with contextlib.suppress(Exception):
            shutil.copyfile(src.cfg.serial_path, files / "src-serial.log")
        with contextlib.suppress(Exception):
            shutil.copyfile(dst.cfg.serial_path, files / "dst-serial.log")
        if counter is not None:
            try:
                summary["crosscheck"] = {"tool": "bpftrace syscalls:sys_exit_ioctl", "pid": src.pid,
                                         "ioctls": await counter.stop()}
            except HintscopeError as e:
                summary["crosscheck"] = {"tool": "bpftrace syscalls:sys_exit_ioctl", "pid": src.pid,
                                         "ioctls": None, "error": str(e)}
            with contextlib.suppress(Exception):
                shutil.copyfile(counter.log_path, files / "bpftrace.log")
        try:
            if probe is not None:
                summary["probe"]["exit"] = await probe.stop()
                with contextlib.suppress(Exception):
                    shutil.copyfile(probe.log_path, files / "probe.log")
                if o.dirty_ring:
                    summary["ring_occupancy"] = ring_occupancy(bundle, o.dirty_ring)
        finally:  # QEMU must go whatever happened above
            for vm in (src, dst):
                summary.setdefault("qemu_exit", {})[vm.cfg.name] = await vm.stop()
        summary["timings_s"] = summary.get("timings_s", {}) | {"total": round(time.monotonic() - t0, 3)}
        if writer is not None:
            writer.close(end_reason=end_reason)
        if o.keep_workdir:
            summary["workdir"] = str(work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return summary


def ring_occupancy(bundle: Path, ring_entries: int) -> dict[str, Any]:
    """Most entries a vCPU's dirty ring held (pushed, not yet reset), from the probe's ``ring_push``.

    KVM must stop a vCPU before its ring fills; on this PVM host emulated stores can push past
    the size, which overwrites entries and loses dirty pages (docs/lab.md)."""
    from hintscope.bundle import read_bundle

    rp = read_bundle(bundle).table("ring_push")
    if not len(rp):
        return {"entries": ring_entries, "pushes": 0}
    occ = rp["dirty_index"].to_numpy(np.int64) - rp["reset_index"].to_numpy(np.int64)
    return {"entries": ring_entries, "pushes": int(len(rp)), "max": int(occ.max()),
            "pushes_over_size": int((occ > ring_entries).sum()), "overflow": bool(occ.max() > ring_entries)}


def _first_leaf(eg: BaseExceptionGroup) -> BaseException:
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


async def destination_health(dst: Qemu, src_hb: dict[str, int] | None, timeout: float = 10.0) -> dict[str, Any]:
    """After `cont`, the guest must keep printing heartbeats with a growing write sequence."""
    deadline = time.monotonic() + timeout
    while True:
        st = await dst.status()
        hb = last_heartbeat(read_serial(dst.cfg.serial_path))
        if hb and hb["lines"] >= 2:
            ok = st == "running" and (src_hb is None or hb["seq"] >= src_hb["seq"])
            return {"ok": ok, "status": st, "heartbeat": hb}
        if st != "running" or time.monotonic() > deadline:
            return {"ok": False, "status": st, "heartbeat": hb}
        await asyncio.sleep(0.1)


SAMPLE_DEFAULTS = dict(mem_mb=256, pages="0x400-0x47f", rate=20000, pre_ms=300, fill_mb=4, bandwidth_mb=32,
                       downtime_ms=1)


def make_sample(path: str | os.PathLike, **kw: Any) -> dict[str, Any]:
    """Record a small sample bundle (~0.2-0.5 MB): 256 MiB dirtier guest writing 128 pages, 4 MiB
    prefill at 32 MiB/s and a 1 ms downtime limit, so the migration takes a few hundred ms with
    about 5 syncs. Keyword arguments override any :class:`LabOptions` field, e.g.
    ``make_sample("samples/lab-ring", dirty_ring=4096)``."""
    o = LabOptions(bundle=Path(path), **(SAMPLE_DEFAULTS | kw))
    return asyncio.run(run_lab(o))


# ---------------------------------------------------------------------------------------------
# CLI


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("migrate", help="run a probed QEMU live migration of a lab guest (root for the probe)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--guest", default="dirtier", choices=["dirtier", "linux", "hintguest"],
                   help="lab guest (default dirtier; linux = Debian guest under TCG, see lab/linux.py; "
                        "hintguest = bare-metal free page hinting guest, 2 GiB, see lab/hintguest.py)")
    p.add_argument("--behaviour", default="polite", choices=["polite", "early-reuse", "late-reuse"],
                   help="--guest hintguest: what the guest does with blocks it hinted (docs/hintguest.md)")
    p.add_argument("--stale-id", action="store_true",
                   help="--guest hintguest control: the start message carries a stale id, QEMU drops every hint")
    p.add_argument("--zero-before-hint", action="store_true",
                   help="--guest hintguest: zero each block after the cmd id, before hinting it (init_on_alloc)")
    p.add_argument("--pages", default="0x400-0x4ff", help="gfns the guest writes: GFN or GFN-GFN, comma list")
    p.add_argument("--rate", type=int, default=20000, help="page writes per second (0 = unlimited; ~60k max here)")
    p.add_argument("--rounds", type=int, default=0, help="stop writing after N passes over --pages (0 = never)")
    p.add_argument("--prefill", type=int, default=0, metavar="MB",
                   help="dirtier fills MB of RAM once at boot (~10 MiB/s here), giving the bulk round real pages")
    p.add_argument("--accel", default="auto", choices=["kvm", "tcg", "auto"])
    p.add_argument("--dirty-ring", type=int, default=0, metavar="N", help="KVM dirty ring entries (0 = bitmap)")
    p.add_argument("--mem", type=int, default=256, metavar="MB", help="guest RAM in MiB (default 256)")
    p.add_argument("--hint", default="on", choices=["on", "off"], help="virtio-balloon free-page-hint device")
    p.add_argument("--probe", default="auto", choices=["auto", "on", "off"], help="attach the host probe")
    p.add_argument("--tap", default="on", choices=["on", "off"],
                   help="migrate through the migration-stream tap, which records page_sends (docs/tap.md)")
    p.add_argument("--bandwidth", type=int, default=1000, metavar="MIBPS", help="migration max-bandwidth")
    p.add_argument("--downtime", type=int, default=300, metavar="MS",
                   help="migration downtime-limit (1 keeps QEMU iterating and syncing longer)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds the migration may take")
    p.add_argument("--crosscheck", action="store_true",
                   help="also count the source's dirty-log ioctls with bpftrace (meta lab.crosscheck)")
    p.add_argument("--no-memcheck", action="store_true", help="skip the destination memory comparison")
    p.add_argument("--keep-workdir", action="store_true", help="keep /tmp/hs-lab-* (QEMU logs, sockets)")
    p.add_argument("--qemu", default=None, metavar="PATH", help="QEMU binary (default $HINTSCOPE_QEMU or /usr/bin)")
    p.add_argument("-o", "--output", required=True, metavar="BUNDLE", help="bundle directory to create")
    from hintscope.lab import linux  # hook: --guest linux options and runner live in lab/linux.py
    linux.add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.guest == "linux":
        from hintscope.lab import linux
        return linux.run(args)
    if args.guest == "hintguest":
        from hintscope.lab import hintguest
        return hintguest.run_from_migrate(args)
    o = LabOptions(bundle=Path(args.output), guest=args.guest, pages=args.pages, rate=args.rate,
                   rounds=args.rounds, fill_mb=args.prefill, downtime_ms=args.downtime, accel=args.accel,
                   dirty_ring=args.dirty_ring, mem_mb=args.mem,
                   hint=args.hint == "on", qemu=args.qemu, probe=args.probe, bandwidth_mb=args.bandwidth,
                   timeout_s=args.timeout, memcheck=not args.no_memcheck, keep_workdir=args.keep_workdir,
                   crosscheck=args.crosscheck, tap=args.tap == "on")
    s = asyncio.run(run_lab(o))
    m = s.get("migration", {})
    ram = m.get("ram") or {}
    print(f"migration {m.get('status')}: {m.get('total_time_ms')} ms, downtime {m.get('downtime_ms')} ms, "
          f"{ram.get('transferred')} bytes, {ram.get('normal')} normal pages, "
          f"{ram.get('dirty-sync-count')} syncs")
    mc = s.get("memcheck")
    if mc:
        print(f"memcheck: {mc['pages_differing']} of {mc['pages_compared']} pages differ, "
              f"{mc['lost_writes']} lost writes ({mc['kvmclock_pages']} kvmclock pages rewritten by KVM)")
    ro = s.get("ring_occupancy") or {}
    if ro.get("overflow"):
        print(f"WARNING: dirty ring overflow: a vCPU ring held {ro['max']} entries of {ro['entries']} "
              f"({ro['pushes_over_size']} pushes past its size); KVM overwrote dirty entries (see docs/lab.md)")
    h = s.get("dst_health", {})
    print(f"destination after cont: {'healthy' if h.get('ok') else 'NOT healthy'} ({h.get('status')})")
    print(f"bundle: {o.bundle}")
    bad = (mc and mc["lost_writes"]) or not h.get("ok")
    return 1 if bad else 0
