"""``hintscope lab migrate --guest linux``: a Debian guest under TCG, probed from inside.

Steps:
 1. the cached read-only root image (``hintscope lab image``) plus a per-run payload disk holding
    the guest probe (probes/guest.py + guest.bpf.c), the workload and their config; both disks
    are opened ``readonly=on`` by source and destination;
 2. source QEMU (TCG) boots the guest; the guest opens the virtio-serial port ``hintscope``
    (backed by a host file on each side), starts the BCC probe, waits for ATTACHED, then the
    workload fills/frees memory and keeps stamping its writer pages (READY);
 3. host probe on the source (when available) + QEMU trace log, QMP ``query-migrate`` polling;
 4. after ``completed``: pmemsave of the paused source and paused destination, compared page by
    page (lab/memdiff.py), each differing page classified against the guest stream;
 5. ``cont`` on the destination and a health window: heartbeats, no BUG/Oops on the console,
    DONE processed, the writer's own lost-write check (LOSTW);
 6. source and destination stream files are parsed and joined into the guest tables.

Uses the lab launcher (lab/qemu.py) and the shared migration driver (lab/session.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from hintscope.analysis import lost_pages
from hintscope.bundle import BundleWriter
from hintscope.errors import HintscopeError
from hintscope.lab import image as lab_image
from hintscope.lab import session
from hintscope.lab.session import HostProbe
from hintscope.lab.qemu import (TRACE_EVENTS, Qemu, ram_map, QemuConfig, available_trace_events, find_qemu,
                                qemu_version)
from hintscope.parse import guest_stream

PRODUCER = "lab linux"
GUEST_DIR = Path(__file__).parent / "guests" / "linux"
PROBE_DIR = Path(__file__).resolve().parents[1] / "probes"
EXTRA_TRACE = ["virtio_balloon_get_config", "migration_completion_vm_stop"]
OOPS_RE = re.compile(r"(BUG:|Oops|kernel BUG|general protection fault|Kernel panic|list_add corruption|"
                     r"list_del corruption|Call Trace:|RCU stall|watchdog: BUG)[^\n]{0,160}")
PORT_READY_RE = re.compile(rb"\nW \d+ \d+ READY")


@dataclass
class LinuxOptions(session.MigrationOptions):
    bandwidth_mb: int = 128        # QEMU 7.2's default max-bandwidth, as in the guest-lab runs
    timeout_s: float = 120.0
    hint: bool = True
    smp: int = 2
    mem_mb: int = 1024
    guest_probe: bool = True
    page_sends: bool = False       # host probe --page-sends (zero-page sends too; ~50 us per page)
    fill_mb: int = 400
    pressure_mb: int = 0
    writer_mb: int = 16
    pre_ms: int = 2000
    health_s: float = 15.0
    boot_timeout_s: float = 600.0
    memcheck: bool = True
    extra_qemu: list[str] = field(default_factory=list)
    guest_kernel: str | None = None  # kernel series (lab/guest_kernel.py); None: the default (6.1)
    burst: str = "none"            # memory pressure during hinting: none, anon, pagecache, fork (workload.py)
    burst_at: str = "bulk"         # bulk: at the start of the bulk round's hint run; mid: burst_delay_ms later
    burst_mb: int = 400
    burst_s: float = 3.0
    burst_delay_ms: int = 1500
    init_on_alloc: int | None = None  # kernel command line init_on_alloc=0/1; None: the kernel's default


BURSTS = ("none", "anon", "pagecache", "fork")
BURST_AT = ("bulk", "mid")


def build_payload(work: Path, o: LinuxOptions) -> Path:
    """The small per-run disk with init.sh, the workload and the guest probe (ext4, no root needed)."""
    d = work / "payload"
    d.mkdir(parents=True, exist_ok=True)
    for src in (GUEST_DIR / "init.sh", GUEST_DIR / "workload.py", PROBE_DIR / "guest.py", PROBE_DIR / "guest.bpf.c"):
        shutil.copy2(src, d / src.name)
    (d / "init.sh").chmod(0o755)
    (d / "config").write_text(
        f"HS_FILL_MB={int(o.fill_mb)}\nHS_PRESSURE_MB={int(o.pressure_mb)}\nHS_WRITER_MB={int(o.writer_mb)}\n"
        f"HS_PROBE={1 if o.guest_probe else 0}\nHS_TMPFS_MB={max(64, int(o.fill_mb) + 64)}\n"
        f"HS_BURST={o.burst}\nHS_BURST_AT={o.burst_at}\nHS_BURST_MB={int(o.burst_mb)}\n"
        f"HS_BURST_S={float(o.burst_s)}\nHS_BURST_DELAY_MS={int(o.burst_delay_ms)}\n")
    img = work / "payload.ext4"
    subprocess.run(["truncate", "-s", "8M", str(img)], check=True)
    r = subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-L", "hspayload", "-d", str(d), str(img)],
                       capture_output=True, text=True)
    if r.returncode:
        raise HintscopeError(f"payload disk: mkfs.ext4 failed: {r.stderr.strip()[:200]}")
    return img


def _devices(root_img: str, payload: Path, port_file: Path, hint: bool) -> list[str]:
    a = ["-no-reboot",
         "-drive", f"file={root_img},if=none,id=hsroot,format=raw,readonly=on",
         "-device", "virtio-blk-pci,drive=hsroot",
         "-drive", f"file={payload},if=none,id=hspay,format=raw,readonly=on",
         "-device", "virtio-blk-pci,drive=hspay",
         "-device", "virtio-serial-pci,id=vser0",
         "-chardev", f"file,id=hsport,path={port_file}",
         "-device", "virtserialport,bus=vser0.0,chardev=hsport,name=hintscope"]
    if not hint:
        # same guest (balloon driver loaded, device present) with hinting off
        a += ["-device", "virtio-balloon-pci,id=balloon0,free-page-hint=off"]
    return a


def unpacked_qemu_args(qemu: str) -> tuple[list[str], dict[str, str]]:
    """-L firmware dirs and module dir for a QEMU unpacked with `dpkg -x` under a prefix.

    Such a binary (e.g. /opt/hintscope/qemu-bpo/usr/bin/qemu-system-x86_64 from
    bookworm-backports) still has /usr/share/qemu compiled in, which holds the system QEMU's
    firmware; point it at its own and keep it off the system's modules.
    """
    exe = Path(qemu).resolve()
    if exe.parent.name != "bin" or exe.parent.parent.name != "usr" or exe.parent.parent.parent == Path("/"):
        return [], {}
    usr = exe.parent.parent
    args: list[str] = []
    for d in (usr / "share/qemu", usr / "share/seabios", usr / "lib/ipxe/qemu"):
        if d.is_dir():
            args += ["-L", str(d)]
    env = {}
    mod = usr / "lib/x86_64-linux-gnu/qemu"
    if mod.is_dir():
        env["QEMU_MODULE_DIR"] = str(mod)
    return args, env


def _read(path: Path, limit: int = 64 << 20) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except FileNotFoundError:
        return b""


async def _wait_ready(src: Qemu, port: Path, timeout: float) -> float:
    t0 = time.monotonic()
    while True:
        data = _read(port)
        if PORT_READY_RE.search(b"\n" + data):
            return time.monotonic() - t0
        serial = _read(src.cfg.serial_path).decode("ascii", "replace")
        if m := OOPS_RE.search(serial):
            raise HintscopeError(f"guest crashed while booting: {m.group(0)[:160]} ({src.cfg.serial_path})")
        if "HS-INIT: probe did not attach" in serial:
            raise HintscopeError(f"guest probe did not attach; see {src.cfg.serial_path}")
        if src.proc is not None and src.proc.poll() is not None:
            raise HintscopeError(f"source QEMU exited during boot: {src.stderr_tail()}")
        if time.monotonic() - t0 > timeout:
            raise HintscopeError(f"guest not READY within {timeout:.0f} s (console: {src.cfg.serial_path})")
        await asyncio.sleep(0.25)


async def _watch_destination(dst: Qemu, seconds: float) -> str:
    """Let the resumed destination run; a guest panic ends QEMU (-no-reboot, panic=-1): 'exited'."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if dst.proc is not None and dst.proc.poll() is not None:
            return "exited"
        await asyncio.sleep(0.25)
    try:
        return await dst.status()
    except HintscopeError:
        return "exited"


