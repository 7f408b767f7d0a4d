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


def migration_states(version: str | None) -> list[str] | None:
    """State names by number for the QEMU that printed ``version`` (``QEMU emulator version X.Y.Z``)."""
    m = re.search(r"QEMU emulator version (\d+)\.(\d+)", version or "")
    if not m:
        return None
    major, minor = int(m.group(1)), int(m.group(2))
    if major < 6:
        return None  # older enums differ again; not needed here
    return MIGRATION_STATES_91 if (major, minor) >= (9, 1) else MIGRATION_STATES_72


def is_qemu(exe: str) -> bool:
    return os.path.basename(exe).startswith("qemu-system")


def bpf_text() -> str:
    return BPF_C.read_text()


def _attach_one(b, exe: str, pid: int, p: Probe, symbol: str) -> str:
    try:
        if p.ret:
            b.attach_uretprobe(name=exe, sym=symbol, fn_name=p.fn, pid=pid)
        else:
            b.attach_uprobe(name=exe, sym=symbol, fn_name=p.fn, pid=pid)
    except Exception as e:  # BCC raises bare Exception for every attach failure
        msg = str(e)
        return "missing" if "could not determine address" in msg else f"error: {msg.splitlines()[0][:200]}"
    return "attached"


def attach(b, exe: str, pid: int, page_sends: bool = False) -> dict:
    """Attach every wanted probe to ``exe`` for ``pid``; returns the meta section for the source.

    Status: ``captured`` when all wanted symbols attached, ``partial`` when some are missing,
    ``unavailable`` when none attached.
    """
    opts = {"page_sends": page_sends}
    symbols: dict[str, str] = {}
    attached = 0
    wanted = 0
    for p in PROBES:
        key = p.symbol + (":return" if p.ret else "")
        if p.optional and not opts.get(p.optional):
            symbols[key] = f"off (--{p.optional.replace('_', '-')})"
            continue
        wanted += 1
        status = _attach_one(b, exe, pid, p, p.symbol)
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
    return {"status": status, "reason": reason, "exe": exe, "symbols": symbols,
            "events": {p.event: p.why for p in PROBES}}
