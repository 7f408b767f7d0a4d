"""hintguest lab: a bare-metal free page hinting guest under real KVM, migrated, with a memory check.

The guest (lab/guests/hintguest/hintguest.c) drives virtio-balloon free page hinting itself and logs
every hint and every write it makes to a hinted page (``HG t=<tsc> ev=...`` lines on COM1). The run:

 1. build the guest (cached, through lab.build), start source and destination QEMU (lab.qemu;
    the destination with ``-incoming ... -S``);
 2. attach a bpftrace script to the source (hint applies, dirty-log syncs, GET/CLEAR ioctls, memslots,
    ring resets, the guest's kicks via kvm:kvm_pio) when root and bpftrace are available;
 3. migrate over a unix socket, poll ``query-migrate``;
 4. ``pmemsave`` the paused source and destination, compare (lab.memdiff) and classify every
    differing page and every reuse-written page against the guest log (table hintguest_pages);
 5. write a bundle: hintguest_* tables, ``qmp`` snapshots, raw logs under files/, meta['hintguest'].

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
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hintscope.bundle import BundleWriter
from hintscope.errors import HintscopeError
from hintscope.lab import build, memdiff, session
from hintscope.lab.qemu import Qemu, QemuConfig, available_trace_events, find_qemu, qemu_label, qemu_version
from hintscope.protocol import PAGE

GUEST = "hintguest"

BEHAVIOURS = ("polite", "early-reuse", "late-reuse")
PRODUCER = "lab hintguest"
BLOCK_PAGES = 1024
MAGICS = {0x53554748: "HGUS", 0x57524748: "HGRW", 0x47424748: "HGBG", 0x4C464748: "HGFL"}
MAX_LOG_BYTES = 16 << 20

# ---------------------------------------------------------------------------------------------
# serial log parsing (guest output is untrusted: bounded, malformed lines counted, not fatal)

LINE_RE = r"^HG t=(?P<tsc>\d{1,20}) ev=(?P<ev>[a-z_]{1,20})(?P<rest>(?: .*)?)$"
KEYS = {  # column -> (regex on the rest of the line, base)
    "cmd_id": (r"(?:^| )id=(0x[0-9a-f]{1,8})(?= |$)", 16),
    "gfn": (r"(?:^| )gfn=(0x[0-9a-f]{1,12})(?= |$)", 16),
    "npages": (r"(?:^| )npages=(\d{1,12})(?= |$)", 10),
    "seq": (r"(?:^| )seq=(\d{1,18})(?= |$)", 10),
    "round": (r"(?:^| )round=(\d{1,9})(?= |$)", 10),
    "avail_idx": (r"(?:^| )avail_idx=(\d{1,9})(?= |$)", 10),
    "tsc_hz": (r"(?:^| )tsc_hz=(\d{1,12})(?= |$)", 10),
    "tsc_end": (r"(?:^| )t_end=(\d{1,19})(?= |$)", 10),
}
PHASE_RE = r"(?:^| )phase=(early|late)(?= |$)"


@dataclass
class GuestLog:
    events: pd.DataFrame           # hintguest_events
    hints: pd.DataFrame            # hintguest_hints
    writes: pd.DataFrame           # hintguest_writes
    tsc_hz: int
    boot: dict[str, str]
    errors: list[str]
    problems: list[str] = field(default_factory=list)


def _num(col: pd.Series, base: int) -> pd.Series:
    present = col.notna()
    out = pd.Series(np.full(len(col), -1, dtype=np.int64), index=col.index)
    if present.any():
        out[present] = col[present].map(lambda s: int(s, base)).astype(np.int64)
    return out


def _kv(rest: str) -> dict[str, str]:
    return dict(t.split("=", 1) for t in rest.split() if "=" in t)


def parse_serial(text: str, source: str = "serial log") -> GuestLog:
    """Parse the hintguest serial log. Raises HintscopeError only when nothing usable is in it."""
    lines = pd.Series(text.split("\n"))
    lineno = pd.Series(np.arange(1, len(lines) + 1, dtype=np.int64))
    nonblank = lines.str.strip() != ""
    m = lines.str.extract(LINE_RE)
    ok = m["tsc"].notna()
    problems = []
    bad = nonblank & ~ok
    if bad.any():
        first = int(lineno[bad].iloc[0])
        problems.append(f"{source}: {int(bad.sum())} line(s) not in 'HG t=<tsc> ev=<name> ...' form (first: line {first})")
    m, lineno = m[ok].reset_index(drop=True), lineno[ok].reset_index(drop=True)
    if m.empty:
        raise HintscopeError(f"{source}: no hintguest event lines (did the guest boot?)")
    tsc = m["tsc"].map(int)
    over = tsc >= 1 << 64
    if over.any():
        problems.append(f"{source}: {int(over.sum())} line(s) with a TSC beyond 64 bits dropped")
        m, lineno, tsc = m[~over].reset_index(drop=True), lineno[~over].reset_index(drop=True), tsc[~over].reset_index(drop=True)
    rest = m["rest"].fillna("")
    cols = {k: _num(rest.str.extract(rx, expand=False), base) for k, (rx, base) in KEYS.items()}
    calib = cols["tsc_hz"][m["ev"] == "calib"]
    tsc_hz = int(calib.iloc[-1]) if len(calib) and calib.iloc[-1] > 0 else 0
    if not tsc_hz:
        problems.append(f"{source}: no calib line; guest_ns left at -1")
    tsc_u = tsc.to_numpy(dtype=np.uint64)
    guest_ns = ((tsc_u.astype(np.float64) * 1e9 / tsc_hz).astype(np.int64) if tsc_hz
                else np.full(len(m), -1, dtype=np.int64))
    ev = m["ev"].astype(str)
    phase = rest.str.extract(PHASE_RE, expand=False).fillna("")
    events = pd.DataFrame({
        "tsc": tsc_u, "guest_ns": guest_ns, "line": lineno.to_numpy(), "ev": ev.to_numpy(),
        "cmd_id": cols["cmd_id"].to_numpy(), "gfn": cols["gfn"].to_numpy(), "npages": cols["npages"].to_numpy(),
        "seq": cols["seq"].to_numpy(), "round": cols["round"].to_numpy(), "phase": phase.to_numpy(),
        "tsc_end": cols["tsc_end"].to_numpy(),
    })
    is_hint = (events["ev"] == "hint") & (events["gfn"] >= 0) & (events["npages"] > 0) & (events["cmd_id"] >= 0)
    hints = events.loc[is_hint, ["tsc", "guest_ns", "cmd_id", "round", "gfn", "npages"]].copy()
    hints["avail_idx"] = cols["avail_idx"][is_hint.to_numpy()].to_numpy()
    is_write = (events["ev"] == "write") & (events["gfn"] >= 0) & (events["seq"] >= 0) & (events["phase"] != "")
    writes = events.loc[is_write, ["tsc", "guest_ns", "cmd_id", "round", "gfn", "seq", "phase"]].copy()
    for name, sel, n in (("hint", events["ev"] == "hint", len(hints)), ("write", events["ev"] == "write", len(writes))):
        if int(sel.sum()) != n:
            problems.append(f"{source}: {int(sel.sum()) - n} '{name}' line(s) missing fields, dropped")
    boot_rest = rest[ev == "boot"]
    boot = _kv(boot_rest.iloc[0]) if len(boot_rest) else {}
    errs = [r.strip()[:200] for r in rest[ev == "error"]]
    return GuestLog(events.reset_index(drop=True), hints.reset_index(drop=True), writes.reset_index(drop=True),
                    tsc_hz, boot, errs, problems)


def read_serial_log(path: Path) -> GuestLog:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_LOG_BYTES + 1)
    except OSError as e:
        raise HintscopeError(f"{path}: cannot read the hintguest serial log ({e.strerror})") from None
    log = parse_serial(raw[:MAX_LOG_BYTES].decode("ascii", errors="replace"), str(path))
    if len(raw) > MAX_LOG_BYTES:
        log.problems.append(f"{path}: longer than {MAX_LOG_BYTES} bytes; the rest was ignored")
    return log


# ---------------------------------------------------------------------------------------------
# host side: bpftrace on the source QEMU

# memory_global_after_dirty_log_sync is left out on purpose: its uprobe intermittently failed to attach
# here (perf_event_open EINVAL) while other tools probed the same binary; QEMU's own
# migration_bitmap_sync_end trace event marks the end of a sync instead.
BPFTRACE_SCRIPT = r"""
uprobe:QEMU:qemu_guest_free_page_hint /pid == PID/ { printf("A %llu %d %llu %llu\n", nsecs, tid, arg0, arg1); }
uretprobe:QEMU:qemu_guest_free_page_hint /pid == PID/ { printf("a %llu %d\n", nsecs, tid); }
uprobe:QEMU:memory_global_dirty_log_sync /pid == PID/ { printf("S %llu %d\n", nsecs, tid); }
tracepoint:syscalls:sys_enter_ioctl /pid == PID && (args->cmd & 0xffffffff) == 0xc018aec0/ {
  $p = (uint64)args->arg;
  printf("C %llu %d %u %u %llu\n", nsecs, tid, *(uint32 *)uptr($p), *(uint32 *)uptr($p + 4), *(uint64 *)uptr($p + 8));
}
tracepoint:syscalls:sys_enter_ioctl /pid == PID && (args->cmd & 0xffffffff) == 0x4010ae42/ {
  printf("G %llu %d %u\n", nsecs, tid, *(uint32 *)uptr((uint64)args->arg));
}
tracepoint:syscalls:sys_enter_ioctl /pid == PID && (args->cmd & 0xffffffff) == 0x4020ae46/ {
  $p = (uint64)args->arg;
  printf("M %llu %d %u %u %llu %llu %llu\n", nsecs, tid, *(uint32 *)uptr($p), *(uint32 *)uptr($p + 4),
         *(uint64 *)uptr($p + 8), *(uint64 *)uptr($p + 16), *(uint64 *)uptr($p + 24));
}
tracepoint:syscalls:sys_enter_ioctl /pid == PID && (args->cmd & 0xffffffff) == 0xaec7/ { printf("R %llu %d\n", nsecs, tid); }
tracepoint:kvm:kvm_pio /pid == PID && args->rw == 1 && args->port == KICKPORT/ {
  printf("P %llu %d %u %u\n", nsecs, tid, args->port, args->val);
}
"""


def bpftrace_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    if not shutil.which("bpftrace"):
        return "bpftrace not installed"
    return None


class HostTrace:
    """bpftrace attached to the source QEMU; its stdout is the raw event log (files/host-trace.txt)."""

    def __init__(self, qemu: str, pid: int, kick_port: int, out: Path, uprobes: bool = True):
        script = BPFTRACE_SCRIPT
        if not uprobes:  # tracepoints only: what remains when another tool holds the QEMU uprobes
            script = "\n".join(ln for ln in script.splitlines() if not ln.startswith(("uprobe:", "uretprobe:")))
        self.uprobes = uprobes
        self.script = (script.replace("QEMU", qemu).replace("PID", str(pid))
                       .replace("KICKPORT", str(kick_port)))
        self.out = out
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 60.0) -> None:
        script = self.out.with_suffix(".bt")
        script.write_text(self.script)
        self._f = open(self.out, "wb")
        self._err = open(self.out.with_suffix(".err"), "wb")
        self.proc = await asyncio.create_subprocess_exec("bpftrace", str(script), stdout=self._f, stderr=self._err,
                                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise HintscopeError(f"bpftrace exited with {self.proc.returncode}: "
                                     f"{self.out.with_suffix('.err').read_text(errors='replace').strip()[-300:]}")
            if b"Attaching" in self.out.read_bytes()[:4096]:
                # "Attaching N probes..." precedes the attaches; bpftrace exits if one fails
                for _ in range(30):
                    await asyncio.sleep(0.1)
                    if self.proc.returncode is not None:
                        err = self.out.with_suffix(".err").read_text(errors="replace").strip().splitlines()
                        msg = [ln for ln in err if "RLIMIT_MEMLOCK" not in ln]
                        raise HintscopeError(f"bpftrace failed to attach: {(msg or ['exit'])[-1][:200]}")
                return
            await asyncio.sleep(0.1)
        await self.stop()
        raise HintscopeError(f"bpftrace did not attach within {timeout:.0f} s")

    async def stop(self) -> None:
        if self.proc and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        for f in (getattr(self, "_f", None), getattr(self, "_err", None)):
            if f:
                f.close()


def probe_host_lines(bundle: Path) -> str:
    """hintscope's probe events (qemu_events) as host-trace lines: applies (A/a) and syncs (S).

    When the probe is attached it holds the QEMU uprobes, so the bpftrace script runs tracepoints
    only; these lines put the probe's applies and syncs into hintguest_host for the per-round view."""
    from hintscope.bundle import read_bundle

    qe = read_bundle(bundle).table("qemu_events")
    if not len(qe):
        return ""
    ts, tid = qe["ts_ns"].astype("int64").astype(str), qe["tid"].astype("int64").astype(str)
    a0, a1 = qe["a0"].astype("uint64").astype(str), qe["a1"].astype("uint64").astype(str)
    ev = qe["event"]
    lines = pd.concat([
        ("A " + ts + " " + tid + " " + a0 + " " + a1)[ev == "hint_apply"],
        ("a " + ts + " " + tid)[ev == "hint_apply_ret"],
        ("S " + ts + " " + tid)[ev == "sync_fetch_begin"],
    ])
    return "\n".join(lines) + "\n" if len(lines) else ""