async def run_linux(o: LinuxOptions) -> dict[str, Any]:
    if not 768 <= o.mem_mb <= 3072:
        raise HintscopeError(f"--mem {o.mem_mb}: the Linux guest needs 768..3072 MiB (BCC/LLVM alone is ~180 MB)")
    if not 1 <= o.smp <= 8:
        raise HintscopeError(f"--smp {o.smp}: expected 1..8")
    if o.fill_mb < 0 or o.pressure_mb < 0 or o.writer_mb < 0 or o.fill_mb + o.writer_mb > o.mem_mb - 300:
        raise HintscopeError("--fill/--writer must be >= 0 and leave 300 MiB of guest RAM")
    if o.burst not in BURSTS or o.burst_at not in BURST_AT:
        raise HintscopeError(f"--burst {o.burst} --burst-at {o.burst_at}: expected {'|'.join(BURSTS)} and "
                             f"{'|'.join(BURST_AT)}")
    if not 0 <= o.burst_mb <= o.mem_mb or not 0 < o.burst_s <= 60 or not 0 <= o.burst_delay_ms <= 60_000:
        raise HintscopeError("--burst-mb must be 0..--mem, --burst-s 0..60, --burst-delay 0..60000")
    if o.init_on_alloc not in (None, 0, 1):
        raise HintscopeError(f"--init-on-alloc {o.init_on_alloc}: expected 0 or 1")
    qemu = find_qemu(o.qemu)
    bundle = Path(o.bundle)
    session.check_new_bundle(bundle)
    # Under TCG the host probe has no KVM ioctls to trace, but its QEMU uprobes (hint applies,
    # sync windows, migration states) are what the skipped-page accounting needs.
    probe_reason = session.probe_choice(o.probe)
    use_probe = probe_reason is None
    t0 = time.monotonic()
    img = await asyncio.to_thread(lab_image.build, False, lambda *_: None, o.guest_kernel)
    t_image = time.monotonic() - t0
    fw_args, fw_env = unpacked_qemu_args(qemu)
    os.environ.update(fw_env)  # inherited by the QEMU processes
    version = qemu_version(qemu)
    known = available_trace_events(qemu)
    events = [e for e in TRACE_EVENTS + EXTRA_TRACE if e in known]

    bundle.mkdir(parents=True, exist_ok=True)
    files = bundle / "files"
    files.mkdir(exist_ok=True)
    trace_log = files / "qemu-trace.log"
    work = Path(tempfile.mkdtemp(prefix="hs-guest-", dir="/tmp"))
    payload = build_payload(work, o)
    events_file = work / "trace-events"
    events_file.write_text("\n".join(events) + "\n")
    ports = {"src": work / "src-port.log", "dst": work / "dst-port.log"}
    append = (f"console=ttyS0 root=/dev/vda ro rootfstype=ext4 init=/sbin/hintscope-init panic=-1 "
              f"loglevel=4 fsck.mode=skip"
              + (f" init_on_alloc={o.init_on_alloc}" if o.init_on_alloc is not None else ""))
    mig_sock = work / "mig.sock"
    common = dict(workdir=work, qemu=qemu, accel="tcg", mem_mb=o.mem_mb, smp=o.smp, kernel=img["kernel"],
                  initrd=img["initrd"], append=append, hint=o.hint)
    src = Qemu(QemuConfig(name="src", trace_events_file=events_file, trace_file=trace_log,
                          extra=fw_args + _devices(img["path"], payload, ports["src"], o.hint) + o.extra_qemu,
                          **common))
    dst = Qemu(QemuConfig(name="dst", incoming=f"unix:{mig_sock}",
                          extra=fw_args + _devices(img["path"], payload, ports["dst"], o.hint) + o.extra_qemu,
                          **common))
    probe: HostProbe | None = None
    writer: BundleWriter | None = None
    summary: dict[str, Any] = {"bundle": str(bundle), "guest": "linux",
                               "probe": {"used": use_probe, "reason": probe_reason, "argv": None}}
    timings: dict[str, float] = {"image": round(t_image, 2)}
    end_reason = "error: interrupted"
    diff = None
    try:
        t1 = time.monotonic()
        await src.start()
        await dst.start()
        timings["boot_to_ready"] = round(await _wait_ready(src, ports["src"], o.boot_timeout_s), 2)
        if use_probe:
            probe = HostProbe(src.pid, bundle, trace_log, work / "probe.log",
                              extra=["--page-sends"] if o.page_sends else None)
            t2 = time.monotonic()
            await probe.start()
            timings["host_probe_attach"] = round(time.monotonic() - t2, 2)
            summary["probe"]["argv"] = probe.argv
        writer = BundleWriter(bundle, PRODUCER, append=use_probe)
        writer.meta["guest"] = {"kind": "linux", "kernel": {**img["guest_kernel"], "image_hash": img["hash"]}}
        if not use_probe:
            writer.meta["vmm"] = {"pid": src.pid, "binary": qemu, "version": version}
        writer.set_source("lab_qmp", "captured", interval_ms=o.poll_ms)
        writer.append("ram_map", await ram_map(src, o.mem_mb << 20))
        writer.meta["qemu_trace"] = {"file": "files/qemu-trace.log", "events": events, "pid": src.pid,
                                     "clock": "CLOCK_REALTIME (-msg timestamp=on)", "vmm": "source"}
        writer.meta["lab"] = summary
        summary.update({
            "hint": o.hint, "smp": o.smp, "mem_mb": o.mem_mb, "accel": "tcg", "qemu": qemu, "qemu_version": version,
            "image": {k: img.get(k) for k in ("path", "hash", "image_bytes", "content_bytes", "build_s", "kver")},
            "workload": {"fill_mb": o.fill_mb, "pressure_mb": o.pressure_mb, "writer_mb": o.writer_mb,
                         "guest_probe": o.guest_probe, "burst": o.burst, "burst_at": o.burst_at,
                         "burst_mb": o.burst_mb, "burst_s": o.burst_s, "burst_delay_ms": o.burst_delay_ms},
            "kernel_cmdline": append, "init_on_alloc": o.init_on_alloc,
            "src_pid": src.pid, "dst_pid": dst.pid, "src_argv": src.cfg.argv(), "dst_argv": dst.cfg.argv(),
            "migration": {"uri": f"unix:{mig_sock}", "max_bandwidth": o.bandwidth_mb << 20,
                          "downtime_limit_ms": o.downtime_ms},
            "timings_s": timings,
        })
        writer.flush()
        await asyncio.sleep(o.pre_ms / 1000)
        t3 = time.monotonic()
        rows = await session.migrate_recorded(src, writer, work, summary, tap=o.tap, forward=f"unix:{mig_sock}",
                                              bandwidth_mb=o.bandwidth_mb, downtime_ms=o.downtime_ms,
                                              timeout_s=o.timeout_s, poll_ms=o.poll_ms)
        timings["migrate_wall"] = round(time.monotonic() - t3, 2)
        summary["migration"].update(session.migration_outcome(rows))
        writer.flush()
        session.require_completed(summary["migration"])
        summary["states_after"] = await session.paused_both(src, dst, 20, 60)
        if o.memcheck:
            t4 = time.monotonic()
            diff = await session.memory_check(src, dst, o.mem_mb, work / "scratch")
            mc = diff.summary()
            mc["seconds"] = round(time.monotonic() - t4, 2)
            mc["method"] = session.MEMCHECK_METHOD
            writer.meta["memcheck"] = mc
            timings["memcheck"] = mc["seconds"]
        t_cont = time.monotonic()
        await dst.cmd("cont")
        summary["dst_status_after_health"] = await _watch_destination(dst, o.health_s)
        timings["health_window"] = round(time.monotonic() - t_cont, 2)
        end_reason = "target-exit"
    except (asyncio.CancelledError, HintscopeError) as e:
        end_reason = session.end_reason(e)
        raise
    finally:
        await session.teardown([src, dst], probe, files, summary,
                               {"src-guest-stream.log": ports["src"], "dst-guest-stream.log": ports["dst"]})
        if writer is not None:
            try:
                _finish_guest(writer, summary, files, diff, o)
            finally:
                timings["total"] = round(time.monotonic() - t0, 2)
                writer.close(end_reason=end_reason)
        session.finish_workdir(work, o.keep_workdir, summary)
    return summary


