"""Host probe: a VMM's KVM dirty-log ioctls, dirty-ring tracepoints and QEMU uprobes -> a bundle.

``hintscope probe host --pid PID -o BUNDLE`` (root) traces one VMM process (all its threads):

* ``syscalls:sys_enter/exit_ioctl`` for KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG,
  KVM_SET_USER_MEMORY_REGION(2), KVM_RESET_DIRTY_RINGS and KVM_ENABLE_CAP -> ``ioctls``,
  ``memslots``, and the bitmaps GET returned / CLEAR passed, read in the kernel at syscall exit
  and emitted as runs of equal nonzero 64-bit words -> ``bitmap_words``;
* ``kvm:kvm_dirty_ring_push`` / ``kvm_dirty_ring_reset`` -> ``ring_push``, ``ring_reset``;
* when the target is QEMU, uprobes on its dynamic symbols -> ``qemu_events`` (qemu_uprobes.py).

Records travel through one BPF ring buffer that :class:`hintscope.probes.decode.RingConsumer`
reads in bulk.  The polling thread only copies records out of the ring; every ``--flush-interval``
seconds it hands them to a writer thread (:mod:`hintscope.probes.capture_writer`) that decodes
them and flushes the bundle, so a slow disk never stops the ring from being drained and a SIGKILL
keeps what was flushed.  It stops on SIGINT/SIGTERM, after ``--duration``, or when the target exits,
and prints ``ATTACHED`` on stdout once every probe is attached (the lab waits for that line).
See docs/probes.md.
"""

from __future__ import annotations

import argparse
import ctypes as ct
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hintscope.bundle import BundleWriter, clock_anchor
from hintscope.errors import HintscopeError
from hintscope.probes import bcc_env, qemu_uprobes
from hintscope.probes.capture_writer import DEFAULT_MAX_BACKLOG_BYTES, CaptureWriter
from hintscope.probes.decode import LOST_BITMAP_TRUNC, LOST_INDEX, LOST_SLOT_UNKNOWN, STRIDE, Decoded, RingConsumer
from hintscope.probes.host_progress import ProgressView

BPF_C = Path(__file__).with_name("host.bpf.c")
PRODUCER = "probe host"
DEFAULT_RING_MB = 16
# 65536 MB overflows the map's u32 size; beyond 1 GiB of locked kernel memory is never sane here.
MAX_RING_MB = 1024
# Keep in step with host.bpf.c: chunks of 8 words per bounded loop, 1 + 32 tail calls.
CHUNKS_PER_CALL = 256
MAX_SLOT_PAGES = 33 * CHUNKS_PER_CALL * 8 * 64
# The ring is polled 4 times in the time it takes to fill at 500k records/s (above the 455k/s
# flat-out rate measured with the probe attached): 87 ms for 16 MiB, 22 ms for 4 MiB.
POLL_FILL_RATE = 500_000
POLL_INTERVAL_S = (0.01, 0.1)
MAX_READS_PER_POLL = 8
HANDOFF_BYTES = 32 << 20    # a batch buffer's size: records go to the writer when it is full or the interval ends
LOST_SERIES_RES_NS = 1_000_000_000   # meta lost_series: contiguous lossy polls merge up to this span
# Reading the per-CPU lost counters (6 map lookups) and /proc/PID/stat cost about as much as moving
# 2k records: done every few polls, not every one.
LOST_SAMPLE_S = 0.2
ALIVE_CHECK_S = 0.25


def check_ring_mb(ring_mb: int) -> None:
    """One-line error for a ring size the BPF map cannot take (it would fail only at load time)."""
    if not isinstance(ring_mb, int) or ring_mb <= 0 or ring_mb & (ring_mb - 1) or ring_mb > MAX_RING_MB:
        raise HintscopeError(f"--ring-mb {ring_mb}: must be a power of two from 1 to {MAX_RING_MB} "
                             "(the BPF ring buffer is a power-of-two number of pages)")


@dataclass
class Target:
    pid: int
    exe: str
    starttime: int
    kvm_fds: list[str]


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm may hold spaces and parentheses: the fields after it start after the last ')'.
    return raw[raw.rindex(")") + 2:].split()