HOST_KINDS = {"A": "apply", "a": "apply_ret", "S": "sync", "s": "sync_end", "G": "get", "C": "clear",
              "M": "memslot", "R": "reset", "P": "pio"}


def parse_host_trace(text: str, source: str = "host trace") -> tuple[pd.DataFrame, list[str]]:
    """bpftrace output -> hintguest_host rows, with apply/clear mapped to guest pages via memslots."""
    rows = []
    bad = 0
    for ln in text.splitlines():  # a few thousand lines at most; fields differ per kind
        f = ln.split()
        if not f or f[0] not in HOST_KINDS:
            bad += bool(f) and not ln.startswith("Attaching")
            continue
        try:
            v = [int(x) for x in f[1:]]
        except ValueError:
            bad += 1
            continue
        k = f[0]
        r = {"ts_ns": v[0], "tid": v[1], "kind": HOST_KINDS[k], "slot": -1, "a": -1, "b": -1, "c": -1, "d": -1}
        if k == "A" and len(v) >= 4:
            r.update(a=v[2], b=v[3])
        elif k == "C" and len(v) >= 5:
            r.update(slot=v[2], b=v[3], a=v[4])
        elif k == "G" and len(v) >= 3:
            r.update(slot=v[2])
        elif k == "M" and len(v) >= 7:
            r.update(slot=v[2], d=v[3], a=v[4], b=v[5], c=v[6])
        elif k == "P" and len(v) >= 4:
            r.update(a=v[2], b=v[3])
        rows.append(r)
    problems = [f"{source}: {bad} unparsable line(s)"] if bad else []
    df = pd.DataFrame(rows, columns=["ts_ns", "tid", "kind", "slot", "a", "b", "c", "d"])
    df = df.astype({"ts_ns": "int64", "tid": "int32", "slot": "int64", "a": "int64", "b": "int64",
                    "c": "int64", "d": "int64"})
    df["gfn"], df["npages"] = np.int64(-1), np.int64(-1)
    slots = df[(df["kind"] == "memslot") & (df["b"] > 0)].drop_duplicates("slot", keep="last")
    # apply: hva -> gpa through the memslot holding it; clear: slot-relative page -> gfn.
    for s in slots.itertuples():
        ap = (df["kind"] == "apply") & (df["a"] >= s.c) & (df["a"] < s.c + s.b)
        df.loc[ap, "gfn"] = (df.loc[ap, "a"] - s.c + s.a) // PAGE
        df.loc[ap, "npages"] = df.loc[ap, "b"] // PAGE
        cl = (df["kind"] == "clear") & (df["slot"] == s.slot)
        df.loc[cl, "gfn"] = s.a // PAGE + df.loc[cl, "a"]
        df.loc[cl, "npages"] = df.loc[cl, "b"]
    return df.sort_values("ts_ns", kind="stable").reset_index(drop=True), problems


