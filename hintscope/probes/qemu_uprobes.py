"""QEMU uprobes for the host probe: hint applies, sync fetch windows, precopy notifiers, state.

The BPF side (qemu_uprobes.bpf.c) is compiled together with host.bpf.c so both share one ring
buffer and one record layout; this module decides what to attach and records, per symbol,
whether it was attached.  Symbols are looked up by name in the target's binary
(``/proc/PID/exe``): Debian's QEMU is stripped but, built with modules, keeps its global
functions in ``.dynsym`` (machine.md).  A symbol the build lacks is a warning in meta
(``sources.qemu_uprobes.symbols[sym] = "missing"``), never a crash.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

BPF_C = Path(__file__).with_name("qemu_uprobes.bpf.c")


@dataclass(frozen=True)
class Probe:
    symbol: str
    fn: str            # BPF function in qemu_uprobes.bpf.c
    ret: bool = False  # uretprobe
    event: str = ""    # qemu_events.event it produces
    optional: str = ""  # name of the option that enables it ("" = always)
    why: str = ""
    # Out-of-line stand-ins when a newer QEMU made `symbol` an inline wrapper; all that exist are used.
    alternatives: tuple[str, ...] = ()


PROBES = [
    Probe("qemu_guest_free_page_hint", "q_hint_apply", event="hint_apply",
          why="a hint applied: a0 = HVA, a1 = length in bytes"),
    Probe("qemu_guest_free_page_hint", "q_hint_apply_ret", ret=True, event="hint_apply_ret",
          why="the apply returned (bitmap bits cleared)"),
    Probe("memory_global_dirty_log_sync", "q_sync_begin", event="sync_fetch_begin",
          why="sync fetch window opens (GET_DIRTY_LOG per slot / ring flush follows)"),
    Probe("memory_global_after_dirty_log_sync", "q_sync_end", event="sync_fetch_end",
          why="sync fetch window closes (bits merged into the RAMBlock bitmaps)"),
    Probe("migrate_set_state", "q_migrate_state", event="migrate_state",
          why="migration state change: a1 = old, a2 = new (1 setup, 4 active, 8 completed, 9 failed)"),
    Probe("virtio_notify_config", "q_notify_config", event="notify_config",
          why="config-change interrupt (e.g. the balloon published a new cmd id)"),
    Probe("notifier_with_return_list_notify", "q_notifier", event="precopy_notify",
          why="precopy notifiers (precopy_notify is inlined): a0 = list, a1 = reason"),
    Probe("virtqueue_pop", "q_vq_pop", optional="vq_pops",
          why="(no row) saves the VirtQueue argument per thread for the return probe"),
    Probe("virtqueue_pop", "q_vq_pop_ret", ret=True, event="vq_pop_cmd", optional="vq_pops",
          why="an element with one 4-byte out buffer was popped: a0 = VirtQueue, a1 = the u32 in it "
              "(free page vq: cmd id >= 0x80000000, 0 = stop); ret = -14 when it could not be read"),
    Probe("virtqueue_pop", "q_vq_pop_ret", ret=True, event="vq_pop_hint", optional="vq_pops",
          why="an element with one in buffer was popped: a0 = VirtQueue, a1 = HVA, a2 = length in bytes"),
    Probe("buffer_is_zero", "q_page_send", event="page_send", optional="page_sends",
          why="page about to be sent by the RAM save path: a0 = HVA (one uprobe hit per page)",
          # QEMU >= 9.0: buffer_is_zero is inline and calls one of these.
          alternatives=("buffer_is_zero_ool", "buffer_is_zero_ge256")),
]


# MigrationStatus values in enum order (the numbers migrate_set_state receives), read from
# `query-qmp-schema` of Debian's 7.2.22 and of the 10.0.2 backport.  QEMU 9.1 inserted
# postcopy-recover-setup at 7, shifting completed from 8 to 9 and failed from 9 to 10.
MIGRATION_STATES_72 = ["none", "setup", "cancelling", "cancelled", "active", "postcopy-active", "postcopy-paused",
                       "postcopy-recover", "completed", "failed", "colo", "pre-switchover", "device", "wait-unplug"]
MIGRATION_STATES_91 = MIGRATION_STATES_72[:7] + ["postcopy-recover-setup"] + MIGRATION_STATES_72[7:]


@dataclass(frozen=True)
class ElementLayout:
    """Byte offsets in QEMU's VirtQueueElement that the virtqueue_pop return probe reads."""
    name: str
    out_num: int
    in_num: int
    in_sg: int
    out_sg: int

    def cflags(self) -> list[str]:
        return [f"-DVQE_OUT_NUM={self.out_num}", f"-DVQE_IN_NUM={self.in_num}",
                f"-DVQE_IN_SG={self.in_sg}", f"-DVQE_OUT_SG={self.out_sg}"]

    def meta(self, basis: str) -> dict:
        return {"name": self.name, "out_num": self.out_num, "in_num": self.in_num, "in_sg": self.in_sg,
                "out_sg": self.out_sg, "basis": basis}