def _finish_guest(writer: BundleWriter, summary: dict, files: Path, diff, o: LinuxOptions) -> None:
    """Parse both guest stream files into the bundle, classify the memory diff, judge health."""
    streams = [(files / "src-guest-stream.log", "src"), (files / "dst-guest-stream.log", "dst")]
    try:
        gs = guest_stream.parse_streams(streams)
    except HintscopeError as e:
        writer.set_source("guest_probe", "unavailable", reason=str(e))
        summary["guest"] = {"error": str(e)}
        return
    guest_stream.write_to_bundle(writer, gs)
    t = gs.tables
    ev, rep = t["guest_events"], t["guest_reports"]
    kernel = writer.meta.get("guest", {}).get("kernel", {})
    reported = gs.header.get("kernel")
    kernel["reported_release"] = str(reported)[:100] if reported is not None else None
    if reported is not None and kernel.get("release") and str(reported) != kernel["release"]:
        gs.problems.append(f"guest stream header: the guest runs kernel {str(reported)[:100]!r}, "
                           f"the lab booted {kernel['release']}")
    g: dict[str, Any] = {"problems": gs.problems[:20], "counts": gs.counts,
                         "probe_points": gs.header.get("probes", {}), "load_ms": gs.header.get("load_ms")}
    switch = None
    if diff is not None:
        cls, switch = lost_pages.classify_guest_diffs(diff.differing, gs.tables)
        writer.append("guest_page_diffs", cls)
        lost = diff.differing.copy()
        lost["classification"] = cls["cls"].to_numpy(object) if len(cls) else lost["classification"]
        writer.append("lost_pages", lost)
        by = cls["cls"].value_counts().to_dict() if len(cls) else {}
        g["page_diffs"] = {"total": int(len(cls)), **{k: int(v) for k, v in by.items()},
                           "writer_pages": int(cls["writer_page"].sum()) if len(cls) else 0}
    hints = t["guest_hints"]
    before = hints[hints["guest_ns"] < switch] if switch is not None else hints
    rets = t["guest_returns"]
    g.update({
        "hinted_blocks": int(len(hints)), "hinted_blocks_before_switch": int(len(before)),
        "hint_runs": int(hints["run"].nunique()) if len(hints) else 0,
        "returned_blocks": rets["reason"].value_counts().to_dict() if len(rets) else {},
        "reuse_events": int(len(t["guest_reuse"])),
        # distinct ids in order of first read (the driver re-reads the id once per hinted block)
        "cmd_ids": [int(x) for x in pd.unique(ev.loc[ev["event"] == "cmd_id", "a0"].to_numpy())[:50]],
        "done_processed": bool(((ev["event"] == "return_exit") & (ev["a1"] == 1)).any()),
        "switch_guest_ns": switch,
    })
    # health: destination console and heartbeats after the switch
    dst_serial = _read(files / "dst-serial.log").decode("ascii", "replace")
    oops = [m.group(0) for m in OOPS_RE.finditer(dst_serial)][:5]
    beats = rep[(rep["word"] == "BEAT") & (rep["side"] == "dst")]
    lostw = rep[rep["word"] == "LOSTW"]
    health = {"status": summary.get("dst_status_after_health"), "oops": oops, "dst_heartbeats": int(len(beats)),
              "lostw": int(len(lostw)), "done_processed": g["done_processed"],
              "memfree_kb_last": int(beats["v0"].iloc[-1]) if len(beats) else None}
    health["ok"] = (health["status"] == "running" and not oops and len(beats) >= 2 and not len(lostw)
                    and (g["done_processed"] or not o.hint))
    summary["guest_result"] = g
    summary["dst_health"] = health
    writer.meta["lab"] = summary


