"""Both sides' RAM through QMP pmemsave, compared page by page with numpy.

Ground truth for "lost": a page the guest wrote after hinting it (its serial log's ev=write lines,
plus any page whose source copy holds the guest's reuse record, in case the log was cut short) and
whose destination copy differs from the paused source's. A hinted page the guest never wrote
again may differ legitimately: the host is allowed to skip it (VIRTIO 1.2 5.5.6.5.2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tests.outsider.vm import VM, GuestLog

PAGE = 4096
MAGIC_REUSE = 0x57524748  # "HGRW": the record hintguest stamps at the start of a page it reuses
FIRMWARE_GFNS = 0x100     # below 1 MiB: SeaBIOS's data, e.g. its kvmclock record, which KVM rewrites


@dataclass
class MemCheck:
    pages: int
    differing: int
    firmware: int                        # differing pages below 1 MiB (not the guest's)
    hinted_pages: int                    # pages in blocks the guest made available as hints
    hinted_held: int                     # differing hinted pages the guest did not write again
    written_after_hint: list[int]        # gfns
    lost: list[int]                      # written after hint, destination differs
    lost_other: list[int]                # differing, never hinted, not firmware
    log_writes: int                      # ev=write lines
    ram_reuse_records: int               # source pages holding an HGRW record
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"pages": self.pages, "differing": self.differing, "firmware": self.firmware,
                "hinted_pages": self.hinted_pages, "hinted_held": self.hinted_held,
                "written_after_hint": len(self.written_after_hint), "lost": len(self.lost),
                "lost_other": len(self.lost_other), "log_writes": self.log_writes,
                "ram_reuse_records": self.ram_reuse_records, "notes": self.notes}


def scratch_dir(fallback: Path) -> Path:
    """/dev/shm when it has room for two dumps (a disk write of 2 x 256 MiB costs seconds here)."""
    import shutil

    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 4 << 30:
        return shm
    return fallback


def dump(vm: VM, path: Path, mem_mb: int) -> np.ndarray:
    try:
        vm.cmd("pmemsave", val=0, size=mem_mb << 20, filename=str(path))
        a = np.fromfile(path, dtype="<u8")
    finally:
        path.unlink(missing_ok=True)
    if a.size != (mem_mb << 20) // 8:
        raise RuntimeError(f"pmemsave of {vm.name} gave {a.size * 8} bytes, expected {mem_mb << 20}")
    return a.reshape(-1, PAGE // 8)


def compare(src: np.ndarray, dst: np.ndarray, log: GuestLog) -> MemCheck:
    pages = src.shape[0]
    diff = np.flatnonzero((src != dst).any(axis=1))
    hinted = np.zeros(pages, bool)
    for gfn, n, _id, _round in log.hinted_blocks():
        hinted[gfn:min(gfn + n, pages)] = True
    logged = log.writes_after_hint()
    # the record at a page's start: u32 magic, u32 gfn, u64 seq
    magic = (src[:, 0] & 0xFFFFFFFF).astype(np.uint32)
    reuse_rec = (magic == MAGIC_REUSE) & hinted
    in_ram = np.flatnonzero(reuse_rec)
    written = np.zeros(pages, bool)
    written[in_ram] = True
    notes = []
    # A logged write the source RAM does not hold was made on the destination after it resumed
    # (the source stopped inside the round; the log is printed after the writes).
    later = [g for g, seq in logged.items() if g >= pages or not reuse_rec[g] or int(src[g, 1]) < seq]
    if later:
        notes.append(f"{len(later)} logged write(s) not in the source RAM (made after the switchover)")
    if missing := len(set(in_ram.tolist()) - set(logged)):
        notes.append(f"{missing} reuse record(s) in the source RAM with no ev=write line")
    d = np.zeros(pages, bool)
    d[diff] = True
    firmware = d.copy()
    firmware[FIRMWARE_GFNS:] = False
    lost = np.flatnonzero(d & written)
    held = d & hinted & ~written
    other = np.flatnonzero(d & ~hinted & ~firmware)
    return MemCheck(pages=pages, differing=int(d.sum()), firmware=int(firmware.sum()),
                    hinted_pages=int(hinted.sum()), hinted_held=int(held.sum()),
                    written_after_hint=np.flatnonzero(written).tolist(), lost=lost.tolist(),
                    lost_other=other.tolist(), log_writes=len(log.of("write")),
                    ram_reuse_records=int(in_ram.size), notes=notes)
