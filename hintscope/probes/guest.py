"""Guest probe: BCC kprobes on the virtio-balloon driver inside a Linux guest.

This file runs INSIDE the guest with the guest's ``/usr/bin/python3`` and python3-bpfcc, so at
module level it imports the standard library only (no hintscope, no pandas).  It writes one
compact text line per record to a stream (the virtio-serial port the lab backs with a host file
on each side of the migration); ``hintscope.parse.guest_stream`` turns that stream into bundle
tables on the host.

Stream format v1 (one record per line, space separated, decimal integers)::

    HSG 1 <json>                         header: version, kernel, probe-point status
    E <seq> <guest_ns> <cpu> <tid> <kind> <a0> <a1> <a2>   one BPF event (kinds: KINDS)
    A <seq> <guest_ns> ATTACHED          all probes attached
    S <seq> <guest_ns> <drops> <reuse_suppressed> <memfree_kb>   stats, every --stats-interval s
    W <seq> <guest_ns> <word> [text]     workload / init report (READY, BEAT, LOSTW ...)

``seq`` counts lines per writer and prefix, so the host can drop the duplicates a migration can
produce at the switch and count gaps.  guest_ns is CLOCK_MONOTONIC (= bpf_ktime_get_ns).

On the CI host (no kprobes) ``--tracepoints-only`` loads just the kmem tracepoint half.
"""

from __future__ import annotations

import argparse
import ctypes as ct
import json
import os
import platform
import signal
import sys
import time

BPF_C = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guest.bpf.c")
STREAM_VERSION = 1

# kind number -> name; same numbers as guest.bpf.c EV_*
KINDS = {
    1: "run_enter", 2: "run_exit", 3: "config_changed", 4: "cmd_id", 5: "outbuf", 6: "hint",
    7: "return_enter", 8: "return_exit", 9: "block_returned", 10: "shrinker_enter", 11: "shrinker_exit",
    12: "reuse", 13: "free_page_report", 14: "remove", 15: "hint_freed",
}
# hintscope.protocol.RETURN_REASONS: repeated because this file runs inside the guest with the standard
# library only (tests/test_guest_probe.py checks the two are equal)
RETURN_REASONS = {0: "other", 1: "done", 2: "shrinker", 3: "remove"}

# (symbol, kind of probe, BPF function, why we want it, fallback when the symbol is missing)
PROBES = [
    ("report_free_page_func", "kprobe", "on_run_enter", "run scope per tid", None),
    ("report_free_page_func", "kretprobe", "on_run_exit", "run end, blocks hinted", None),
    ("virtballoon_changed", "kprobe", "on_config_changed", "config interrupt", None),
    ("virtio_balloon_cmd_id_received", "kretprobe", "on_cmd_id_ret", "cmd id the guest read", None),
    ("virtqueue_add_outbuf", "kprobe", "on_add_outbuf", "start/stop id sent (inlined send_cmd_id_start/stop)", None),
    ("virtqueue_add_inbuf", "kprobe", "on_add_inbuf", "hinted block pfn (inlined get_free_page_and_send)", None),
    ("return_free_pages_to_mm", "kprobe", "on_return_enter", "blocks given back (n, reason)", None),
    ("return_free_pages_to_mm", "kretprobe", "on_return_exit", "blocks returned", None),
    ("virtio_balloon_shrinker_scan", "kprobe", "on_shrinker_enter", "shrinker scope", None),
    ("virtio_balloon_shrinker_scan", "kretprobe", "on_shrinker_exit", "shrinker result", None),
    ("remove_common", "kprobe", "on_remove_enter", "remove scope", None),
    ("remove_common", "kretprobe", "on_remove_exit", "remove scope end", None),
    ("virtballoon_free_page_report", "kprobe", "on_free_page_report", "free page reporting", None),
]
# Functions protocol.md names that the Debian 6.1 build inlines: report what stands in for them.
INLINED = {
    "send_cmd_id_start": "virtqueue_add_outbuf inside report_free_page_func (u32 at data = id)",
    "send_cmd_id_stop": "virtqueue_add_outbuf inside report_free_page_func (u32 at data = 0)",
    "get_free_page_and_send": "virtqueue_add_inbuf inside report_free_page_func (pfn from data)",
    "virtio_balloon_report_free_page": "virtqueue_add_outbuf/inbuf inside report_free_page_func",
    "shrink_free_pages": "virtio_balloon_shrinker_scan scope around return_free_pages_to_mm",
}


class Event(ct.Structure):
    _fields_ = [("ts", ct.c_uint64), ("a0", ct.c_uint64), ("a1", ct.c_uint64), ("a2", ct.c_uint64),
                ("kind", ct.c_uint32), ("cpu", ct.c_uint32), ("tid", ct.c_uint32), ("pad", ct.c_uint32)]


def kallsyms() -> tuple[set[str], dict[str, int]]:
    """Function names (text symbols, modules included) and a few data addresses."""
    names: set[str] = set()
    data: dict[str, int] = {}
    with open("/proc/kallsyms") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3:
                continue
            addr, typ, name = parts[0], parts[1], parts[2]
            if typ in "tTwW":
                names.add(name)
            elif name == "page_offset_base":
                data[name] = int(addr, 16)
    return names, data