def add_arguments(p) -> None:
    """Options only the Linux guest uses (added to `hintscope lab migrate`)."""
    g = p.add_argument_group("--guest linux")
    opts = [
        ("--smp", dict(type=int, default=2, help="vCPUs (linux guest; default 2)")),
        ("--fill", dict(type=int, default=400, metavar="MB", help="MiB of random data filled and freed (400)")),
        ("--pressure", dict(type=int, default=0, metavar="MB",
                            help="allocate this many MiB every 2 s so the balloon shrinker returns hinted blocks")),
        ("--writer", dict(type=int, default=16, metavar="MB", help="stamped writer buffer in MiB (16)")),
        ("--burst", dict(choices=BURSTS, default="none",
                         help="memory pressure while hinting holds blocks: anon burst, page-cache growth, fork-heavy")),
        ("--burst-at", dict(choices=BURST_AT, default="bulk",
                            help="start the burst at the bulk round's hint run, or --burst-delay later (mid)")),
        ("--burst-mb", dict(type=int, default=400, metavar="MB", help="MiB each burst pass allocates (400)")),
        ("--burst-s", dict(type=float, default=3.0, metavar="S", help="seconds the burst lasts (3)")),
        ("--burst-delay", dict(type=int, default=1500, metavar="MS", help="--burst-at mid: delay after hinting starts")),
        ("--init-on-alloc", dict(type=int, choices=(0, 1), default=None,
                                 help="guest kernel command line init_on_alloc=0|1 (default: the kernel's, 1 on Debian)")),
        ("--no-guest-probe", dict(action="store_true", help="do not run the BCC probe inside the guest")),
        ("--health", dict(type=float, default=15.0, metavar="S", help="seconds to watch the destination (15)")),
        ("--page-sends", dict(action="store_true",
                              help="host probe --page-sends: every page sent, zero pages included (~50 us a page)")),
    ]
    for flag, kw in opts:
        if flag not in p._option_string_actions:  # the shared parser may grow the same option
            g.add_argument(flag, **kw)
    lab_image.add_kernel_argument(g)