# ---------------------------------------------------------------------------------------------
# classification of the memory check


def _records(img: Path, gfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(magic name, seq) of the HG record at the start of each page; ('', -1) when none."""
    if len(gfns) == 0:
        return np.array([], dtype=object), np.array([], dtype=np.int64)
    mm = np.memmap(img, dtype=np.uint8, mode="r")
    n_pages = len(mm) // PAGE
    g = np.clip(gfns, 0, n_pages - 1).astype(np.int64)
    heads = np.stack([np.asarray(mm[p * PAGE:p * PAGE + 16]) for p in g])
    magic = heads[:, 0:4].copy().view("<u4").ravel()
    rec_gfn = heads[:, 4:8].copy().view("<u4").ravel()
    seq = heads[:, 8:16].copy().view("<u8").ravel().astype(np.int64)
    valid = np.isin(magic, list(MAGICS)) & (rec_gfn == (gfns & 0xFFFFFFFF))
    names = np.array([MAGICS.get(int(x), "") for x in magic], dtype=object)
    names[~valid] = ""
    del mm
    return names, np.where(valid, seq, -1)


def reuse_writes_in_memory(img: Path, pool: tuple[int, int]) -> pd.DataFrame:
    """Reuse writes as the source RAM holds them: every pool page whose record is 'HGRW' for itself.

    The serial log can end before the guest's last events (the VM stops mid-print); the source
    image cannot miss a write the guest made. Columns: gfn, seq, round, cmd_id."""
    mm = np.memmap(img, dtype=np.uint8, mode="r")
    lo, hi = pool[0], min(pool[1], len(mm) // PAGE)
    if hi <= lo:
        return pd.DataFrame({"gfn": [], "seq": [], "round": [], "cmd_id": []}, dtype=np.int64)
    heads = np.asarray(mm[lo * PAGE:hi * PAGE]).reshape(hi - lo, PAGE)[:, :24]
    del mm
    rec = np.ascontiguousarray(heads)
    magic = rec[:, 0:4].copy().view("<u4").ravel()
    rgfn = rec[:, 4:8].copy().view("<u4").ravel()
    gfns = np.arange(lo, hi, dtype=np.int64)
    ok = (magic == 0x57524748) & (rgfn == gfns)
    return pd.DataFrame({"gfn": gfns[ok], "seq": rec[ok, 8:16].copy().view("<u8").ravel().astype(np.int64),
                         "round": rec[ok, 16:20].copy().view("<u4").ravel().astype(np.int64),
                         "cmd_id": rec[ok, 20:24].copy().view("<u4").ravel().astype(np.int64)})


def classify(diff_gfns: np.ndarray, log: GuestLog, host: pd.DataFrame | None, src_img: Path,
             dst_img: Path, mem_writes: pd.DataFrame | None = None,
             kvmclock_gfns: np.ndarray | None = None) -> pd.DataFrame:
    """mem_writes (reuse_writes_in_memory) adds the writes a truncated log lacks; kvmclock_gfns are
    pages memdiff found to differ only in a valid kvmclock record (SeaBIOS's, rewritten by KVM on
    each host: not a loss)."""
    hints = log.hints
    writes = log.writes[["gfn", "seq"]]
    if mem_writes is not None and len(mem_writes):
        writes = pd.concat([writes, mem_writes[["gfn", "seq"]]], ignore_index=True)
    reused = writes.groupby("gfn")["seq"].max() if len(writes) else pd.Series(dtype=np.int64)
    gfns = np.union1d(diff_gfns.astype(np.int64), reused.index.to_numpy(dtype=np.int64))
    differs = np.isin(gfns, diff_gfns)
    # latest hint block covering each page
    cmd = np.full(len(gfns), -1, dtype=np.int64)
    if len(hints):
        h = hints.sort_values("tsc")
        for r in h.itertuples():
            cmd[(gfns >= r.gfn) & (gfns < r.gfn + r.npages)] = r.cmd_id
    applied = np.zeros(len(gfns), dtype=bool)
    if host is not None and len(host):
        ap = host[(host["kind"] == "apply") & (host["gfn"] >= 0)]
        for r in ap.itertuples():
            applied |= (gfns >= r.gfn) & (gfns < r.gfn + r.npages)
    wseq = reused.reindex(gfns).fillna(-1).to_numpy(dtype=np.int64)
    s_mag, s_seq = _records(src_img, gfns)
    d_mag, d_seq = _records(dst_img, gfns)
    cls = np.where(wseq >= 0, np.where(differs, "lost-reuse-write", "reuse-ok"),
                   np.where(cmd >= 0, "hinted-held", "lost-other"))
    if kvmclock_gfns is not None and len(kvmclock_gfns):
        cls = np.where((cls == "lost-other") & np.isin(gfns, kvmclock_gfns), "kvmclock", cls)
    return pd.DataFrame({"gfn": gfns, "cls": cls, "cmd_id": cmd, "write_seq": wseq, "src_seq": s_seq,
                         "dst_seq": d_seq, "src_magic": s_mag, "dst_magic": d_mag, "applied": applied})


def kick_clock(log: GuestLog, host: pd.DataFrame | None) -> dict[str, Any]:
    """Fit host_ns = guest_tsc * k + b from the guest's logged kicks and the host's kvm_pio of them.

    Every round makes two kicks (after the hints, after the stop message), both logged with the TSC
    just before the port write; they pair in order. None when the host saw no kick."""
    if host is None:
        return {"method": "none"}
    g = log.events.loc[log.events["ev"].isin(["kick", "stop"]), "tsc"].to_numpy(dtype=np.float64)
    h = host.loc[host["kind"] == "pio", "ts_ns"].to_numpy(dtype=np.float64)
    # The source log can end early (the VM stops mid-print), never start late: pair the prefix.
    n = min(len(g), len(h))
    if n < 2:
        return {"method": "none", "guest_kicks": int(len(g)), "host_kicks": int(len(h))}
    k, b = np.polyfit(g[:n], h[:n], 1)
    resid = h[:n] - (g[:n] * k + b)
    return {"method": "kick pairs (guest rdtsc before outw, host kvm:kvm_pio)", "pairs": int(n),
            "ns_per_tsc": float(k), "offset_ns": float(b), "max_abs_residual_ns": float(np.abs(resid).max())}


# ---------------------------------------------------------------------------------------------
# QEMU's own trace log (wall clock) and the evidence timeline

TRACE_EVENTS = ["ram_save_page", "migration_bitmap_sync_start", "migration_bitmap_sync_end",
                "migration_bitmap_clear_dirty"]
TRACE_RE = (r"^(?P<tid>\d+)@(?P<sec>\d+)\.(?P<usec>\d{6}):(?P<ev>ram_save_page|migration_bitmap_sync_start|"
            r"migration_bitmap_sync_end|migration_bitmap_clear_dirty) ?(?P<rest>.*)$")


def parse_qemu_trace(text: str, mono_minus_real_ns: int, pool: tuple[int, int]) -> pd.DataFrame:
    """Keep syncs, chunk clears and the sends of pool pages (gfn in [pool[0], pool[1]))."""
    m = pd.Series(text.splitlines(), dtype=object).str.extract(TRACE_RE).dropna(subset=["ev"])
    wall = m["sec"].astype(np.int64) * 1_000_000_000 + m["usec"].astype(np.int64) * 1000
    rest = m["rest"].fillna("")
    send_off = rest.str.extract(r"^pc\.ram: offset: 0x([0-9a-f]{1,16}) ", expand=False)
    clr = rest.str.extract(r"^rb pc\.ram start 0x([0-9a-f]{1,16}) size 0x([0-9a-f]{1,16})")
    dirty = rest.str.extract(r"^dirty_pages (\d{1,18})", expand=False)
    gfn = np.full(len(m), -1, dtype=np.int64)
    npages = np.full(len(m), -1, dtype=np.int64)
    ev = m["ev"].to_numpy()
    is_send = (ev == "ram_save_page") & send_off.notna().to_numpy()
    gfn[is_send] = send_off[is_send].map(lambda x: int(x, 16)).to_numpy(dtype=np.int64) // PAGE
    is_clr = (ev == "migration_bitmap_clear_dirty") & clr[0].notna().to_numpy()
    # start/size are bytes of the RAMBlock (pc.ram offset == GPA below 4 GiB here)
    gfn[is_clr] = clr[0][is_clr].map(lambda x: int(x, 16)).to_numpy(dtype=np.int64) // PAGE
    npages[is_clr] = clr[1][is_clr].map(lambda x: int(x, 16)).to_numpy(dtype=np.int64) // PAGE
    is_end = (ev == "migration_bitmap_sync_end") & dirty.notna().to_numpy()
    npages[is_end] = dirty[is_end].astype(np.int64).to_numpy()
    kind = pd.Series(ev).map({"ram_save_page": "send", "migration_bitmap_sync_start": "sync_start",
                              "migration_bitmap_sync_end": "sync_end",
                              "migration_bitmap_clear_dirty": "clear_chunk"}).to_numpy()
    df = pd.DataFrame({"ts_ns": wall.to_numpy() + mono_minus_real_ns, "wall_ns": wall.to_numpy(),
                       "tid": m["tid"].astype(np.int64).to_numpy().astype(np.int32), "kind": kind,
                       "gfn": gfn, "npages": npages})
    keep = (df["kind"] != "send") | ((df["gfn"] >= pool[0]) & (df["gfn"] < pool[1]))
    return df[keep & ((df["kind"] != "send") | is_send)].reset_index(drop=True)


def round_verdicts(log: GuestLog, host: pd.DataFrame | None, qtrace: pd.DataFrame | None,
                   pages: pd.DataFrame, clock: dict[str, Any]) -> list[dict[str, Any]]:
    """Per hinting round: were the reuse writes lost, and who cleared the pool's chunk first, when.

    The (c') theory says a reuse write is lost when the first clear of its clear_bmap chunk in that
    epoch (which re-arms write protection and drops the old dirty bits) comes after the write; a
    write after that clear traps and is logged. The apply thread is the iothread running
    qemu_guest_free_page_hint; any other clearing thread is the migration thread."""
    out = []
    if host is None or qtrace is None or clock.get("ns_per_tsc") is None:
        return out
    k, b = clock["ns_per_tsc"], clock["offset_ns"]
    syncs = np.sort(host.loc[host["kind"] == "sync", "ts_ns"].to_numpy())
    apply_tids = set(host.loc[host["kind"] == "apply", "tid"])
    gets = host[host["kind"] == "get"]
    if not len(syncs) and len(gets):
        # without the uprobes: a sync is a burst of KVM_GET_DIRTY_LOG (one per slot) on one thread
        t = np.sort(gets["ts_ns"].to_numpy())
        syncs = t[np.r_[True, np.diff(t) > 1_000_000]]
    if not apply_tids:
        # the thread that clears without ever fetching is the one applying hints (the iothread)
        cl = host[host["kind"] == "clear"]
        apply_tids = set(cl["tid"]) - set(gets["tid"])
    clears = qtrace[qtrace["kind"] == "clear_chunk"]
    lost = set(pages.loc[pages["cls"] == "lost-reuse-write", "gfn"])
    ev = log.events
    uses = ev[(ev["ev"] == "use") & (ev["gfn"] >= 0) & (ev["npages"] > 0)]
    for (rnd, cid), w in log.writes.groupby(["round", "cmd_id"]):
        w_ns = w["tsc"].to_numpy(dtype=np.float64) * k + b
        first_w = float(w_ns.min())
        before = syncs[syncs < first_w]
        epoch = int(before[-1]) if len(before) else -1
        g0 = int(w["gfn"].min())
        c = clears[(clears["gfn"] <= g0) & (clears["gfn"] + clears["npages"] > g0) & (clears["ts_ns"] >= epoch)]
        first = c.iloc[0] if len(c) else None
        n_lost = int(w["gfn"].isin(lost).sum())
        # (c') needs the page unarmed when written: dirty at the epoch's GET and not re-armed since.
        # Pool pages are all dirty and unarmed before their chunk's first clear (INITIALLY_SET);
        # later, only if the guest's 'use' of the block came after the chunk's last clear before
        # the epoch's sync (then the use trapped, set the bit, and GET leaves the page writable).
        prior = clears[(clears["gfn"] <= g0) & (clears["gfn"] + clears["npages"] > g0) & (clears["ts_ns"] < epoch)]
        u = uses[(uses["gfn"] <= g0) & (uses["gfn"] + uses["npages"] > g0) & (uses["tsc"] * k + b < epoch)]
        if not len(prior):
            unarmed = True
        elif not len(u):
            unarmed = False
        else:
            last_clear = float(prior["ts_ns"].max())
            use_start = float(u["tsc"].iloc[-1]) * k + b
            use_end = float(u["tsc_end"].iloc[-1]) * k + b if u["tsc_end"].iloc[-1] > 0 else use_start
            unarmed = True if use_start > last_clear else False if use_end < last_clear else None
        cleared_after = first is not None and first["ts_ns"] > float(w_ns.max())
        by_apply = first is not None and first["tid"] in apply_tids
        if unarmed is False or (first is not None and first["ts_ns"] < first_w):
            expect = "kept"
        elif unarmed and cleared_after and by_apply:
            expect = "lost"
        else:
            expect = "unsure"
        out.append({
            "round": int(rnd), "cmd_id": hex(int(cid)), "writes": int(len(w)), "lost": n_lost,
            "phase": ",".join(sorted(set(w["phase"]))),
            "epoch_sync_ns": epoch,
            "first_write_ns": int(first_w), "last_write_ns": int(w_ns.max()),
            "chunk_first_cleared_ns": int(first["ts_ns"]) if first is not None else -1,
            "chunk_cleared_by": (("hint apply (iothread)" if first["tid"] in apply_tids else "migration thread")
                                 if first is not None else "not in this epoch"),
            "clear_minus_first_write_us": round((first["ts_ns"] - first_w) / 1000, 1) if first is not None else None,
            "unarmed_at_epoch_start": unarmed,
            "expected": expect,
        })
    return out


def page_timeline(gfn: int, log: GuestLog, host: pd.DataFrame | None, qtrace: pd.DataFrame | None,
                  clock: dict[str, Any]) -> pd.DataFrame:
    """Everything known about one page, on the host clock where possible (guest events via the kick fit)."""
    rows = []
    k, b = clock.get("ns_per_tsc"), clock.get("offset_ns")

    def host_ns(tsc: int) -> int:
        return int(tsc * k + b) if k is not None else -1

    h = log.hints[(log.hints["gfn"] <= gfn) & (log.hints["gfn"] + log.hints["npages"] > gfn)]
    for r in h.itertuples():
        rows.append((host_ns(r.tsc), "guest", "hint made available", f"id={r.cmd_id:#x} block={r.gfn:#x}", int(r.tsc)))
    w = log.writes[log.writes["gfn"] == gfn]
    for r in w.itertuples():
        rows.append((host_ns(r.tsc), "guest", f"write ({r.phase})", f"seq={r.seq} id={r.cmd_id:#x}", int(r.tsc)))
    ids = set(h["cmd_id"])
    ev = log.events
    for r in ev[ev["ev"].isin(["kick", "used", "use"]) & ev["cmd_id"].isin(ids)].itertuples():
        rows.append((host_ns(r.tsc), "guest", r.ev, f"id={r.cmd_id:#x}", int(r.tsc)))
    u = ev[(ev["ev"] == "use") & (ev["gfn"] <= gfn) & (ev["gfn"] + ev["npages"] > gfn)]
    for r in u.itertuples():
        rows.append((host_ns(r.tsc), "guest", "use (page stamped HGUS)", f"round={r.round}", int(r.tsc)))
    if host is not None:
        cov = (host["gfn"] <= gfn) & (host["gfn"] + host["npages"] > gfn)
        for r in host[cov & host["kind"].isin(["apply", "clear"])].itertuples():
            what = ("qemu_guest_free_page_hint covering the page" if r.kind == "apply"
                    else f"KVM_CLEAR_DIRTY_LOG slot {r.slot} pages {r.gfn:#x}+{r.npages} (re-arms the page)")
            rows.append((int(r.ts_ns), f"host tid {r.tid}", r.kind, what, -1))
        for r in host[host["kind"].isin(["sync", "pio"])].itertuples():
            rows.append((int(r.ts_ns), f"host tid {r.tid}", r.kind,
                         "memory_global_dirty_log_sync (KVM GET)" if r.kind == "sync" else "guest kick (kvm_pio)", -1))
    if qtrace is not None and len(qtrace):
        q = qtrace
        for r in q[((q["kind"] == "send") & (q["gfn"] == gfn))
                   | ((q["kind"] == "clear_chunk") & (q["gfn"] <= gfn) & (q["gfn"] + q["npages"] > gfn))].itertuples():
            rows.append((int(r.ts_ns), f"qemu tid {r.tid}", r.kind,
                         "ram_save_page (page sent)" if r.kind == "send"
                         else "clear_bmap chunk cleared (migration_bitmap_clear_dirty)", -1))
    df = pd.DataFrame(rows, columns=["host_ns", "who", "event", "detail", "guest_tsc"])
    return df.sort_values(["host_ns", "guest_tsc"], kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class HintguestOptions:
    bundle: Path
    behaviour: str = "polite"
    dirty_ring: int = 0
    mem_mb: int = 2048
    nblocks: int = 8
    reuse: int = 4
    rounds: int = 3
    fill_mb: int = 64
    bandwidth_mb: int = 32           # while the guest runs its rounds
    final_bandwidth_mb: int = 1024   # after the guest's bg_stop
    downtime_ms: int = 300
    timeout_s: float = 90.0
    trace: str = "auto"            # auto | on | off (bpftrace on the source)
    probe: str = "auto"            # auto | on | off (hintscope's own host probe on the source)
    page_sends: bool = False       # probe --page-sends: a uprobe hit per page sent (~50 us each here)
    qemu: str | None = None
    keep_workdir: bool = False
    tap: bool = True               # migrate through `hintscope tap` (table page_sends)
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
    if o.dirty_ring and (o.dirty_ring & (o.dirty_ring - 1) or not 1024 <= o.dirty_ring <= 65536):
        raise HintscopeError(f"--dirty-ring {o.dirty_ring}: expected a power of two in 1024..65536")
    if not 1 <= o.nblocks <= 64 or not 0 <= o.reuse <= 64 or o.rounds < 0:
        raise HintscopeError("--nblocks 1..64, --reuse 0..64, --rounds >= 0")


async def _wait_serial(path: Path, pattern: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FileNotFoundError):
            text = path.read_bytes()[:MAX_LOG_BYTES].decode("ascii", errors="replace")
            if m := re.search(r"^HG t=\d+ ev=error (.*)$", text, re.M):
                raise HintscopeError(f"{path}: guest error: {m.group(1)[:200]}")
            if re.search(pattern, text, re.M):
                return text
        if time.monotonic() > deadline:
            raise HintscopeError(f"{path}: no '{pattern}' from hintguest within {timeout:.0f} s")
        await asyncio.sleep(0.05)


async def _migrate(src: Qemu, uri: str, o: HintguestOptions) -> list[dict[str, Any]]:
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
    return await session.drive_migration(src, uri, bandwidth_mb=o.bandwidth_mb,
                                         downtime_ms=1 if o.rounds else o.downtime_ms, timeout_s=o.timeout_s,
                                         on_poll=open_up, hint="the guest did not finish its rounds")


async def _dst_health(dst: Qemu, timeout: float = 5.0) -> dict[str, Any]:
    """Resume the destination: a healthy guest keeps logging and, with cmd id DONE migrated, logs 'done'."""
    await dst.cmd("cont")
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = dst.cfg.serial_path.read_bytes()[:MAX_LOG_BYTES].decode("ascii", errors="replace")
        if "ev=done" in text and text.count("ev=hb") >= 2:
            break
        await asyncio.sleep(0.1)
    return {"status": await dst.status(), "done_seen": "ev=done" in text, "heartbeats": text.count("ev=hb"),
            "errors": text.count("ev=error")}


async def run_hintguest(o: HintguestOptions) -> dict[str, Any]:
    """One migration of hintguest into bundle ``o.bundle``; returns meta['hintguest']."""
    _check(o)
    qemu = find_qemu(o.qemu)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise HintscopeError("hintguest needs /dev/kvm (the race under test is KVM's manual-protect dirty log)")
    bundle = Path(o.bundle)
    if (bundle / "meta.json").exists():
        raise HintscopeError(f"{bundle}: a bundle already exists there (choose another -o)")
    trace_reason = bpftrace_unavailable_reason() if o.trace != "off" else "--trace off"
    if o.trace == "on" and trace_reason:
        raise HintscopeError(f"--trace on: {trace_reason}")
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
    events_file = work / "trace-events"
    known = available_trace_events(qemu)  # another QEMU may lack (or rename) one of them
    events_file.write_text("\n".join(e for e in TRACE_EVENTS if e in known) + "\n")
    src = Qemu(QemuConfig(name="src", trace_events_file=events_file, trace_file=files / "qemu-trace.log", **common))
    dst = Qemu(QemuConfig(name="dst", incoming=f"unix:{sock}", **common))
    summary: dict[str, Any] = {"behaviour": o.behaviour, "stale_id": o.stale_id,
                               "zero_before_hint": o.zero_before_hint, "mode": f"dirty-ring {o.dirty_ring}" if o.dirty_ring
                               else "bitmap (manual protect)", "append": o.append(), "guest_elf": str(elf),
                               "qemu": qemu, "qemu_version": qemu_version(qemu), "qemu_label": qemu_label(qemu),
                               "parse_problems": []}
    writer.meta["hintguest"] = summary
    # QEMU's trace log, mapped onto the host clock by the analysis through the bundle's clock anchors
    writer.meta["qemu_trace"] = {"file": "files/qemu-trace.log", "events": TRACE_EVENTS, "vmm": "source",
                                 "clock": "CLOCK_REALTIME (-msg timestamp=on)"}
    writer.set_source("qemu_trace", "captured", None, file="files/qemu-trace.log")
    writer.flush()
    tracer: HostTrace | None = None
    probe = None
    probe_task = None
    end = "error: interrupted"
    scratch = work / "ram"
    try:
        await src.start()
        if probe_reason is None:
            # hintscope's own probe joins this bundle; its BCC compile overlaps the guest's boot
            probe = session.HostProbe(src.pid, bundle, None, work / "probe.log",
                                     extra=["--append"] + (["--page-sends"] if o.page_sends else []))
            probe_task = asyncio.create_task(probe.start())
        await dst.start()
        text = await _wait_serial(src.cfg.serial_path, r"^HG t=\d+ ev=ready", 60)
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
        else:
            summary["probe"] = {"used": False, "reason": probe_reason}
        timings = summary.setdefault("timings_s", {})
        timings["boot_to_ready"] = round(time.monotonic() - t0, 3)
        bal = re.search(r"ev=balloon .*iobase=(0x[0-9a-f]+)", text)
        kick_port = int(bal.group(1), 16) + 16 if bal else 0
        summary.update(src_pid=src.pid, dst_pid=dst.pid, src_argv=src.cfg.argv(), dst_argv=dst.cfg.argv())
        if trace_reason is None:
            # A uprobe attach fails (EINVAL, dmesg "ref_ctr_offset mismatch") while another tool holds
            # a uprobe on the same QEMU offset: retry, then fall back to the tracepoints alone.
            tracer = None
            # With hintscope's probe attached it owns the QEMU uprobes (two tools on the same offsets
            # collide); bpftrace then adds only what the probe lacks: the guest's kicks (kvm_pio).
            for uprobes in ((False,) if probe is not None else (True, True, False)):
                t = HostTrace(qemu, src.pid, kick_port, files / "host-trace.txt", uprobes=uprobes)
                try:
                    await t.start()
                    tracer = t
                    break
                except HintscopeError as e:
                    await t.stop()
                    trace_reason = str(e)
            if tracer is not None:
                status = "captured" if tracer.uprobes or probe is not None else "partial"
                writer.set_source("hintguest_bpftrace", status, reason=None if tracer.uprobes else
                                  "uprobes from hintscope's host probe" if probe is not None else
                                  f"uprobes left out: {trace_reason}", script="files/host-trace.bt")
                summary["trace_uprobes"] = tracer.uprobes or probe is not None
                trace_reason = None
            elif o.trace == "on":
                raise HintscopeError(f"--trace on: {trace_reason}")
            else:
                writer.set_source("hintguest_bpftrace", "unavailable", reason=trace_reason)
                summary["trace_error"] = trace_reason
        else:
            writer.set_source("hintguest_bpftrace", "unavailable", reason=trace_reason)
        t_mig = time.monotonic()
        timings["trace_attach"] = round(t_mig - t0 - timings["boot_to_ready"], 3)
        from hintscope.tap.lab import migration_tap
        async with migration_tap(o.tap, bundle, f"unix:{sock}", work, summary) as uri:
            rows = await _migrate(src, uri, o)
        summary["migrate_wall_s"] = round(time.monotonic() - t_mig, 3)
        writer.append("qmp", pd.DataFrame(rows))
        final = json.loads(rows[-1]["raw"])
        summary["migration"] = {k: final.get(k) for k in ("status", "total-time", "downtime", "setup-time", "ram")}
        if final.get("status") != "completed":
            raise HintscopeError(f"migration ended {final.get('status')}: {final.get('error-desc', 'no reason')}")
        await session.paused_both(src, dst)
        if tracer:
            await tracer.stop()
        if probe is not None:
            summary["probe"]["exit"] = await probe.stop()
        scratch.mkdir()
        s_img, d_img = scratch / "src.ram", scratch / "dst.ram"
        await src.cmd("pmemsave", {"val": 0, "size": o.mem_mb << 20, "filename": str(s_img)}, timeout=120)
        await dst.cmd("pmemsave", {"val": 0, "size": o.mem_mb << 20, "filename": str(d_img)}, timeout=120)
        diff = await asyncio.to_thread(memdiff.compare_images, s_img, d_img)
        # The generic memory-check table, unclassified: every page whose content differs (kvmclock aside).
        # Whether a difference is a loss (or a hinted page the guest never rewrote) is the analysis' call.
        d_all = diff.differing
        kvm_sel = d_all["classification"] == "kvmclock" if len(d_all) else np.zeros(0, bool)
        writer.append("lost_pages", d_all[~kvm_sel])
        mc = diff.summary()
        mc["kvmclock_gfns"] = [int(g) for g in d_all.loc[kvm_sel, "gfn"]]
        writer.meta["memcheck"] = summary["memcheck"] = mc
        timings["pmemsave_and_compare"] = round(time.monotonic() - t_mig - summary["migrate_wall_s"], 3)

        log = read_serial_log(src.cfg.serial_path)
        summary["parse_problems"] += log.problems
        host = None
        if tracer:
            host_text = (files / "host-trace.txt").read_text(errors="replace")
            if probe is not None:  # applies and syncs come from the probe's uprobes
                host_text += probe_host_lines(bundle)
            host, hp = parse_host_trace(host_text, "host trace")
            summary["parse_problems"] += hp
            writer.append("hintguest_host", host)
        pool0 = int(log.boot.get("pool", "0x40000"), 16)
        pool1 = pool0 + int(log.boot.get("pool_blocks", "64")) * BLOCK_PAGES
        mem_writes = reuse_writes_in_memory(s_img, (pool0, pool1))
        dd = diff.differing
        kvmclock = (dd.loc[dd["classification"] == "kvmclock", "gfn"].to_numpy(dtype=np.int64)
                    if "classification" in dd else None)
        pages = classify(dd["gfn"].to_numpy(dtype=np.int64), log, host, s_img, d_img, mem_writes, kvmclock)
        summary["reuse_writes_in_source_ram"] = int(len(mem_writes))
        summary["reuse_writes_in_log"] = int(len(log.writes))
        mw = mem_writes.merge(pages[["gfn", "cls"]], on="gfn", how="left")
        mw["lost"] = mw["cls"].eq("lost-reuse-write")
        summary["rounds_from_ram"] = [
            {"round": int(r), "cmd_id": hex(int(g["cmd_id"].iloc[0])), "writes": int(len(g)), "lost": int(g["lost"].sum())}
            for r, g in mw.groupby("round")]
        mono_real = time.clock_gettime_ns(time.CLOCK_MONOTONIC) - time.time_ns()
        qtrace = parse_qemu_trace((files / "qemu-trace.log").read_text(errors="replace"), mono_real, (pool0, pool1))
        writer.append("hintguest_qemu_trace", qtrace)
        writer.append("hintguest_events", log.events)
        writer.append("hintguest_hints", log.hints)
        writer.append("hintguest_writes", log.writes)
        writer.append("hintguest_pages", pages)
        summary["result"] = result_summary(log, host, pages, diff.pages_compared)
        # pages differing counts hinted blocks the guest never rewrote; the writes lost are these
        mc["lost_writes"] = summary["result"]["lost_reuse_writes"] + summary["result"]["lost_other"]
        mc["hinted_held_pages"] = int(summary["result"]["classes"].get("hinted-held", 0))
        summary["clock"] = kick_clock(log, host)
        summary["rounds"] = round_verdicts(log, host, qtrace, pages, summary["clock"])
        summary["dst_after_cont"] = await _dst_health(dst)
        summary["timelines"] = {}
        lost = pages[pages["cls"] == "lost-reuse-write"].merge(log.writes[["gfn", "round"]], on="gfn")
        for gfn in lost.drop_duplicates("round")["gfn"]:  # one lost page per round
            tl = page_timeline(int(gfn), log, host, qtrace, summary["clock"])
            name = f"timeline-{int(gfn):#x}.txt"
            (files / name).write_text(tl.to_string() + "\n")
            summary["timelines"][hex(int(gfn))] = f"files/{name}"
        end = "target-exit"
    except HintscopeError as e:
        end = f"error: {e}"
        raise
    finally:
        if tracer:
            await tracer.stop()
        if probe_task is not None and not probe_task.done():
            probe_task.cancel()
            with contextlib.suppress(BaseException):
                await probe_task
        if probe is not None:
            await probe.stop()
            with contextlib.suppress(OSError):
                shutil.copyfile(work / "probe.log", files / "probe.log")
        for vm in (src, dst):
            await vm.stop()
            with contextlib.suppress(OSError):
                shutil.copyfile(vm.cfg.serial_path, files / f"{vm.cfg.name}-serial.log")
        summary["total_s"] = round(time.monotonic() - t0, 3)
        writer.close(end_reason=end)
        if o.keep_workdir:
            summary["workdir"] = str(work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return summary


def result_summary(log: GuestLog, host: pd.DataFrame | None, pages: pd.DataFrame, compared: int) -> dict[str, Any]:
    by = pages["cls"].value_counts().to_dict()
    ids = log.events.loc[log.events["ev"] == "cfg", "cmd_id"]
    r = {
        "pages_compared": int(compared),
        "pages_differing": int((~pages["cls"].isin(["reuse-ok"])).sum()),
        "classes": {k: int(v) for k, v in sorted(by.items())},
        "lost_reuse_writes": int(by.get("lost-reuse-write", 0)),
        "lost_other": int(by.get("lost-other", 0)),
        "guest_cmd_ids": [hex(int(x)) for x in ids[ids >= 0x80000000].unique()],
        "guest_hint_blocks": int(len(log.hints)),
        "guest_reuse_writes": int(len(log.writes)),
        "guest_errors": log.errors,
        "used_timeouts": int((log.events["ev"] == "used_timeout").sum()),
    }
    if host is not None:
        k = host["kind"].value_counts()
        ap = host[host["kind"] == "apply"]
        r["host"] = {"applies": int(k.get("apply", 0)), "applied_bytes": int(ap["b"].sum()),
                     "syncs": int(k.get("sync", 0)), "gets": int(k.get("get", 0)), "clears": int(k.get("clear", 0)),
                     "ring_resets": int(k.get("reset", 0)), "kicks_seen": int(k.get("pio", 0)),
                     "applied_hint_blocks": int(len(ap))}
    return r


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
    p.add_argument("--trace", default="auto", choices=["auto", "on", "off"], help="bpftrace on the source QEMU")
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

    The 5-6 MB QEMU trace log is dropped afterwards: the pool's ram_save_page sends, syncs and chunk
    clears stay in ``hintguest_qemu_trace``, which the analysis uses when the log is absent
    (``analysis.lost_pages.sends``). ``meta-sample.json`` records that."""
    o = HintguestOptions(bundle=Path(path), behaviour=behaviour, probe="on", **kw)
    s = asyncio.run(run_hintguest(o))
    log = Path(path) / "files" / "qemu-trace.log"
    size = log.stat().st_size if log.exists() else 0
    log.unlink(missing_ok=True)
    w = BundleWriter(Path(path), "sample", append=True)
    w.meta["sample"] = {"made_by": "hintscope.lab.hintguest.make_sample", "behaviour": behaviour,
                        "dropped": {"files/qemu-trace.log": size},
                        "note": "QEMU trace log dropped for size; hintguest_qemu_trace keeps the hint pool's "
                                "ram_save_page sends, the syncs and the clear_bmap chunk clears"}
    w.set_source("qemu_trace", "partial", reason="files/qemu-trace.log dropped from the sample for size; the hint "
                 "pool's ram_save_page sends, syncs and chunk clears are in hintguest_qemu_trace")
    w.close(end_reason="target-exit")
    return s


def report_run(o: HintguestOptions, s: dict[str, Any]) -> int:
    r = s["result"]
    mig = s["migration"]
    print(f"{s['behaviour']} / {s['mode']}: migration {mig['status']} in {mig['total-time']} ms, "
          f"{(mig.get('ram') or {}).get('dirty-sync-count')} syncs")
    print(f"guest: {len(r['guest_cmd_ids'])} cmd ids, {r['guest_hint_blocks']} hint blocks, "
          f"{r['guest_reuse_writes']} reuse writes")
    if "host" in r:
        h = r["host"]
        applies = (f"{h['applies']} hint applies ({h['applied_bytes'] >> 20} MiB), {h['syncs']} syncs"
                   if s.get("trace_uprobes", True) else "hint applies and syncs not traced (uprobes unavailable)")
        print(f"host: {applies}, {h['gets']} GET_DIRTY_LOG, {h['clears']} CLEAR_DIRTY_LOG, {h['ring_resets']} ring resets")
    print(f"memory: {r['classes']}")
    for v in s.get("rounds_from_ram", []):
        print(f"  source RAM: round {v['round']} {v['cmd_id']}: {v['lost']}/{v['writes']} reuse writes lost")
    for v in s.get("rounds", []):
        print(f"  round {v['round']} {v['cmd_id']} ({v['phase']}): {v['lost']}/{v['writes']} reuse writes lost; "
              f"pool chunk first cleared by {v['chunk_cleared_by']} "
              f"{v['clear_minus_first_write_us']} us after the first write; unarmed at epoch start: "
              f"{v['unarmed_at_epoch_start']}; (c') predicts {v['expected']}")
    d = s.get("dst_after_cont", {})
    print(f"destination after cont: {d.get('status')}, done seen {d.get('done_seen')}, {d.get('heartbeats')} heartbeats")
    print(f"lost writes: {r['lost_reuse_writes']} reuse, {r['lost_other']} other; bundle {o.bundle}")
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