# {unsigned index, len, ndescs, out_num, in_num; hwaddr *in_addr, *out_addr; struct iovec *in_sg, *out_sg}
# ndescs came with the packed ring (QEMU 4.2).  Read in the 7.2 and 10.0 include/hw/virtio/virtio.h
# and checked on both binaries: every hint element's (in_sg[0].iov_base, iov_len) equals the
# qemu_guest_free_page_hint arguments that follow it (tests/test_probe_vq_pops.py).
ELEMENT_LAYOUT_42 = ElementLayout("index,len,ndescs,out_num,in_num,*in_addr,*out_addr,*in_sg,*out_sg",
                                  out_num=12, in_num=16, in_sg=40, out_sg=48)


def element_layout(version: str | None) -> tuple[ElementLayout | None, str]:
    """VirtQueueElement layout for the QEMU that printed ``version``, and why it was chosen.

    None for QEMU < 4.2, whose element had no ndescs (the vq pop probes are then not attached).
    An unreadable version gets the 4.2+ layout, marked "assumed": the BPF shape filter (exact
    counts and a 4-byte length) makes a wrong layout yield no rows rather than wrong ones.
    """
    mm = qemu_major_minor(version)
    if mm is None:
        return ELEMENT_LAYOUT_42, "assumed (QEMU version unknown)"
    major, minor = mm
    if (major, minor) < (4, 2):
        return None, f"QEMU {major}.{minor} < 4.2: VirtQueueElement has no ndescs, layout not known to hintscope"
    return ELEMENT_LAYOUT_42, f"QEMU {major}.{minor} >= 4.2"