def run(args) -> int:
    mem = args.mem if args.mem != 256 else 1024  # 256 is the bare-metal guest's default
    bw = args.bandwidth if args.bandwidth != 1000 else 128
    o = LinuxOptions(bundle=Path(args.output), hint=args.hint == "on", smp=args.smp, mem_mb=mem, qemu=args.qemu,
                     probe=args.probe, guest_probe=not args.no_guest_probe, fill_mb=args.fill,
                     pressure_mb=args.pressure, writer_mb=args.writer, bandwidth_mb=bw,
                     timeout_s=max(args.timeout, 120.0), memcheck=not args.no_memcheck,
                     downtime_ms=getattr(args, "downtime", 300),
                     keep_workdir=args.keep_workdir, health_s=args.health,
                     page_sends=getattr(args, "page_sends", False), guest_kernel=args.guest_kernel,
                     tap=getattr(args, "tap", "on") == "on", burst=args.burst, burst_at=args.burst_at,
                     burst_mb=args.burst_mb, burst_s=args.burst_s, burst_delay_ms=args.burst_delay,
                     init_on_alloc=args.init_on_alloc)
    s = asyncio.run(run_linux(o))
    print_summary(s)
    h = s.get("dst_health", {})
    pd_ = s.get("guest_result", {}).get("page_diffs", {})
    return 0 if h.get("ok") and not pd_.get("lost-write") and not pd_.get("hinted-returned") else 1


