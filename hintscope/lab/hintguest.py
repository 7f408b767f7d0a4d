"""hintguest lab: a bare-metal free page hinting guest under real KVM, migrated, with a memory check.

The guest (lab/guests/hintguest/hintguest.c) drives virtio-balloon free page hinting itself and logs
every hint and every write it makes to a hinted page (``HG t=<tsc> ev=...`` lines on COM1). The run
(the shared driver is lab/session.py):

 1. build the guest (cached, through lab.build), start source and destination QEMU (lab.qemu;
    the destination with ``-incoming ... -S``);
 2. attach hintscope's host probe to the source (applies, syncs, GET/CLEAR bitmaps, memslots) and
    lab/hintguest_kicks.bt (the guest's kicks, for the guest-TSC -> host clock fit);
 3. migrate over a unix socket (through the tap by default), poll ``query-migrate``;
 4. ``pmemsave`` the paused source and destination, compare (lab.memdiff): ``lost_pages`` plus the
    guest's page records in both images (``hintguest_pages``);
 5. write the guest's log tables and its kicks into the bundle.

Every verdict on the run comes from hintscope.analysis: ``lost_pages.page_classes`` (which page is
a lost write, which a hinted page the host skipped), ``lost_pages.hint_rounds`` (writes lost per
round, who re-armed them first) and the detector (``hintscope analyze``).

Why a bare-metal guest: this host's KVM (PVM) cannot run a Linux guest, and the race under test
(spec-and-races.md §2, "c'") needs KVM's manual-protect dirty log, which TCG does not have.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hintscope.analysis import lost_pages
from hintscope.analysis.context import Context
from hintscope.bundle import BundleWriter, read_bundle
from hintscope.errors import HintscopeError
from hintscope.lab import bpftrace, build, memdiff, session
from hintscope.lab.hintguest_log import MAX_LOG_BYTES, page_records, read_serial_log, reuse_writes_in_memory
from hintscope.lab.qemu import TRACE_EVENTS, Qemu, QemuConfig, available_trace_events, find_qemu, qemu_label, qemu_version

GUEST = "hintguest"
BEHAVIOURS = ("polite", "early-reuse", "late-reuse")
PRODUCER = "lab hintguest"
BLOCK_PAGES = 1024
KICKS_BT = Path(__file__).with_name("hintguest_kicks.bt")
KICK_RE = re.compile(r"^KICK ts_ns=(\d{1,20}) tid=(\d{1,10}) port=(\d{1,5}) val=(\d{1,10})$", re.M)
READY_RE = re.compile(r"^HG t=\d+ ev=ready", re.M)
ERROR_RE = re.compile(r"^HG t=\d+ ev=error [^\n]*", re.M)
BALLOON_RE = re.compile(r"ev=balloon .*iobase=(0x[0-9a-f]{1,8})")
EXTRA_TRACE = ["migration_bitmap_clear_dirty"]   # the migration thread's clear_bmap chunk clears


# ---------------------------------------------------------------------------------------------
# the guest's kicks (kvm:kvm_pio): the only host fact the host probe does not record


def parse_kicks(text: str) -> pd.DataFrame:
    """``hintguest_kicks`` rows from the bpftrace output (other lines: its own banner and exit)."""
    m = np.array(KICK_RE.findall(text), dtype=np.int64).reshape(-1, 4)
    return pd.DataFrame({"ts_ns": m[:, 0], "tid": m[:, 1].astype(np.int32), "port": m[:, 2], "val": m[:, 3]})


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class HintguestOptions(session.MigrationOptions):
    bandwidth_mb: int = 32           # while the guest runs its rounds
    timeout_s: float = 90.0
    behaviour: str = "polite"
    dirty_ring: int = 0
    mem_mb: int = 2048
    nblocks: int = 8
    reuse: int = 4
    rounds: int = 3
    fill_mb: int = 64
    final_bandwidth_mb: int = 1024   # after the guest's bg_stop
    trace: str = "auto"            # auto | on | off (bpftrace: the guest's kicks, for the clock fit)
    page_sends: bool = False       # probe --page-sends: a uprobe hit per page sent (~50 us each here)
    stale_id: bool = False         # control: hints carry a stale id and are dropped by QEMU
    zero_before_hint: bool = False # zero each block after the cmd id, before hinting it (init_on_alloc)

    def append(self) -> str:
        return (f"behaviour={self.behaviour} nblocks={self.nblocks} reuse={self.reuse} rounds={self.rounds} "
                f"fill_mb={self.fill_mb}" + (" stale=1" if self.stale_id else "")
                + (" zero=1" if self.zero_before_hint else ""))


def _check(o: HintguestOptions) -> None:
    if o.behaviour not in BEHAVIOURS:
        raise HintscopeError(f"--behaviour {o.behaviour}: expected one of {', '.join(BEHAVIOURS)}")
    if o.mem_mb != 2048:
        raise HintscopeError("--mem: hintguest needs 2048 MiB (its pool sits in the second 1 GiB clear chunk)")
    session.check_dirty_ring(o.dirty_ring)
    if not 1 <= o.nblocks <= 64 or not 0 <= o.reuse <= 64 or o.rounds < 0:
        raise HintscopeError("--nblocks 1..64, --reuse 0..64, --rounds >= 0")


async def _migrate(src: Qemu, writer: BundleWriter, work: Path, summary: dict[str, Any], forward: str,
                   o: HintguestOptions) -> list[dict[str, Any]]:
    """Migrate at a bandwidth the guest's background writer outpaces, so the guest gets its
    rounds; once it logs bg_stop (all rounds done and logged) open the bandwidth to converge."""
    opened = False

    async def open_up() -> None:
        nonlocal opened
        if not opened and o.rounds and "ev=bg_stop" in session.read_serial(src.cfg.serial_path, MAX_LOG_BYTES):
            await src.cmd("migrate-set-parameters", {"max-bandwidth": o.final_bandwidth_mb << 20,
                                                     "downtime-limit": o.downtime_ms})
            opened = True

    # A 1 ms downtime limit keeps QEMU from completing while the guest still has rounds to run.
    return await session.migrate_recorded(src, writer, work, summary, tap=o.tap, forward=forward,
                                          bandwidth_mb=o.bandwidth_mb, downtime_ms=1 if o.rounds else o.downtime_ms,
                                          timeout_s=o.timeout_s, on_poll=open_up,
                                          hint="the guest did not finish its rounds")


async def _dst_health(dst: Qemu, timeout: float = 5.0) -> dict[str, Any]:
    """Resume the destination: a healthy guest keeps logging and, with cmd id DONE migrated, logs 'done'."""
    await dst.cmd("cont")
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = session.read_serial(dst.cfg.serial_path, MAX_LOG_BYTES)
        if "ev=done" in text and text.count("ev=hb") >= 2:
            break
        await asyncio.sleep(0.1)
    return {"status": await dst.status(), "done_seen": "ev=done" in text, "heartbeats": text.count("ev=hb"),
            "errors": text.count("ev=error")}


async def _start_kicks(o: HintguestOptions, pid: int, serial_text: str, log: Path) -> tuple[bpftrace.Bpftrace | None, str | None]:
    """The kick capture, or why there is none (then the analysis has no guest clock)."""
    if o.trace == "off":
        return None, "--trace off"
    reason = bpftrace.unavailable_reason()
    bal = BALLOON_RE.search(serial_text)
    if reason is None and not bal:
        reason = "the guest logged no balloon I/O base (ev=balloon iobase=...)"
    if reason is None:
        bt = bpftrace.Bpftrace(KICKS_BT, [pid, int(bal.group(1), 16) + 16], log)  # QUEUE_NOTIFY = BAR0 + 16
        try:
            await bt.start()
            return bt, None
        except HintscopeError as e:
            await bt.stop()
            reason = str(e)
    if o.trace == "on":
        raise HintscopeError(f"--trace on: {reason}")
    return None, reason


def analyse(bundle: Path, summary: dict[str, Any]) -> None:
    """Per-page classes, per-round results and host counts, all from hintscope.analysis."""
    b = read_bundle(bundle)
    pc = lost_pages.page_classes(b)
    by = pc["cls"].value_counts().to_dict() if pc is not None else {}
    ctx = Context(b)
    io = ctx.ioctls["name"].value_counts() if len(ctx.ioctls) else pd.Series(dtype="int64")
    r = summary["result"]
    r.update({"classes": {k: int(v) for k, v in sorted(by.items())},
              "lost_reuse_writes": int(by.get("lost-reuse-write", 0)), "lost_other": int(by.get("lost-other", 0)),
              "pages_differing": int(sum(v for k, v in by.items() if k != "reuse-ok"))})
    if summary.get("probe", {}).get("used"):
        r["host"] = {"applies": int(len(ctx.hint_applies)), "applied_bytes": int(ctx.hint_applies["len"].sum()),
                     "gets": int(io.get("GET_DIRTY_LOG", 0)), "clears": int(io.get("CLEAR_DIRTY_LOG", 0)),
                     "ring_resets": int(io.get("RESET_DIRTY_RINGS", 0)),
                     "syncs": int((ctx.qe["event"] == "sync_fetch_begin").sum()) if len(ctx.qe) else 0}
    rounds = lost_pages.hint_rounds(b, ctx)
    summary["rounds"] = json.loads(rounds.assign(cmd_id=rounds["cmd_id"].map(hex)).to_json(orient="records"))
    summary["clock"] = lost_pages.guest_clock(b) or {"method": "none"}
    mc = summary.get("memcheck", {})
    # the memory check's own count holds every hinted page the host skipped; the writes lost are these
    mc["lost_writes"] = r["lost_reuse_writes"] + r["lost_other"]
    mc["hinted_held_pages"] = int(by.get("hinted-held", 0))


async def run_hintguest(o: HintguestOptions) -> dict[str, Any]:
    """One migration of hintguest into bundle ``o.bundle``; returns meta['hintguest']."""
    _check(o)
    qemu = find_qemu(o.qemu)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise HintscopeError("hintguest needs /dev/kvm (the race under test is KVM's manual-protect dirty log)")
    bundle = Path(o.bundle)
    session.check_new_bundle(bundle)
    probe_reason = session.probe_choice(o.probe)
    t0 = time.monotonic()
    elf = await asyncio.to_thread(build.build_guest, GUEST)
    writer = BundleWriter(bundle, PRODUCER)
    files = bundle / "files"
    files.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hs-hintguest-", dir="/tmp"))
    sock = work / "mig.sock"
    common = dict(workdir=work, qemu=qemu, accel="kvm", dirty_ring=o.dirty_ring, mem_mb=o.mem_mb,
                  kernel=str(elf), append=o.append(), hint=True)
    known = available_trace_events(qemu)  # another QEMU may lack (or rename) one of them
    events = [e for e in TRACE_EVENTS + EXTRA_TRACE if e in known]
    events_file = work / "trace-events"
    events_file.write_text("\n".join(events) + "\n")
    src = Qemu(QemuConfig(name="src", trace_events_file=events_file, trace_file=files / "qemu-trace.log", **common))
    dst = Qemu(QemuConfig(name="dst", incoming=f"unix:{sock}", **common))
    summary: dict[str, Any] = {"behaviour": o.behaviour, "stale_id": o.stale_id,
                               "zero_before_hint": o.zero_before_hint, "mode": f"dirty-ring {o.dirty_ring}" if o.dirty_ring
                               else "bitmap (manual protect)", "append": o.append(), "guest_elf": str(elf),
                               "qemu": qemu, "qemu_version": qemu_version(qemu), "qemu_label": qemu_label(qemu),
                               "parse_problems": [], "result": {}}
    writer.meta["hintguest"] = summary
    # QEMU's trace log, mapped onto the host clock by the analysis through the bundle's clock anchors
    writer.meta["qemu_trace"] = {"file": "files/qemu-trace.log", "events": events, "vmm": "source",
                                 "clock": "CLOCK_REALTIME (-msg timestamp=on)"}
    writer.set_source("qemu_trace", "captured", None, file="files/qemu-trace.log")
    writer.flush()
    kicks: bpftrace.Bpftrace | None = None
    probe: session.HostProbe | None = None
    probe_task = None
    end = "error: interrupted"
    timings = summary.setdefault("timings_s", {})
    try:
        await src.start()
        if probe_reason is None:
            # hintscope's own probe joins this bundle; its BCC compile overlaps the guest's boot
            probe = session.HostProbe(src.pid, bundle, None, work / "probe.log",
                                      extra=["--append"] + (["--page-sends"] if o.page_sends else []))
            probe_task = asyncio.create_task(probe.start())
        await dst.start()
        m = await session.wait_serial(src.cfg.serial_path, READY_RE, 60, "'ev=ready' line", fail=ERROR_RE,
                                      limit=MAX_LOG_BYTES)
        summary["probe"] = {"used": False, "reason": probe_reason}
        if probe_task is not None:
            try:
                await probe_task
                summary["probe"] = {"used": True, "argv": probe.argv}
            except HintscopeError as e:
                await probe.stop()
                probe = None
                if o.probe == "on":
                    raise
                summary["probe"] = {"used": False, "reason": str(e)}
        timings["boot_to_ready"] = round(time.monotonic() - t0, 3)
        summary.update(src_pid=src.pid, dst_pid=dst.pid, src_argv=src.cfg.argv(), dst_argv=dst.cfg.argv())
        kicks, kick_reason = await _start_kicks(o, src.pid, m.string, work / "kicks.log")
        writer.set_source("hintguest_kicks", "captured" if kicks else "unavailable", reason=kick_reason,
                          script="lab/hintguest_kicks.bt")
        t_mig = time.monotonic()
        timings["trace_attach"] = round(t_mig - t0 - timings["boot_to_ready"], 3)
        rows = await _migrate(src, writer, work, summary, f"unix:{sock}", o)
        summary["migrate_wall_s"] = round(time.monotonic() - t_mig, 3)
        final = json.loads(rows[-1]["raw"])
        summary["migration"] = {k: final.get(k) for k in ("status", "total-time", "downtime", "setup-time", "ram")}
        session.require_completed({"status": final.get("status"), "error": final.get("error-desc", "no reason")})
        await session.paused_both(src, dst)
        if kicks is not None:
            writer.append("hintguest_kicks", parse_kicks(await kicks.stop()))
        if probe is not None:  # its tables must be complete before the analysis reads them
            summary["probe"]["exit"] = await probe.stop()

        t_mc = time.monotonic()
        scratch = work / "ram"
        try:
            s_img, d_img = await session.save_images(src, dst, o.mem_mb, scratch)
            diff = await asyncio.to_thread(memdiff.compare_images, s_img, d_img)
            summary["memcheck"] = session.record_memcheck(writer, diff, time.monotonic() - t_mc)
            log = read_serial_log(src.cfg.serial_path)
            pool0 = int(log.boot.get("pool", "0x40000"), 16)
            pool1 = pool0 + int(log.boot.get("pool_blocks", "64")) * BLOCK_PAGES
            mem_writes = reuse_writes_in_memory(s_img, (pool0, pool1))
            gfns = np.union1d(diff.differing["gfn"].to_numpy(np.int64), mem_writes["gfn"].to_numpy(np.int64))
            writer.append("hintguest_pages", page_records(s_img, d_img, gfns))
        finally:
            session.drop_scratch(scratch)
        timings["pmemsave_and_compare"] = round(time.monotonic() - t_mc, 3)
        summary["parse_problems"] += log.problems
        summary["reuse_writes_in_source_ram"] = int(len(mem_writes))
        summary["reuse_writes_in_log"] = int(len(log.writes))
        writer.append("hintguest_events", log.events)
        writer.append("hintguest_hints", log.hints)
        writer.append("hintguest_writes", log.writes)
        ids = log.events.loc[log.events["ev"] == "cfg", "cmd_id"]
        summary["result"].update({
            "pages_compared": int(diff.pages_compared),
            "guest_cmd_ids": [hex(int(x)) for x in ids[ids >= 0x80000000].unique()],
            "guest_hint_blocks": int(len(log.hints)), "guest_reuse_writes": int(len(log.writes)),
            "guest_errors": log.errors, "used_timeouts": int((log.events["ev"] == "used_timeout").sum())})
        writer.flush()
        analyse(bundle, summary)
        summary["dst_after_cont"] = await _dst_health(dst)
        end = "target-exit"
    except (asyncio.CancelledError, HintscopeError) as e:
        end = session.end_reason(e)
        raise
    finally:
        if kicks is not None and kicks.proc is not None and kicks.proc.returncode is None:
            await kicks.stop()
        if probe_task is not None and not probe_task.done():
            probe_task.cancel()
            with contextlib.suppress(BaseException):
                await probe_task
        await session.teardown([src, dst], probe, files, summary)
        summary["total_s"] = round(time.monotonic() - t0, 3)
        writer.close(end_reason=end)
        session.finish_workdir(work, o.keep_workdir, summary)
    return summary


# ---------------------------------------------------------------------------------------------
# CLI: `hintscope lab hintguest` (the lead registers ("lab", "hintscope.lab.hintguest") in cli.COMMANDS)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("hintguest", help="migrate the bare-metal hinting guest under KVM and check for lost writes",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--behaviour", default="polite", choices=BEHAVIOURS)
    p.add_argument("--dirty-ring", type=int, default=0, metavar="N", help="KVM dirty ring entries (0 = bitmap, manual protect)")
    p.add_argument("--nblocks", type=int, default=8, help="4 MiB blocks hinted per cmd id")
    p.add_argument("--reuse", type=int, default=4, help="pages written per hinted block (reuse behaviours)")
    p.add_argument("--rounds", type=int, default=3, help="cmd ids after which the background writer stops")
    p.add_argument("--bandwidth", type=int, default=32, metavar="MIBPS",
                   help="migration bandwidth during the guest's rounds (raised to 1 GiB/s after)")
    p.add_argument("--timeout", type=float, default=90.0)
    p.add_argument("--trace", default="auto", choices=["auto", "on", "off"],
                   help="capture the guest's kicks with bpftrace (kvm:kvm_pio), the guest clock fit")
    p.add_argument("--probe", default="auto", choices=["auto", "on", "off"],
                   help="hintscope's host probe on the source QEMU (auto: when root and BCC are there)")
    p.add_argument("--page-sends", action="store_true",
                   help="probe every page send (buffer_is_zero uprobe; ~50 us per page on this host)")
    p.add_argument("--stale-id", action="store_true",
                   help="control: the start message carries a stale id, so QEMU drops every hint")
    p.add_argument("--zero-before-hint", action="store_true",
                   help="zero every page of a block after the cmd id and before hinting it, as a Linux guest "
                        "with init_on_alloc does when its driver allocates the block")
    p.add_argument("--qemu", default=None, metavar="PATH")
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("-o", "--output", required=True, metavar="BUNDLE")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    o = HintguestOptions(bundle=Path(args.output), behaviour=args.behaviour, dirty_ring=args.dirty_ring,
                         nblocks=args.nblocks, reuse=args.reuse, rounds=args.rounds, bandwidth_mb=args.bandwidth,
                         timeout_s=args.timeout, trace=args.trace, qemu=args.qemu, keep_workdir=args.keep_workdir,
                         stale_id=args.stale_id, probe=args.probe, page_sends=args.page_sends,
                         zero_before_hint=args.zero_before_hint)
    return report_run(o, asyncio.run(run_hintguest(o)))


def run_from_migrate(args: argparse.Namespace) -> int:
    """``hintscope lab migrate --guest hintguest``: the shared options that apply, hintguest defaults
    for the rest (2 GiB, 8 blocks x 4 reuse pages, 3 rounds, 32 MiB/s while the rounds run)."""
    if getattr(args, "hint", "on") == "off":
        raise HintscopeError("--hint off: hintguest drives the hinting device itself; for a hint-off control "
                             "with the same guest writes use --stale-id (QEMU then drops every hint)")
    o = HintguestOptions(bundle=Path(args.output), behaviour=args.behaviour, dirty_ring=args.dirty_ring,
                         stale_id=args.stale_id, qemu=args.qemu, keep_workdir=args.keep_workdir,
                         probe=args.probe, timeout_s=max(float(args.timeout), 90.0), tap=args.tap == "on",
                         zero_before_hint=getattr(args, "zero_before_hint", False))
    return report_run(o, asyncio.run(run_hintguest(o)))


def make_sample(path: str | os.PathLike, behaviour: str = "early-reuse", **kw: Any) -> dict[str, Any]:
    """Record a committed-size sample (about 1 MB; root, KVM and BCC needed): one probed bitmap-mode run.

    The 5-6 MB QEMU trace log is dropped afterwards; the page sends stay in the tap's ``page_sends``
    (the lab migrates through the tap by default). ``meta-sample.json`` records that."""
    o = HintguestOptions(bundle=Path(path), behaviour=behaviour, probe="on", **kw)
    s = asyncio.run(run_hintguest(o))
    log = Path(path) / "files" / "qemu-trace.log"
    size = log.stat().st_size if log.exists() else 0
    log.unlink(missing_ok=True)
    w = BundleWriter(Path(path), "sample", append=True)
    w.meta["sample"] = {"made_by": "hintscope.lab.hintguest.make_sample", "behaviour": behaviour,
                        "dropped": {"files/qemu-trace.log": size},
                        "note": "QEMU trace log dropped for size; page sends are in page_sends (tap)"}
    w.set_source("qemu_trace", "partial", reason="files/qemu-trace.log dropped from the sample for size; "
                 "page sends are in page_sends (tap)")
    w.close(end_reason="target-exit")
    return s


def report_run(o: HintguestOptions, s: dict[str, Any]) -> int:
    """Print the run; every count of lost writes comes from hintscope.analysis (``analyse``)."""
    r = s["result"]
    mig = s["migration"]
    print(f"{s['behaviour']} / {s['mode']}: migration {mig['status']} in {mig['total-time']} ms, "
          f"{(mig.get('ram') or {}).get('dirty-sync-count')} syncs")
    print(f"guest: {len(r['guest_cmd_ids'])} cmd ids, {r['guest_hint_blocks']} hint blocks, "
          f"{r['guest_reuse_writes']} reuse writes")
    if "host" in r:
        h = r["host"]
        print(f"host: {h['applies']} hint applies ({h['applied_bytes'] >> 20} MiB), {h['syncs']} syncs, "
              f"{h['gets']} GET_DIRTY_LOG, {h['clears']} CLEAR_DIRTY_LOG, {h['ring_resets']} ring resets")
    print(f"memory: {r['classes']}")
    for v in s.get("rounds", []):
        by = (f"first re-armed by a KVM_CLEAR_DIRTY_LOG from the {v['cleared_by']} "
              f"{v['clear_minus_first_write_us']} us after the first write" if v["cleared_by"]
              else "no KVM_CLEAR_DIRTY_LOG re-armed them")
        print(f"  round {v['round']} {v['cmd_id']}: {v['lost']}/{v['writes']} reuse writes lost "
              f"({v['rearm_wipe']} explained as rearm-wipe); {by}")
    d = s.get("dst_after_cont", {})
    print(f"destination after cont: {d.get('status')}, done seen {d.get('done_seen')}, {d.get('heartbeats')} heartbeats")
    print(f"lost writes: {r['lost_reuse_writes']} reuse, {r['lost_other']} other; bundle {o.bundle}")
    print(f"findings: hintscope analyze {o.bundle}")
    return 1 if (r["lost_reuse_writes"] or r["lost_other"]) else 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m hintscope.lab.hintguest")
    add_parser(ap.add_subparsers(dest="cmd", required=True))
    a = ap.parse_args()
    try:
        raise SystemExit(a.func(a))
    except HintscopeError as e:
        print(f"hintscope: error: {e}")
        raise SystemExit(2)