def qemu_major_minor(version: str | None) -> tuple[int, int] | None:
    """(major, minor) from QEMU's banner (``QEMU emulator version X.Y.Z ...``, what ``-version``
    prints and the probe records) or a bare ``X.Y[.Z]``; None when neither."""
    m = re.search(r"QEMU emulator version (\d+)\.(\d+)", version or "") or \
        re.fullmatch(r"\s*v?(\d+)\.(\d+)(?:\.\d+)?(?:[ +~(-].*)?", version or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def migration_states(version: str | None) -> list[str] | None:
    """State names by number for the QEMU whose version is ``version`` (see qemu_major_minor)."""
    mm = qemu_major_minor(version)
    if mm is None:
        return None
    major, minor = mm
    if major < 6:
        return None  # older enums differ again; not needed here
    return MIGRATION_STATES_91 if (major, minor) >= (9, 1) else MIGRATION_STATES_72


def is_qemu(exe: str) -> bool:
    return os.path.basename(exe).startswith("qemu-system")


def bpf_text() -> str:
    return BPF_C.read_text()


# QEMU's virtqueue_pop (7.2 and 10.0 builds alike) is a dispatcher:
#   movabs $0xff00ff000000,%rax; mov 0x60(%rdi),%rdx; and D(%rdx),%rax; jne <return NULL>
#   testb $0x4,D(%rdx); je +8; jmp virtqueue_packed_pop; nopl; jmp virtqueue_split_pop
# Its first instruction is one the kernel cannot emulate, so a probe at the entry costs an extra
# single-step trap per call (~8x the whole probe here, docs/probes.md); a jmp is emulated.  At both
# tail jumps %rdi still holds vq and (%rsp) the caller's return address, so the entry probe and the
# uretprobe work there unchanged and only the NULL return of a broken device is not seen.
_VQ_POP_DISPATCH = re.compile(rb"\x48\xb8.{8}\x48\x8b\x57.\x48\x23\x82.{4}\x75.\xf6\x82.{5}\x74\x08"
                              rb"(\xe9.{4})\x0f\x1f\x00(\xe9.{4})", re.S)


def vq_pop_sites(exe: str, pid: int) -> tuple[list[int] | None, str]:
    """Where to attach the virtqueue_pop pair: the dispatcher's tail jumps (virtual addresses)
    when its code is the known one, else None (the symbol's entry); and a note for meta."""
    try:
        from bcc import BPF  # loaded by the caller already (bcc_env.load_bcc)
        found = {int(a) for _, a in BPF.get_user_functions_and_addresses(exe.encode(), rb"^virtqueue_pop$")}
        if len(found) != 1:   # .symtab and .dynsym may both list it, at one address
            return None, "entry (symbol not found, or at several addresses)"
        vaddr = found.pop()
        path, foff = BPF._check_path_symbol(exe.encode(), b"virtqueue_pop", None, pid)
        with open(path, "rb") as f:
            f.seek(foff)
            code = f.read(64)
    except Exception as e:  # BCC raises bare Exception; an unreadable binary (or no BCC) just means "entry"
        return None, f"entry (code not readable: {str(e).splitlines()[0][:120]})"
    m = _VQ_POP_DISPATCH.match(code)
    if not m:
        return None, "entry (not the known dispatcher code)"
    offs = [m.start(1), m.start(2)]
    return [vaddr + o for o in offs], "tail jumps " + ", ".join(f"+{o:#x}" for o in offs)


def _attach_one(b, exe: str, pid: int, p: Probe, symbol: str, addrs: list[int] | None = None) -> str:
    try:
        for kw in ([{"addr": a} for a in addrs] if addrs else [{"sym": symbol}]):
            if p.ret:
                b.attach_uretprobe(name=exe, fn_name=p.fn, pid=pid, **kw)
            else:
                b.attach_uprobe(name=exe, fn_name=p.fn, pid=pid, **kw)
    except Exception as e:  # BCC raises bare Exception for every attach failure
        msg = str(e)
        return "missing" if "could not determine address" in msg else f"error: {msg.splitlines()[0][:200]}"
    return "attached"


def attach(b, exe: str, pid: int, page_sends: bool = False, vq_pops: str | None = None) -> dict:
    """Attach every wanted probe to ``exe`` for ``pid``; returns the meta section for the source.

    ``vq_pops``: None to attach the virtqueue_pop pair, else why it is off.
    Status: ``captured`` when all wanted symbols attached, ``partial`` when some are missing,
    ``unavailable`` when none attached.
    """
    off = {"page_sends": None if page_sends else "--page-sends", "vq_pops": vq_pops}
    sites, where = vq_pop_sites(exe, pid) if not vq_pops else (None, None)
    symbols: dict[str, str] = {}
    attached = 0
    wanted = 0
    done: set[tuple[str, str]] = set()
    for p in PROBES:
        key = p.symbol + (":return" if p.ret else "")
        if (p.fn, key) in done:   # one BPF function may produce several events
            continue
        done.add((p.fn, key))
        if p.optional and off.get(p.optional):
            symbols[key] = f"off ({off[p.optional]})"
            continue
        wanted += 1
        status = _attach_one(b, exe, pid, p, p.symbol, sites if p.symbol == "virtqueue_pop" else None)
        if status == "missing" and p.alternatives:
            alt = {a: _attach_one(b, exe, pid, p, a) for a in p.alternatives}
            used = [a for a, st in alt.items() if st == "attached"]
            if used:
                status = f"attached via {', '.join(used)}"
        symbols[key] = status
        if status.startswith("attached"):
            attached += 1
    missing = [k for k, v in symbols.items() if v == "missing" or v.startswith("error")]
    if attached == 0:
        status, reason = "unavailable", f"no QEMU symbol could be attached in {exe}"
    elif missing:
        status, reason = "partial", f"not attached: {', '.join(missing)}"
    else:
        status, reason = "captured", None
    return {"status": status, "reason": reason, "exe": exe, "symbols": symbols, "vq_pop_sites": where,
            "events": {p.event: p.why for p in PROBES if p.event}}