def print_summary(s: dict) -> None:
    m = s.get("migration", {})
    ram = m.get("ram") or {}
    g = s.get("guest_result", {})
    h = s.get("dst_health", {})
    print(f"migration {m.get('status')}: {m.get('total_time_ms')} ms, downtime {m.get('downtime_ms')} ms, "
          f"transferred {ram.get('transferred')} B, normal {ram.get('normal')} pages, "
          f"{ram.get('dirty-sync-count')} syncs")
    print(f"guest: {g.get('hinted_blocks')} hinted blocks ({g.get('hinted_blocks_before_switch')} before switch), "
          f"returned {g.get('returned_blocks')}, reuse events {g.get('reuse_events')}, "
          f"DONE processed {g.get('done_processed')}")
    print(f"memory check: {g.get('page_diffs')}")
    print(f"destination: {'healthy' if h.get('ok') else 'NOT healthy'} {json.dumps(h)}")
    print(f"bundle: {s.get('bundle')}")


def results_row(bundle: str | Path) -> dict[str, Any]:
    """One line of numbers for a --guest linux bundle (docs/guest.md tables)."""
    from hintscope.bundle import read_bundle

    b = read_bundle(bundle)
    lab = b.meta.get("lab", {})
    m = lab.get("migration", {})
    ram = m.get("ram") or {}
    g = lab.get("guest_result", {})
    h = lab.get("dst_health", {})
    diffs = g.get("page_diffs", {})
    ver = str(lab.get("qemu_version", ""))
    return {
        "run": Path(bundle).name, "qemu": (ver.split("version ")[1].split()[0] if "version " in ver else ver),
        "kernel": b.meta.get("guest", {}).get("kernel", {}).get("release"),
        "smp": lab.get("smp"), "hint": "on" if lab.get("hint") else "off",
        "burst": f"{lab.get('workload', {}).get('burst', 'none')}@{lab.get('workload', {}).get('burst_at', '-')}",
        "init_on_alloc": lab.get("init_on_alloc"),
        "transferred_MB": round(ram.get("transferred", 0) / 1e6, 1), "normal_pages": ram.get("normal"),
        "total_ms": m.get("total_time_ms"), "downtime_ms": m.get("downtime_ms"),
        "hinted_blocks": g.get("hinted_blocks_before_switch"),
        "returned": g.get("returned_blocks"), "reuse": g.get("reuse_events"),
        "pages_differing": diffs.get("total"), "in_hinted_held": diffs.get("hinted-held", 0),
        "in_hinted_returned": diffs.get("hinted-returned", 0), "lost_write": diffs.get("lost-write", 0),
        "writer_pages": diffs.get("writer_pages", 0),
        "dst": "healthy" if h.get("ok") else (f"{h.get('status')}" + (", oops" if h.get("oops") else "")
                                               + ("" if h.get("dst_heartbeats") else ", no heartbeat")),
    }