class Stream:
    """Line writer with per-prefix sequence numbers; one os.write per batch."""

    def __init__(self, fd: int):
        self.fd = fd
        self.seq: dict[str, int] = {}
        self.buf: list[str] = []

    def add(self, prefix: str, body: str) -> None:
        n = self.seq.get(prefix, 0)
        self.seq[prefix] = n + 1
        self.buf.append(f"{prefix} {n} {body}\n")

    def flush(self) -> None:
        if not self.buf:
            return
        lines, self.buf = self.buf, []
        # Chunks end at line boundaries and stay small: the workload writes to the same port,
        # and a write the port splits must not cut a line in two.
        chunk: list[str] = []
        size = 0
        for line in lines + [None]:
            if line is None or size + len(line) > 3500:
                data = "".join(chunk).encode()
                while data:
                    try:
                        n = os.write(self.fd, data)
                    except InterruptedError:
                        continue
                    data = data[n:]
                chunk, size = [], 0
            if line is not None:
                chunk.append(line)
                size += len(line)


def memfree_kb() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemFree:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def run(out_fd: int, tracepoints_only: bool, attached_file: str | None, stats_interval: float,
        duration: float, bpf_class=None, ready_cb=None) -> int:
    if bpf_class is None:
        sys.path.append("/usr/lib/python3/dist-packages")
        from bcc import BPF as bpf_class  # noqa: N813
    st = Stream(out_fd)
    names, data = kallsyms() if not tracepoints_only else (set(), {})
    cflags = ["-Wno-macro-redefined"]
    status: dict[str, dict] = {}
    if not tracepoints_only:
        cflags.append("-DHS_KPROBES")
        pob = data.get("page_offset_base", 0)
        if not pob:
            status["page_offset_base"] = {"status": "missing", "fallback": "pfn = data >> 12 (wrong with KASLR)"}
        cflags.append(f"-DPAGE_OFFSET_BASE_ADDR={pob:#x}ULL")
    t0 = time.monotonic_ns()
    with open(BPF_C) as f:
        text = f.read()
    b = bpf_class(text=text.encode(), cflags=cflags)
    t_load = time.monotonic_ns()
    if not tracepoints_only:
        for sym, how, fn, why, _ in PROBES:
            key = f"{how}:{sym}"
            if sym not in names:
                status[key] = {"status": "missing", "why": why}
                continue
            try:
                if how == "kprobe":
                    b.attach_kprobe(event=sym, fn_name=fn)
                else:
                    b.attach_kretprobe(event=sym, fn_name=fn, maxactive=16)
                status[key] = {"status": "attached"}
            except Exception as e:  # attach failures are reported, the rest keeps running
                status[key] = {"status": "failed", "error": str(e).splitlines()[0][:200] if str(e) else "?"}
        for sym, fallback in INLINED.items():
            status[f"inlined:{sym}"] = {"status": "present" if sym in names else "inlined", "fallback": fallback}
    header = {"version": STREAM_VERSION, "kernel": platform.release(), "tracepoints_only": tracepoints_only,
              "probes": status, "load_ms": (t_load - t0) // 1_000_000,
              "attach_ms": (time.monotonic_ns() - t_load) // 1_000_000, "kinds": KINDS,
              "return_reasons": RETURN_REASONS}
    st.buf.append(f"HSG {STREAM_VERSION} {json.dumps(header, separators=(',', ':'))}\n")

    def on_event(ctx, data, size):
        e = ct.cast(data, ct.POINTER(Event)).contents
        st.add("E", f"{e.ts} {e.cpu} {e.tid} {e.kind} {e.a0} {e.a1} {e.a2}")

    b[b"events"].open_ring_buffer(on_event)
    st.add("A", f"{time.monotonic_ns()} ATTACHED")
    st.flush()
    if attached_file:
        with open(attached_file, "w") as f:
            f.write("ok\n")
    if ready_cb:
        ready_cb(b)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    counters = b[b"counters"]
    end = time.monotonic() + duration if duration > 0 else float("inf")
    next_stats = time.monotonic()
    try:
        while not stop and time.monotonic() < end:
            b.ring_buffer_poll(timeout=200)
            now = time.monotonic()
            if now >= next_stats:
                next_stats = now + stats_interval
                st.add("S", f"{time.monotonic_ns()} {counters[0].value} {counters[1].value} {memfree_kb()}")
            st.flush()
    except KeyboardInterrupt:
        pass
    b.ring_buffer_consume()
    st.add("S", f"{time.monotonic_ns()} {counters[0].value} {counters[1].value} {memfree_kb()}")
    st.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="guest.py", description="hintscope guest probe (runs inside the guest)")
    _add_args(ap)
    a = ap.parse_args(argv)
    return _run_args(a)


def _add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", default="-", help="output file or /dev/vportNpM; '-' = stdout; 'fd:N' = inherited fd")
    ap.add_argument("--tracepoints-only", action="store_true",
                    help="load only the kmem tracepoint half (hosts without kprobes, CI)")
    ap.add_argument("--attached-file", help="touch this file once every probe is attached")
    ap.add_argument("--stats-interval", type=float, default=1.0, help="seconds between S (stats) lines")
    ap.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0 = until SIGTERM)")


def _run_args(a) -> int:
    if a.out == "-":
        fd = sys.stdout.fileno()
    elif a.out.startswith("fd:"):
        fd = int(a.out[3:])
    else:
        fd = os.open(a.out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    return run(fd, a.tracepoints_only, a.attached_file, a.stats_interval, a.duration)


def add_parser(sub) -> None:
    """``hintscope probe guest``: run the probe here (inside a guest with hintscope installed)."""
    p = sub.add_parser("guest", help="run the guest-side balloon probe here (inside a Linux guest; root)",
                       description="Kprobe the virtio-balloon driver of this kernel and write the guest stream "
                                   "(normally the lab runs guest.py inside the guest for you).")
    _add_args(p)
    p.set_defaults(func=_run_args)


if __name__ == "__main__":
    raise SystemExit(main())
