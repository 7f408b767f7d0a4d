"""Memslot history and address translation: HVA -> GPA and (slot, page) -> gfn.

KVM memslots change during a run (QEMU re-registers every RAM slot with LOG_DIRTY_PAGES when
migration starts, and splits/merges slots while the firmware remaps low memory), so a
translation is valid at a time: every lookup takes the event's ``ts_ns``.

Sources, best first: the probe's ``memslots`` table (KVM_SET_USER_MEMORY_REGION at syscall
exit), then QEMU's own ``kvm_set_user_memory`` trace events, then (TCG, no KVM slots) the lab's
``ram_map`` table from QEMU's ``gpa2hva``.  A slot first seen after an event
is assumed to have existed already (a probe attached to a running VMM sees a slot only when
QEMU re-registers it at migration start).  Only address space 0 is used for HVA -> GPA: x86 SMM
(as_id 1) maps the same RAM at other GPAs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hintscope.protocol import PAGE, PAGE_SHIFT  # noqa: F401 (re-exported)

_I64_MIN = np.iinfo(np.int64).min
_I64_MAX = np.iinfo(np.int64).max

RAM_MAP_SLOT = 0x7FFF
EVENT_COLS = ["ts_ns", "as_id", "slot", "flags", "gpa", "size", "hva"]
INTERVAL_COLS = ["as_id", "slot", "flags", "gpa", "size", "hva", "start_ns", "end_ns"]


def slot_events(memslots: pd.DataFrame | None = None, qemu_trace: pd.DataFrame | None = None,
                ram_map: pd.DataFrame | None = None) -> tuple[pd.DataFrame, str]:
    """Successful memslot changes (``EVENT_COLS``) and the name of the source used."""
    m = None
    if memslots is not None and len(memslots):
        m = memslots[memslots["ret"] == 0]
        src = "memslots"
    elif qemu_trace is not None and len(qemu_trace):
        m = qemu_trace[(qemu_trace["event"] == "kvm_set_user_memory") & (qemu_trace["ret"] == 0)]
        src = "qemu_trace"
    if (m is None or not len(m)) and ram_map is not None and len(ram_map):
        # No KVM (TCG): the lab asked QEMU where RAM lives; each range acts as a slot that
        # exists for the whole run. Ids from 0x7fff down: above KVM's user slots, and not -1
        # (which hva_to_gpa returns for "unmapped").
        m = ram_map.assign(as_id=0, slot=RAM_MAP_SLOT - np.arange(len(ram_map)), flags=0)
        src = "ram_map"
    if m is None or not len(m):
        return pd.DataFrame({c: pd.Series(dtype="int64") for c in EVENT_COLS}), "none"
    out = pd.DataFrame({c: m[c].to_numpy().astype(np.int64) for c in EVENT_COLS})
    return out.sort_values("ts_ns", kind="stable", ignore_index=True), src


def intervals(events: pd.DataFrame) -> pd.DataFrame:
    """Slot events -> validity intervals [start_ns, end_ns) of each (as_id, slot) mapping.

    A size-0 event deletes the slot; every event ends the previous mapping of its slot.  The
    first mapping of a slot extends back to the beginning of time (see module docstring).
    """
    if not len(events):
        return pd.DataFrame({c: pd.Series(dtype="int64") for c in INTERVAL_COLS})
    e = events.sort_values(["as_id", "slot", "ts_ns"], kind="stable", ignore_index=True)
    key = e["as_id"].to_numpy() * (1 << 20) + e["slot"].to_numpy()
    ts = e["ts_ns"].to_numpy()
    same_next = np.r_[key[1:] == key[:-1], False]
    end = np.where(same_next, np.r_[ts[1:], 0], _I64_MAX)
    first = np.r_[True, key[1:] != key[:-1]]
    start = np.where(first, _I64_MIN, ts)
    iv = e.assign(start_ns=start, end_ns=end)
    iv = iv[iv["size"] > 0]
    return iv[INTERVAL_COLS].reset_index(drop=True)


def hva_to_gpa(hva: np.ndarray, ts_ns: np.ndarray, iv: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """GPA and slot id for each (HVA, time); -1 where no address-space-0 slot maps that HVA then.

    One step per slot interval; each step touches only the addresses inside the interval's HVA
    range (binary search over the sorted addresses), so the cost is the number of (address, slot
    version) pairs, not addresses x intervals.
    """
    hva = np.asarray(hva, dtype=np.int64)
    ts = np.asarray(ts_ns, dtype=np.int64)
    gpa = np.full(hva.shape, -1, dtype=np.int64)
    slot = np.full(hva.shape, -1, dtype=np.int32)
    order = np.argsort(hva, kind="stable")
    sh = hva[order]
    iv0 = _capped(iv[iv["as_id"] == 0])
    lo = np.searchsorted(sh, iv0["hva"].to_numpy(np.int64), side="left")
    hi = np.searchsorted(sh, (iv0["hva"] + iv0["size"]).to_numpy(np.int64), side="left")
    for r, a, b in zip(iv0.itertuples(index=False), lo, hi):
        if a == b:
            continue
        i = order[a:b]
        m = (gpa[i] < 0) & (ts[i] >= r.start_ns) & (ts[i] < r.end_ns)
        i = i[m]
        gpa[i] = hva[i] - r.hva + r.gpa
        slot[i] = r.slot
    return gpa, slot


def slot_page_to_gfn(slot_field: np.ndarray, page: np.ndarray, ts_ns: np.ndarray, iv: pd.DataFrame) -> np.ndarray:
    """gfn for (slot field as KVM passes it: as_id << 16 | id, page offset in the slot, time); -1 if unknown."""
    sf = np.asarray(slot_field, dtype=np.int64)
    page = np.asarray(page, dtype=np.int64)
    ts = np.asarray(ts_ns, dtype=np.int64)
    gfn = np.full(page.shape, -1, dtype=np.int64)
    iv = _capped(iv)
    key = (iv["as_id"].to_numpy(np.int64) << 16) | iv["slot"].to_numpy(np.int64)
    if len(sf) and (sf == sf[0]).all():
        # One slot (the common 64 GiB harvest): whole-array masks, no argsort and no 16 M-element
        # fancy-index copies per interval.
        for r in iv[key == sf[0]].itertuples(index=False):
            m = (gfn < 0) & (ts >= r.start_ns) & (ts < r.end_ns) & (page >= 0) & (page < (r.size >> PAGE_SHIFT))
            np.copyto(gfn, page + (r.gpa >> PAGE_SHIFT), where=m)
        return gfn
    order = np.argsort(sf, kind="stable")
    ss = sf[order]
    lo = np.searchsorted(ss, key, side="left")
    hi = np.searchsorted(ss, key, side="right")
    for r, a, b in zip(iv.itertuples(index=False), lo, hi):
        if a == b:
            continue
        i = order[a:b]
        m = (gfn[i] < 0) & (ts[i] >= r.start_ns) & (ts[i] < r.end_ns) & (page[i] >= 0) & \
            (page[i] < (r.size >> PAGE_SHIFT))
        i = i[m]
        gfn[i] = (r.gpa >> PAGE_SHIFT) + page[i]
    return gfn


# QEMU registers tens of slots and re-registers them a handful of times; a table with more
# intervals than this is not a real capture, and the rest are ignored (see intervals_problem).
MAX_INTERVALS = 100_000


def _capped(iv: pd.DataFrame) -> pd.DataFrame:
    return iv if len(iv) <= MAX_INTERVALS else iv.iloc[:MAX_INTERVALS]


def intervals_problem(iv: pd.DataFrame) -> str | None:
    if len(iv) > MAX_INTERVALS:
        return f"{len(iv)} memslot mappings, more than any real VMM makes: only the first {MAX_INTERVALS} are used"
    return None


def expand_ranges(start: np.ndarray, length: np.ndarray, page: int = PAGE) -> tuple[np.ndarray, np.ndarray]:
    """Byte ranges -> (index of the range, page-aligned address of each page touched).

    A range [start, start+length) covers every page it overlaps.
    """
    start = np.asarray(start, dtype=np.int64)
    length = np.asarray(length, dtype=np.int64)
    first = start // page
    last = np.where(length > 0, (start + length - 1) // page, first - 1)
    n = np.maximum(last - first + 1, 0)
    idx = np.repeat(np.arange(len(start)), n)
    # Position inside each range: global position minus the range's first position.
    offs = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
    return idx, (np.repeat(first, n) + offs) * page
