"""Destination memory check: compare two guest RAM images page by page.

The images are QMP ``pmemsave`` dumps of the paused source (postmigrate) and the destination
(incoming complete, not resumed). Any page that differs is a page the migration failed to carry:
the destination holds content the source no longer has. Pages are compared in chunks through
memory maps so a multi-GiB guest never needs that much RAM here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hintscope.errors import HintscopeError
from hintscope.protocol import PAGE

WORDS = PAGE // 8
CHUNK_PAGES = 8192  # 32 MiB per comparison step
DIRTIER_MAGIC = 0x59545244  # "DRTY": the dirtier's per-page record (see guests/dirtier/dirtier.c)
PVCLOCK = np.dtype([("version", "<u4"), ("pad0", "<u4"), ("tsc_timestamp", "<u8"), ("system_time", "<u8"),
                    ("mul", "<u4"), ("shift", "i1"), ("flags", "u1"), ("pad", "<u2")])  # 32 bytes


def _is_pvclock_only(pa: np.ndarray, pb: np.ndarray) -> bool:
    """True when every differing byte sits in a 32-byte record that is a valid kvmclock
    ``pvclock_vcpu_time_info`` on both sides.

    The hypervisor rewrites that record on each host (KVM updates it on clock changes and when
    the destination installs the clock MSR), so it legitimately differs after migration. SeaBIOS
    enables kvmclock under KVM and keeps the record in its own RAM (0xe8c20 here).
    """
    a, b = pa.view(np.uint8), pb.view(np.uint8)
    blocks = np.unique(np.flatnonzero(a != b) // 32)
    for blk in blocks:
        for side in (a, b):
            r = side[blk * 32:(blk + 1) * 32].view(PVCLOCK)[0]
            if (r["version"] & 1 or r["pad0"] or r["pad"] or r["mul"] == 0 or int(r["flags"]) & ~0x3
                    or not -32 <= r["shift"] <= 32):
                return False
    return len(blocks) > 0


@dataclass
class MemDiff:
    pages_compared: int
    differing: pd.DataFrame  # columns of the lost_pages table

    def summary(self) -> dict:
        d = self.differing
        return {
            "pages_compared": int(self.pages_compared),
            "pages_differing": int(len(d)),
            "lost_writes": int((d["classification"] == "lost-write").sum()) if len(d) else 0,
            "kvmclock_pages": int((d["classification"] == "kvmclock").sum()) if len(d) else 0,
            "dst_zero": int(d["dst_zero"].sum()) if len(d) else 0,
            "dst_older_seq": int(((d["dst_seq"] >= 0) & (d["dst_seq"] < d["src_seq"])).sum()) if len(d) else 0,
        }


def _hash64(page: np.ndarray) -> int:
    return int.from_bytes(hashlib.blake2b(page.tobytes(), digest_size=8).digest(), "little")


def _dirtier_seq(page: np.ndarray, gfn: int) -> int:
    """The write sequence the dirtier stamped in this page, or -1 when the page holds no valid record."""
    words32 = page[:2].view(np.uint32)
    if int(words32[0]) == DIRTIER_MAGIC and int(words32[1]) == gfn:
        return int(page[1])
    return -1


def compare_images(src: Path, dst: Path, first_gfn: int = 0) -> MemDiff:
    """Compare two RAM images of equal size; gfn of page i is ``first_gfn + i``."""
    try:
        s_size, d_size = src.stat().st_size, dst.stat().st_size
    except OSError as e:
        raise HintscopeError(f"memory check: cannot read RAM image ({e})") from None
    if s_size != d_size or s_size % PAGE:
        raise HintscopeError(f"memory check: {src} is {s_size} bytes and {dst} {d_size}; "
                             "expected equal whole-page images")
    n = s_size // PAGE
    if n == 0:
        return MemDiff(0, _frame([]))
    a = np.memmap(src, dtype=np.uint64, mode="r", shape=(n, WORDS))
    b = np.memmap(dst, dtype=np.uint64, mode="r", shape=(n, WORDS))
    rows = []
    for lo in range(0, n, CHUNK_PAGES):
        hi = min(n, lo + CHUNK_PAGES)
        diff = np.flatnonzero((a[lo:hi] != b[lo:hi]).any(axis=1)) + lo
        for i in diff:  # differing pages are few; per-page work is fine here
            pa, pb = np.asarray(a[i]), np.asarray(b[i])
            gfn = first_gfn + int(i)
            cls = "kvmclock" if _is_pvclock_only(pa, pb) else "lost-write"
            rows.append((gfn, _hash64(pa), _hash64(pb), not pa.any(), not pb.any(),
                         _dirtier_seq(pa, gfn), _dirtier_seq(pb, gfn), cls))
    del a, b
    return MemDiff(n, _frame(rows))


def _frame(rows: list[tuple]) -> pd.DataFrame:
    cols = ["gfn", "src_hash", "dst_hash", "src_zero", "dst_zero", "src_seq", "dst_seq", "classification"]
    df = pd.DataFrame(rows, columns=cols)
    return df.astype({"gfn": "uint64", "src_hash": "uint64", "dst_hash": "uint64", "src_zero": "bool",
                      "dst_zero": "bool", "src_seq": "int64", "dst_seq": "int64", "classification": "object"})