def inspect_target(pid: int) -> Target:
    """Check that ``pid`` is a live KVM user; one-line HintscopeError otherwise."""
    if pid <= 0:
        raise HintscopeError(f"pid {pid}: not a valid process id")
    st = _stat_fields(pid)
    if st is None or st[0] in "ZX":
        raise HintscopeError(f"pid {pid}: no such process")
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except PermissionError:
        raise HintscopeError(f"pid {pid}: cannot read /proc/{pid}/fd (run as root)") from None
    except FileNotFoundError:
        raise HintscopeError(f"pid {pid}: no such process") from None
    kvm = []
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link == "/dev/kvm" or link.startswith("anon_inode:kvm-vm"):
            kvm.append(link)
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = "?"
    if not kvm and not qemu_uprobes.is_qemu(exe):
        # A QEMU under TCG is still worth probing (its uprobes); anything else without KVM is not.
        raise HintscopeError(f"pid {pid} ({os.path.basename(exe)}): not a KVM user "
                             "(no /dev/kvm or kvm-vm file descriptor in /proc/PID/fd)")
    return Target(pid=pid, exe=exe, starttime=int(st[19]), kvm_fds=sorted(set(kvm)))


def read_pidfile(path: str) -> int:
    try:
        text = Path(path).read_text().strip()
    except OSError as e:
        raise HintscopeError(f"{path}: cannot read pid file ({e.strerror})") from None
    if not text.isdigit():
        raise HintscopeError(f"{path}: not a pid file (expected a number, got {text[:40]!r})")
    return int(text)


def vmm_version(exe: str) -> str | None:
    """First line of ``<exe> --version``; None when it cannot be run."""
    if exe.endswith(" (deleted)") or not os.access(exe, os.X_OK):
        return None
    try:
        r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (r.stdout or r.stderr).strip().splitlines()
    return lines[0][:200] if lines else None


class PrecopyListFinder:
    """Finds which NotifierWithReturnList is the precopy one.

    notifier_with_return_list_notify serves every such list (QEMU >= 9 also runs the migration
    state notifiers through it, with event numbers that collide with precopy reasons).  The
    precopy list is the one notified with BEFORE_BITMAP_SYNC (1) right before each
    memory_global_dirty_log_sync on the same thread.  Only these rare events are looked at.
    """

    def __init__(self):
        self.last: dict[int, tuple[int, int]] = {}   # tid -> (list, reason) of its last notify
        self.votes: dict[int, int] = {}

    def feed(self, q: dict) -> None:
        ev = q["event"]
        keep = (ev == "precopy_notify") | (ev == "sync_fetch_begin")
        for e, tid, a0, a1 in zip(ev[keep], q["tid"][keep], q["a0"][keep], q["a1"][keep]):
            if e == "precopy_notify":
                self.last[int(tid)] = (int(a0), int(a1))
            elif self.last.get(int(tid), (0, -1))[1] == 1:
                lst = self.last[int(tid)][0]
                self.votes[lst] = self.votes.get(lst, 0) + 1

    @property
    def precopy_list(self) -> int | None:
        return max(self.votes, key=self.votes.get) if self.votes else None


