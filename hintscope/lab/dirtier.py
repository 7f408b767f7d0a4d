"""``hintscope lab migrate --guest dirtier``: the bare-metal dirtier migrated on loopback, probed,
with a memory check (the shared driver is lab/session.py).

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
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hintscope.bundle import BundleWriter
from hintscope.errors import HintscopeError
from hintscope.lab import build, session
from hintscope.lab.crosscheck import IoctlCounter
from hintscope.lab.qemu import (TRACE_EVENTS, Qemu, ram_map, QemuConfig, available_trace_events, find_qemu,
                                qemu_label, qemu_version, resolve_accel)
from hintscope.lab.session import HostProbe, read_serial

PRODUCER = "lab migrate"
FILL_AT = 0x1000  # gfn where the guest's --fill region starts (16 MiB)
PAGES_RE = re.compile(r"^(0x[0-9a-fA-F]+|\d+)(-(0x[0-9a-fA-F]+|\d+))?$")


# ---------------------------------------------------------------------------------------------
# options


@dataclass
class LabOptions(session.MigrationOptions):
    guest: str = "dirtier"
    pages: str = "0x400-0x4ff"
    rate: int = 20000
    rounds: int = 0
    fill_mb: int = 0               # guest fills this much RAM once at start (bulk-round payload)
    accel: str = "auto"
    dirty_ring: int = 0
    mem_mb: int = 256
    hint: bool = True
    pre_ms: int = 500              # guest runs this long under the probe before `migrate`
    memcheck: bool = True
    crosscheck: bool = False       # count the source's dirty-log ioctls with bpftrace too (tests)
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
    session.check_dirty_ring(o.dirty_ring)
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


def last_heartbeat(text: str) -> dict[str, int] | None:
    hbs = HB_RE.findall(text)
    if not hbs:
        return None
    hb, rnd, seq = hbs[-1]
    return {"hb": int(hb), "round": int(rnd), "seq": int(seq), "lines": len(hbs)}


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
    session.check_new_bundle(bundle)
    probe_reason = session.probe_choice(o.probe)
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
                ready_t = tg.create_task(timed("boot_to_ready", session.wait_serial(
                    src.cfg.serial_path, READY_RE, 30, "'DIRTIER ready' line", fail=re.compile(r"DIRTIER error: [^\n]*\n"))))
                if probe:
                    tg.create_task(timed("probe_attached", probe.start()))
                if counter:
                    tg.create_task(timed("crosscheck_attached", counter.start()))
        except BaseExceptionGroup as eg:
            raise session.first_leaf(eg) from None
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
        t3 = time.monotonic()
        rows = await session.migrate_recorded(src, writer, work, summary, tap=o.tap, forward=f"unix:{mig_sock}",
                                              bandwidth_mb=o.bandwidth_mb, downtime_ms=o.downtime_ms,
                                              timeout_s=o.timeout_s, poll_ms=o.poll_ms)
        summary["migration"].update(session.migration_outcome(rows))
        summary["timings_s"]["migrate_wall"] = round(time.monotonic() - t3, 3)
        writer.flush()
        session.require_completed(summary["migration"])
        summary["states_after"] = await session.paused_both(src, dst)
        src_hb = last_heartbeat(read_serial(src.cfg.serial_path))
        summary["src_heartbeat"] = {"before_migrate": src_hb_before, "at_end": src_hb}

        if o.memcheck:
            t4 = time.monotonic()
            diff = await session.memory_check(src, dst, o.mem_mb, bundle / ".scratch")
            mc = summary["memcheck"] = session.record_memcheck(writer, diff, time.monotonic() - t4)
            summary["timings_s"]["memcheck"] = mc["seconds"]

        await dst.cmd("cont")
        health = await destination_health(dst, src_hb)
        summary["dst_health"] = health
        end_reason = "target-exit"
    except (asyncio.CancelledError, HintscopeError) as e:
        end_reason = session.end_reason(e)
        raise
    finally:
        if counter is not None:
            try:
                summary["crosscheck"] = {"tool": "bpftrace syscalls:sys_exit_ioctl", "pid": src.pid,
                                         "ioctls": await counter.stop()}
            except HintscopeError as e:
                summary["crosscheck"] = {"tool": "bpftrace syscalls:sys_exit_ioctl", "pid": src.pid,
                                         "ioctls": None, "error": str(e)}
            with contextlib.suppress(Exception):
                shutil.copyfile(counter.log_path, files / "bpftrace.log")
        await session.teardown([src, dst], probe, files, summary)
        if probe is not None and o.dirty_ring:
            summary["ring_occupancy"] = ring_occupancy(bundle, o.dirty_ring)
        summary["timings_s"] = summary.get("timings_s", {}) | {"total": round(time.monotonic() - t0, 3)}
        if writer is not None:
            writer.close(end_reason=end_reason)
        session.finish_workdir(work, o.keep_workdir, summary)
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


def run(args: argparse.Namespace) -> int:
    """``hintscope lab migrate --guest dirtier`` (dispatched by lab/cli.py)."""
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