class HostProbe:
    """In-process API: ``start()``, then ``poll()`` periodically, then ``stop(reason)``."""

    def __init__(self, pid: int, out: str | os.PathLike, *, qemu: str = "auto", page_sends: bool = False,
                 vq_pops: bool = True, ring_mb: int = DEFAULT_RING_MB, flush_interval: float = 1.0, qemu_trace_log: str | None = None,
                 append: bool = False, max_backlog_bytes: int = DEFAULT_MAX_BACKLOG_BYTES):
        check_ring_mb(ring_mb)
        self.pid = pid
        self.out = Path(out)
        self.qemu = qemu
        self.page_sends = page_sends
        self.vq_pops = vq_pops
        self.ring_bytes = ring_mb << 20
        self.flush_interval = flush_interval
        self.qemu_trace_log = qemu_trace_log
        self.append = append
        self.target: Target | None = None
        self.w: BundleWriter | None = None
        self.b = None
        self.ring: RingConsumer | None = None
        self.writer: CaptureWriter | None = None
        self.max_backlog_bytes = max_backlog_bytes
        self.events = 0                            # records taken from the ring (polling thread)
        self.records = 0                           # valid records decoded (writer thread)
        self.bad = 0
        self._batch = None                         # ring records not yet handed to the writer: _batch[:_fill]
        self._fill = 0
        self._held_since: float | None = None      # the writer's backlog was full: records left in the ring
        self.held_s = 0.0
        self._lost_seen: dict[int, int] = {}
        self._lost_sample_ns = time.monotonic_ns()
        self.lost: dict[str, int] = {}             # per-source totals of the BPF lost counters (polling thread)
        self.lost_series: dict[str, list[list[int]]] = {}
        self.new_lost: dict[str, int] = {}        # lost since the progress view last took them
        self.syncs = 0                             # qemu_events sync_fetch_begin seen
        self.hint_applies = 0
        self._last_flush = 0.0
        self._stopped = False
        self._precopy = PrecopyListFinder()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self.target = inspect_target(self.pid)
        reason = bcc_env.bpf_unavailable_reason()
        if reason:
            raise HintscopeError(reason)
        BPF = bcc_env.load_bcc()
        self.w = BundleWriter(self.out, producer=PRODUCER, append=self.append)
        try:
            self._start_bpf(BPF)
        except BaseException as e:
            self._abort(e)
            raise

    def _start_bpf(self, BPF) -> None:
        t0 = time.monotonic()
        want_qemu = self.qemu == "on" or (self.qemu == "auto" and qemu_uprobes.is_qemu(self.target.exe))
        text = BPF_C.read_text() + ("\n" + qemu_uprobes.bpf_text() if want_qemu else "")
        cflags = [f"-DTARGET_TGID={self.pid}", f"-DRB_PAGES={self.ring_bytes // 4096}",
                  f"-DCHUNKS_PER_CALL={CHUNKS_PER_CALL}", "-Wno-macro-redefined"]
        # The BPF reads QEMU structs (VirtQueueElement), whose layout is chosen by version before compiling.
        version = vmm_version(self.target.exe)
        layout, layout_basis = qemu_uprobes.element_layout(version)
        if layout is not None:
            cflags += layout.cflags()
        try:
            self.b = BPF(text=text, cflags=cflags)
            walk = self.b.load_func("bitmap_walk", BPF.TRACEPOINT)
            self.b["tail"][ct.c_int(0)] = ct.c_int(walk.fd)
        except Exception as e:  # BCC raises bare Exception for compile and load errors: one line for the user
            raise bcc_env.compile_error(e) from None
        w = self.w
        kvm = bool(self.target.kvm_fds)
        no_kvm = None if kvm else "target has no KVM file descriptor (QEMU under TCG): no KVM ioctls to trace"
        w.set_source("host_ioctl", "captured" if kvm else "unavailable", no_kvm,
                     tracepoints=["syscalls:sys_enter_ioctl", "syscalls:sys_exit_ioctl"])
        w.set_source("host_dirty_ring", "captured" if kvm else "unavailable", no_kvm,
                     tracepoints=["kvm:kvm_dirty_ring_push", "kvm:kvm_dirty_ring_reset"])
        if want_qemu:
            exe = self.target.exe
            if exe.endswith(" (deleted)"):
                exe = f"/proc/{self.pid}/exe"
            q = qemu_uprobes.attach(self.b, exe, self.pid, page_sends=self.page_sends,
                                    vq_pops=("--no-vq-pops" if not self.vq_pops else
                                             None if layout is not None else layout_basis))
            q["vq_element_layout"] = layout.meta(layout_basis) if layout is not None else {"basis": layout_basis}
            w.set_source("qemu_uprobes", q.pop("status"), q.pop("reason"), **q)
        else:
            why = "disabled (--qemu off)" if self.qemu == "off" else f"target is not QEMU ({self.target.exe})"
            w.set_source("qemu_uprobes", "unavailable", why)
        self.ring = RingConsumer(self.b["events"].map_fd, self.ring_bytes)
        if want_qemu:
            # migrate_state numbers are enum positions, and the enum changed in QEMU 9.1.
            w.meta["sources"]["qemu_uprobes"]["migration_states"] = qemu_uprobes.migration_states(version)
        w.meta["vmm"] = {
            "pid": self.pid, "exe": self.target.exe, "version": version,
            "cmdline": self._cmdline(), "kvm_fds": self.target.kvm_fds,
            "kind": "qemu" if qemu_uprobes.is_qemu(self.target.exe) else "other",
        }
        w.meta["host_probe"] = {
            "ring_bytes": self.ring_bytes, "record_bytes": STRIDE, "max_slot_pages_read": MAX_SLOT_PAGES,
            "attach_s": round(time.monotonic() - t0, 3), "page_sends": self.page_sends,
            "vq_pops": self.vq_pops,
        }
        w.meta.setdefault("clock_anchors", []).append(clock_anchor("attached"))
        self._last_flush = time.monotonic()
        w.flush()
        self.writer = CaptureWriter(w, self._on_decoded, self.max_backlog_bytes)

    def _cmdline(self) -> str:
        try:
            raw = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except OSError:
            return ""
        return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:4096]

    @property
    def poll_interval(self) -> float:
        lo, hi = POLL_INTERVAL_S
        return min(hi, max(lo, self.ring_bytes / STRIDE / POLL_FILL_RATE / 4))

    def target_alive(self) -> bool:
        st = _stat_fields(self.pid)
        return st is not None and st[0] not in "ZX" and int(st[19]) == self.target.starttime

    def poll(self) -> int:
        """Take every committed record out of the ring; hand them to the writer when due.

        Never waits on disk.  Returns records taken; raises the writer's error (one line) once
        it has one.
        """
        if self.writer.error is not None:
            raise self.writer.error
        n = 0
        if self.writer.full:
            # Past the backlog bound the records stay in the ring, where the kernel counts what it drops.
            if self._held_since is None:
                self._held_since = time.monotonic()
        else:
            if self._held_since is not None:
                self.held_s += time.monotonic() - self._held_since
                self._held_since = None
            n = self._take(MAX_READS_PER_POLL)
        if time.monotonic_ns() - self._lost_sample_ns >= LOST_SAMPLE_S * 1e9:
            self._collect_lost()
        if time.monotonic() - self._last_flush >= self.flush_interval:
            self._handoff()
        return n

    def _take(self, max_reads: int | None) -> int:
        n = 0
        reads = 0
        # Bounded under a flood, so the caller still gets to check signals, deadlines and hand-offs.
        while max_reads is None or reads < max_reads:
            if self._batch is None:
                self._batch = self.writer.buffer(HANDOFF_BYTES)
            elif len(self._batch) - self._fill < STRIDE:
                self._handoff()
                continue
            got = self.ring.read_into(self._batch, self._fill)
            reads += 1
            if not got:
                break
            self._fill += got * STRIDE
            n += got
        self.events += n
        return n

    def _handoff(self) -> None:
        """Queue the records taken so far with a snapshot of what the polling thread knows."""
        batch, fill, self._batch, self._fill = self._batch, self._fill, None, 0
        lost = dict(self.lost)
        series = {k: [list(e) for e in v] for k, v in self.lost_series.items()}
        consumed = self.ring.consumed

        def update_meta() -> None:     # runs on the writer thread, the only one touching meta meanwhile
            self._set_lost_meta(lost, series)
            self._update_meta(consumed)

        self.writer.submit(batch, fill, update_meta)
        self._last_flush = time.monotonic()

    def _on_decoded(self, d: Decoded) -> None:
        """Writer thread: counters and the precopy-list vote from one decoded batch."""
        self.records += d.records
        self.bad += d.bad
        q = d.tables.get("qemu_events")
        if q is not None:
            self._precopy.feed(q)
            ev = q["event"]
            self.syncs += int((ev == "sync_fetch_begin").sum())
            self.hint_applies += int((ev == "hint_apply").sum())

    def stop(self, reason: str) -> None:
        """Detach, drain the ring, let the writer finish every batch, close the bundle.

        A writer failure ends up in meta ``end_reason`` and is raised (one line) unless the
        capture is already ending on an error.
        """
        if self._stopped:
            return
        self._stopped = True
        err = None
        raise_err = False   # an error already ending the capture is being reported by the caller
        try:
            self._detach()    # no new records; the maps stay open for the last drain
            self._take(None)  # everything, whatever the backlog: nothing new arrives now
            self._collect_lost()
            self._handoff()
        finally:
            if self.writer is not None:
                self.writer.close()
                err = self.writer.error
            try:
                if self.ring:
                    self.ring.close()
                self.b.cleanup()
            finally:
                try:
                    # the writer thread has ended: meta belongs to this thread again
                    self._set_lost_meta(self.lost, self.lost_series)
                    self._copy_trace_log()
                    self._update_meta()
                finally:
                    if err is not None and not reason.startswith("error"):
                        reason = f"error: {err} (capture was ending: {reason})"
                        raise_err = True
                    self.w.close(end_reason=reason)
        if raise_err:
            raise err

    def _detach(self) -> None:
        b = self.b
        for k in list(b.uprobe_fds):
            b.detach_uprobe_event(k)
        for k in list(b.tracepoint_fds):
            b.detach_tracepoint(k)

    def _abort(self, e: BaseException) -> None:
        if self.b is not None:
            try:
                self.b.cleanup()
            except Exception:  # noqa: BLE001 - already failing: detaching must not hide the first error
                pass
        if self.w is not None:
            self.w.close(end_reason=f"error: {e}")

    # -- bookkeeping ---------------------------------------------------------------------------
    def _collect_lost(self) -> None:
        """Take the per-CPU lost counters' growth since the last poll into meta.

        ``lost`` keeps totals; ``lost_series[source]`` (both copied into meta at each hand-off) gets one
        ``[ts_ns, lost, since_ns]`` entry per interval (since_ns, ts_ns] that lost events
        (CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns), so the analysis can mark the windows
        that are incomplete; intervals without loss are not stored, and consecutive lossy polls
        merge into intervals of up to LOST_SERIES_RES_NS.
        """
        table = self.b["lost"]
        now = time.monotonic_ns()
        since, self._lost_sample_ns = self._lost_sample_ns, now
        by_source: dict[str, int] = {}
        for idx, (source, _) in LOST_INDEX.items():
            total = sum(int(v) for v in table[ct.c_int(idx)])
            delta = total - self._lost_seen.get(idx, 0)
            if delta:
                self._lost_seen[idx] = total
                if source:
                    by_source[source] = by_source.get(source, 0) + delta
        if not by_source:
            return
        for source, delta in by_source.items():
            self.lost[source] = self.lost.get(source, 0) + delta
            entries = self.lost_series.setdefault(source, [])
            last = entries[-1] if entries else None
            if last is not None and last[0] == since and now - last[2] < LOST_SERIES_RES_NS:
                # Sustained loss: extend the open interval, so the series grows ~1 entry/s, not 20.
                last[0] = now
                last[1] += delta
            else:
                entries.append([now, delta, since])
            self.new_lost[source] = self.new_lost.get(source, 0) + delta

    def _set_lost_meta(self, lost: dict[str, int], series: dict[str, list[list[int]]]) -> None:
        # Absolute values from the BPF counters, not increments: a batch applied late is still exact.
        self.w.meta["lost"].update(lost)
        if series:
            self.w.meta["lost_series"] = series

    def take_new_lost(self) -> dict[str, int]:
        new, self.new_lost = self.new_lost, {}
        return new

    def _update_meta(self, consumed: int | None = None) -> None:
        hp = self.w.meta["host_probe"]
        wr = self.writer
        decode_s = wr.decode_s if wr else 0.0
        hp["records"] = self.records
        hp["bad_records"] = self.bad
        hp["decode_s"] = round(decode_s, 4)
        hp["decode_rate_per_s"] = int(self.records / decode_s) if decode_s > 0 else None
        hp["ring_consumed"] = consumed if consumed is not None else self.events
        if wr is not None:
            held = self.held_s + (time.monotonic() - self._held_since if self._held_since is not None else 0.0)
            hp["writer"] = {"batches": wr.batches, "write_s": round(wr.write_s, 4), "cpu_s": round(wr.cpu_s, 4),
                            "decode_cpu_s": round(wr.decode_cpu_s, 4), "write_cpu_s": round(wr.write_cpu_s, 4),
                            "backlog_limit_bytes": wr.max_backlog_bytes, "max_backlog_bytes": wr.max_backlog_seen,
                            "ring_held_s": round(held, 3)}
        unknown = self._lost_seen.get(LOST_SLOT_UNKNOWN, 0)
        trunc = self._lost_seen.get(LOST_BITMAP_TRUNC, 0)
        q = self.w.meta["sources"].get("qemu_uprobes")
        if q is not None and q.get("status") != "unavailable":
            # qemu_events.precopy_notify rows with a0 == this are the precopy notifiers
            q["precopy_list"] = self._precopy.precopy_list
        hp["get_unknown_slot"] = unknown
        hp["bitmap_truncated"] = trunc
        if unknown or trunc:
            why = []
            if unknown:
                why.append(f"{unknown} GET_DIRTY_LOG on slots created before the probe attached (bitmap not read)")
            if trunc:
                why.append(f"{trunc} bitmaps longer than {MAX_SLOT_PAGES} pages truncated")
            if self.target.kvm_fds:
                self.w.set_source("host_ioctl", "partial", "; ".join(why))

    def _copy_trace_log(self) -> None:
        if not self.qemu_trace_log:
            return
        src = Path(self.qemu_trace_log)
        if not src.is_file():
            self.w.set_source("qemu_trace", "unavailable", f"{src}: no such file at the end of the capture")
            return
        dst = self.w.attach_file("qemu-trace.log")
        shutil.copyfile(src, dst)
        self.w.set_source("qemu_trace", "captured", None, source=str(src), file=f"files/{dst.name}",
                          bytes=dst.stat().st_size)


# -- command line -------------------------------------------------------------------------------
def _default_out(pid: int) -> str:
    return f"hintscope-host-{pid}-{time.strftime('%Y%m%d-%H%M%S')}"


def run(args) -> int:
    stop_sig: list[str] = []

    def on_signal(signum, _frame):
        stop_sig.append("sigint" if signum == signal.SIGINT else "sigterm")

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        pid = args.pid if args.pid is not None else read_pidfile(args.pidfile)
        probe = HostProbe(pid, args.output or _default_out(pid), qemu=args.qemu, page_sends=args.page_sends,
                          vq_pops=not args.no_vq_pops,
                          ring_mb=args.ring_mb, flush_interval=args.flush_interval,
                          qemu_trace_log=args.qemu_trace_log, append=args.append)
        probe.start()
        print("ATTACHED", flush=True)
        view = ProgressView(force=getattr(args, "progress", False))
        deadline = time.monotonic() + args.duration if args.duration else None
        reason = None
        next_alive = 0.0
        try:
            while reason is None:
                probe.poll()
                view.tick(probe)
                now = time.monotonic()
                if stop_sig:
                    reason = stop_sig[0]
                elif deadline is not None and now >= deadline:
                    reason = "duration"
                elif now >= next_alive and not probe.target_alive():
                    reason = "target-exit"
                else:
                    if now >= next_alive:
                        next_alive = now + ALIVE_CHECK_S
                    time.sleep(probe.poll_interval)
        except BaseException as e:
            view.close()
            probe.stop(f"error: {type(e).__name__}: {e}")
            raise
        probe.stop(reason)
        view.close(probe)
        lost = probe.w.meta.get("lost", {})
        print(f"hintscope: probe host: {probe.records} records, rows {probe.w.meta.get('rows', {})}, "
              f"lost {lost or 0}, end {reason} -> {probe.out}", file=sys.stderr)
        if getattr(args, "exit_now", False):
            # The bundle is closed and fsynced, the BPF programs detached: tearing the interpreter
            # down would only cost 0.12-0.2 CPU-s (pandas' module teardown), measured in bench_capture.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    who = ap.add_mutually_exclusive_group(required=True)
    who.add_argument("--pid", type=int, help="VMM process to trace (all its threads)")
    who.add_argument("--pidfile", metavar="FILE", help="read the pid from this file (QEMU -pidfile)")
    ap.add_argument("-o", "--output", metavar="BUNDLE", help="bundle directory to create (default hintscope-host-PID-TIME)")
    ap.add_argument("--append", action="store_true", help="join an existing bundle (e.g. one the lab created)")
    ap.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: until SIGINT or target exit)")
    ap.add_argument("--qemu", choices=("auto", "on", "off"), default="auto",
                    help="QEMU uprobes: auto = when /proc/PID/exe is qemu-system-* (default)")
    ap.add_argument("--page-sends", action="store_true",
                    help="also uprobe buffer_is_zero: one event per page QEMU sends (costly: a uprobe per page)")
    ap.add_argument("--no-vq-pops", action="store_true",
                    help="do not probe virtqueue_pop (vq_pop_cmd/vq_pop_hint); it runs on every virtio pop of every "
                         "device, a few us each (docs/probes.md)")
    ap.add_argument("--qemu-trace-log", metavar="FILE", help="QEMU -trace log to copy into the bundle (files/qemu-trace.log) at stop")
    ap.add_argument("--ring-mb", type=int, default=DEFAULT_RING_MB, metavar="MB", help=f"BPF ring buffer size, power of two, 1..{MAX_RING_MB} (16)")
    ap.add_argument("--progress", action="store_true",
                    help="status line every second on stderr even when it is not a terminal (default: terminal only)")
    ap.add_argument("--flush-interval", type=float, default=1.0, metavar="S", help="write buffered rows every S seconds (1)")


EXAMPLES = """examples:
  hintscope probe host --pid $(pidof qemu-system-x86_64) -o run1          # until Ctrl-C or QEMU exits
  hintscope probe host --pidfile /tmp/src.pid --duration 30 -o run2      # 30 s
  hintscope probe host --pid 1234 --page-sends --qemu-trace-log /tmp/q.log -o run3
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    ap = subparsers.add_parser("host", help="trace a VMM's KVM dirty-log ioctls, dirty ring and QEMU uprobes (root)",
                               description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    ap.set_defaults(func=run, exit_now=True)    # only the command line: in-process callers get run()'s return
    return ap
