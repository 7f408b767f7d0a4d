"""Bulk decoding of the host probe's BPF ring buffer.

host.bpf.c writes every record with the same size (88 bytes of payload behind the ring's own
8-byte header), so the unread part of the ring is a regular array with a 96-byte stride.  The
consumer (:class:`RingConsumer`) maps the ring like libbpf does, snapshots the record headers
with one strided numpy read, copies the committed records in one slice and advances the
consumer position; :func:`decode` then turns a buffer of records into bundle table columns
with numpy only: no Python work per event.

Layout of one ring slot (offsets from the slot start; the payload is ``struct rec_*`` in
host.bpf.c)::

    0  u32 len | BUSY(1<<31) | DISCARD(1<<30)   ring header written by the kernel
    4  u32 page offset                          (kernel internal)
    8  u16 type   10 u16 aux   12 u32 tid   16 u64 ts        common record header
    24 ... type-specific fields (see the dtypes below)
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from hintscope.errors import HintscopeError
from hintscope.probes import kvm_abi as K

PAYLOAD = 88
STRIDE = 96  # 8-byte ring header + payload, already a multiple of 8
BUSY = 1 << 31
DISCARD = 1 << 30

REC_IOCTL, REC_BITMAP, REC_RING_PUSH, REC_RING_RESET, REC_QEMU = 1, 2, 3, 4, 5
IOCTL_F_TRUNCATED = 1
BITMAP_OPS = {1: "get", 2: "clear"}

# lost[] indexes in host.bpf.c -> (bundle lost-counter source, what it counts)
LOST_INDEX = {
    0: ("host_ioctl", "ioctl record not written (ring full)"),
    1: ("host_bitmap", "bitmap chunk not written (ring full, unreadable user memory or tail call failed)"),
    2: ("host_dirty_ring", "dirty-ring tracepoint record not written (ring full)"),
    3: ("qemu_uprobes", "uprobe record not written (ring full)"),
    5: (None, "GET_DIRTY_LOG on a slot whose size the probe never saw"),
    6: ("host_bitmap", "bitmap truncated (slot larger than the BPF walk covers)"),
}
LOST_SLOT_UNKNOWN = 5
LOST_BITMAP_TRUNC = 6


def _dt(fields: list[tuple[str, str, int]]) -> np.dtype:
    names, formats, offsets = zip(*[(n, f, o) for n, f, o in fields])
    return np.dtype({"names": list(names), "formats": list(formats), "offsets": list(offsets), "itemsize": STRIDE})


_HDR = [("len", "<u4", 0), ("pgoff", "<u4", 4), ("type", "<u2", 8), ("aux", "<u2", 10), ("tid", "<u4", 12),
        ("ts", "<u8", 16)]
HDR_DTYPE = _dt(_HDR)
IOCTL_DTYPE = _dt(_HDR + [
    ("enter_ns", "<u8", 24), ("seq", "<u4", 32), ("cmd", "<u4", 36), ("fd", "<i4", 40), ("slot", "<i4", 44),
    ("ret", "<i8", 48), ("a0", "<u8", 56), ("a1", "<u8", 64), ("a2", "<u8", 72), ("a3", "<u8", 80)])
BITMAP_DTYPE = np.dtype({"names": [n for n, _, _ in _HDR] + ["slot", "base_word", "mask"],
                         "formats": [f for _, f, _ in _HDR] + ["<i4", "<u4", ("<u8", (8,))],
                         "offsets": [o for _, _, o in _HDR] + [24, 28, 32], "itemsize": STRIDE})
RING_DTYPE = _dt(_HDR + [("vcpu", "<i4", 24), ("dirty_index", "<u4", 28), ("reset_index", "<u4", 32),
                         ("slot", "<u4", 36), ("offset", "<u8", 40)])
QEMU_DTYPE = _dt(_HDR + [("a0", "<u8", 24), ("a1", "<u8", 32), ("a2", "<u8", 40), ("ret", "<i8", 48)])

# QEMU uprobe event ids (hdr.aux) -> names; same numbers as QEV_* in qemu_uprobes.bpf.c.
QEMU_EVENTS = {
    1: "hint_apply", 2: "hint_apply_ret", 3: "sync_fetch_begin", 4: "sync_fetch_end", 5: "migrate_state",
    6: "notify_config", 7: "precopy_notify", 8: "page_send", 9: "vq_pop_cmd", 10: "vq_pop_hint",
}


def _names(codes: np.ndarray, table: dict[int, str], unknown: str) -> pd.Categorical:
    """Vectorised code -> name, dictionary-encoded (one lookup per distinct code, not per event).

    A Categorical rather than an object array of str: building per-row Python strings and
    converting them to Arrow was ~40 % of the ioctl/bitmap decode+append time; BundleWriter
    casts the dictionary to strings in C.  pd.factorize hashes (no sort, unlike np.unique).
    """
    inv, uniq = pd.factorize(np.asarray(codes).reshape(-1))
    names = [table.get(int(u), unknown.format(int(u))) for u in uniq]
    # Two codes may share a name (or an unknown code's name may collide): categories must be unique.
    remap, cats = pd.factorize(pd.Index(names, dtype=object))
    return pd.Categorical.from_codes(remap[inv] if len(inv) else inv, categories=pd.Index(cats, dtype=object))


def _i64(u: np.ndarray) -> np.ndarray:
    return u.astype(np.uint64).view(np.int64)


@dataclass
class Decoded:
    tables: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    records: int = 0
    discarded: int = 0
    bad: int = 0          # wrong length or unknown type: skipped

    def rows(self, table: str) -> int:
        cols = self.tables.get(table)
        return len(next(iter(cols.values()))) if cols else 0


def decode(buf: bytes | bytearray | memoryview | np.ndarray) -> Decoded:
    """Decode whole 96-byte ring slots into bundle table columns (dicts of numpy arrays).

    A trailing partial slot, a slot whose length is not 88 or whose type is unknown is counted
    in ``bad`` and skipped; discarded slots are counted in ``discarded``.
    """
    raw = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf.view(np.uint8).reshape(-1)
    n = len(raw) // STRIDE
    out = Decoded(bad=int(len(raw) % STRIDE != 0))
    if n == 0:
        return out
    raw = raw[: n * STRIDE]
    hdr = raw.view(HDR_DTYPE)
    ln = hdr["len"]
    discarded = (ln & DISCARD) != 0
    ok = ~discarded & ((ln & ~np.uint32(BUSY | DISCARD)) == PAYLOAD)
    out.records = int(ok.sum())
    out.discarded = int(discarded.sum())
    out.bad += int(n - out.records - out.discarded)
    typ = hdr["type"]
    known = np.isin(typ, (REC_IOCTL, REC_BITMAP, REC_RING_PUSH, REC_RING_RESET, REC_QEMU))
    out.bad += int((ok & ~known).sum())
    out.records -= int((ok & ~known).sum())

    def pick(t: int, dtype: np.dtype) -> np.ndarray:
        sel = ok & (typ == t)
        # A batch of one record type (a flood of one event) needs no copy of its 96-byte records.
        return raw.view(dtype) if sel.all() else raw.view(dtype)[sel]

    io = pick(REC_IOCTL, IOCTL_DTYPE)
    if len(io):
        out.tables.update(_ioctl_tables(io))
    bm = pick(REC_BITMAP, BITMAP_DTYPE)
    if len(bm):
        out.tables["bitmap_words"] = _bitmap_words(bm)
    rp = pick(REC_RING_PUSH, RING_DTYPE)
    if len(rp):
        out.tables["ring_push"] = {
            "ts_ns": _i64(rp["ts"]), "tid": rp["tid"].astype(np.int32), "vcpu": rp["vcpu"].astype(np.int32),
            "dirty_index": rp["dirty_index"].copy(), "reset_index": rp["reset_index"].copy(),
            "slot": rp["slot"].astype(np.int32), "offset": rp["offset"].copy(),
        }
    rr = pick(REC_RING_RESET, RING_DTYPE)
    if len(rr):
        out.tables["ring_reset"] = {
            "ts_ns": _i64(rr["ts"]), "tid": rr["tid"].astype(np.int32), "vcpu": rr["vcpu"].astype(np.int32),
            "dirty_index": rr["dirty_index"].copy(), "reset_index": rr["reset_index"].copy(),
        }
    q = pick(REC_QEMU, QEMU_DTYPE)
    if len(q):
        out.tables["qemu_events"] = {
            "ts_ns": _i64(q["ts"]), "tid": q["tid"].astype(np.int32),
            "event": _names(q["aux"], QEMU_EVENTS, "event_{}"),
            "a0": q["a0"].copy(), "a1": q["a1"].copy(), "a2": q["a2"].copy(), "ret": q["ret"].copy(),
        }
    return out


def _ioctl_tables(io: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    cmd = io["cmd"]
    a0, a1, a2, a3 = (io[f"a{i}"] for i in range(4))
    is_get = cmd == K.GET_DIRTY_LOG
    is_clear = cmd == K.CLEAR_DIRTY_LOG_IOCTL
    is_cap = cmd == K.ENABLE_CAP_IOCTL
    is_reset = cmd == K.RESET_DIRTY_RINGS
    is_region = (cmd == K.SET_USER_MEMORY_REGION) | (cmd == K.SET_USER_MEMORY_REGION2)
    minus1 = np.int64(-1)
    ioctls = {
        "ts_ns": _i64(io["ts"]),
        "enter_ns": _i64(io["enter_ns"]),
        "tid": io["tid"].astype(np.int32),
        "seq": io["seq"].astype(np.int64),
        "fd": io["fd"].copy(),
        "cmd": cmd.copy(),
        "name": _names(cmd, K.TRACED, "0x{:08x}"),
        "slot": io["slot"].copy(),
        "ret": io["ret"].copy(),
        "first_page": np.where(is_clear, _i64(a0), minus1),
        "num_pages": np.where(is_clear, _i64(a1), np.where(is_get, _i64(a3), minus1)),
        "pages": np.where(is_get | is_clear | is_reset, _i64(a2), minus1),
        "cap": np.where(is_cap, _i64(a0), minus1),
        "arg0": np.where(is_cap, a1, np.uint64(0)),
    }
    tables = {"ioctls": ioctls}
    r = io[is_region]
    if len(r):
        raw_slot = r["slot"].view(np.uint32)
        tables["memslots"] = {
            "ts_ns": _i64(r["ts"]), "tid": r["tid"].astype(np.int32), "seq": r["seq"].astype(np.int64),
            "slot": (raw_slot & 0xFFFF).astype(np.int32), "as_id": (raw_slot >> 16).astype(np.int32),
            "flags": r["a0"].astype(np.uint32), "gpa": r["a1"].copy(), "size": r["a2"].copy(),
            "hva": r["a3"].copy(), "ret": r["ret"].copy(),
        }
    return tables


def _bitmap_words(bm: np.ndarray) -> dict[str, np.ndarray]:
    """Nonzero words as runs (schema 2 ``nwords``): consecutive equal words of one ioctl are one row.

    Records of one ioctl share (ts, seq, op, slot) and arrive in word order; a stable sort by seq
    keeps them adjacent when another thread's records interleave.  A run cut by a ring-read or
    flush boundary is written as two rows, which readers treat the same.
    """
    masks = bm["mask"]                                    # (N, 8)
    nwords = (bm["aux"] >> 8).astype(np.int64)
    valid = (np.arange(masks.shape[1])[None, :] < nwords[:, None]) & (masks != 0)
    rows, cols = np.nonzero(valid)
    seq = bm["tid"].astype(np.int64)[rows]
    if len(seq) > 1 and (seq[1:] < seq[:-1]).any():
        order = np.argsort(seq, kind="stable")
        rows, cols, seq = rows[order], cols[order], seq[order]
    ts = _i64(bm["ts"])[rows]
    op = (bm["aux"] & 0xFF)[rows]
    slot = bm["slot"][rows]
    word = bm["base_word"].astype(np.int64)[rows] + cols
    mask = masks[rows, cols]
    start = np.ones(len(rows), bool)
    start[1:] = ((word[1:] != word[:-1] + 1) | (mask[1:] != mask[:-1]) | (seq[1:] != seq[:-1])
                 | (ts[1:] != ts[:-1]) | (op[1:] != op[:-1]) | (slot[1:] != slot[:-1]))
    first = np.flatnonzero(start)
    return {
        "ts_ns": ts[first],
        "seq": seq[first],
        "op": _names(op[first], BITMAP_OPS, "op_{}"),
        "slot": slot[first],
        "word": word[first],
        "mask": mask[first],
        "nwords": np.diff(np.append(first, len(rows))).astype(np.int64),
    }


def pages_from_words(word: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Expand (word, mask) pairs into sorted page numbers (page = word*64 + bit); runs
    (``nwords`` > 1) go through :func:`hintscope.analysis.harvest.unrun` first."""
    bits = np.unpackbits(np.asarray(mask, dtype="<u8").view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
    r, b = np.nonzero(bits)
    return np.sort(np.asarray(word, dtype=np.int64)[r] * 64 + b)


class RingConsumer:
    """Reads a BPF ring buffer map directly through mmap, as libbpf does, without callbacks."""

    def __init__(self, map_fd: int, size: int):
        self.page = mmap.PAGESIZE
        if size <= 0 or size & (size - 1) or size % self.page:
            raise ValueError(f"ring size {size} is not a power-of-two multiple of the page size")
        self.size = size
        self.mask = size - 1
        self._cons = mmap.mmap(map_fd, self.page, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        # Producer page, then the data area mapped twice: a record that wraps is contiguous.
        self._prod = mmap.mmap(map_fd, self.page + 2 * size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ,
                               offset=self.page)
        self._prod_pos = np.frombuffer(self._prod, dtype="<u8", count=1)
        self._cons_pos = np.frombuffer(self._cons, dtype="<u8", count=1)
        self.consumed = 0

    def read(self, max_bytes: int | None = None) -> bytes:
        """Take the committed records (whole 96-byte slots) and release their space."""
        cap = self.size if max_bytes is None else min(max_bytes, self.size)
        out = np.empty(cap - cap % STRIDE, np.uint8)
        return out[: self.read_into(out, 0) * STRIDE].tobytes()

    def read_into(self, out: np.ndarray, pos: int) -> int:
        """Copy the committed records into ``out[pos:]`` (as many as fit) and release their space.

        One copy out of the ring into a buffer the caller reuses (a fresh one would page-fault on
        every write).  Returns the records taken.
        """
        max_bytes = len(out) - pos
        cons = int(self._cons_pos[0])
        prod = int(self._prod_pos[0])
        avail = prod - cons
        if avail <= 0:
            return 0
        if avail % STRIDE:
            # Another record size in the ring means a program/decoder mismatch: stop rather than misparse.
            raise HintscopeError(f"BPF ring buffer holds {avail} unread bytes, not a multiple of {STRIDE}: "
                                 "host.bpf.c and decode.py disagree on the record size")
        avail = min(avail, max_bytes - max_bytes % STRIDE)
        if avail <= 0:
            return 0
        start = self.page + (cons & self.mask)
        # Headers first (strided loads, in order), then the data: a committed header guarantees
        # its record's bytes were written before it.
        lens = np.frombuffer(self._prod, dtype="<u4", count=avail // 4, offset=start)[:: STRIDE // 4].copy()
        busy = np.flatnonzero(lens & BUSY)
        n = int(busy[0]) if len(busy) else len(lens)
        if n == 0:
            return 0
        out[pos:pos + n * STRIDE] = np.frombuffer(self._prod, np.uint8, count=n * STRIDE, offset=start)
        self._cons_pos[0] = cons + n * STRIDE
        self.consumed += n
        return n

    def close(self) -> None:
        del self._prod_pos, self._cons_pos
        self._prod.close()
        self._cons.close()


def synthetic_records(kind: str, n: int, rng: np.random.Generator | None = None) -> bytes:
    """Ring slots as host.bpf.c writes them; used by the decode tests and the decode-rate benchmark."""
    rng = rng or np.random.default_rng(0)
    dtype = {"ioctl": IOCTL_DTYPE, "bitmap": BITMAP_DTYPE, "ring_push": RING_DTYPE, "qemu": QEMU_DTYPE}[kind]
    a = np.zeros(n, dtype)
    a["len"] = PAYLOAD
    a["ts"] = np.arange(n, dtype=np.uint64) * 1000 + 10**12
    a["tid"] = 4242
    if kind == "ioctl":
        a["type"] = REC_IOCTL
        a["cmd"] = K.GET_DIRTY_LOG
        a["seq"] = np.arange(n)
        a["slot"] = 1
        a["a2"] = 3
        a["a3"] = 4096
    elif kind == "bitmap":
        a["type"] = REC_BITMAP
        a["aux"] = 1 | (8 << 8)
        a["tid"] = np.arange(n) // 16
        a["base_word"] = (np.arange(n) % 16) * 8
        a["mask"] = rng.integers(0, 2**63, size=(n, 8), dtype=np.uint64) * (rng.random((n, 8)) < 0.5)
    elif kind == "ring_push":
        a["type"] = REC_RING_PUSH
        a["offset"] = np.arange(n)
    else:
        a["type"] = REC_QEMU
        a["aux"] = 1
        a["a0"] = 0x7F0000000000 + np.arange(n, dtype=np.uint64) * 4096
        a["a1"] = 4 << 20
    return a.tobytes()


def bench(n: int = 200_000) -> dict[str, dict[str, float]]:
    """Records/s for decode alone, decode + BundleWriter.append, and + the Parquet flush."""
    import tempfile
    import time

    from hintscope.bundle import BundleWriter

    out = {}
    for kind in ("ioctl", "bitmap", "ring_push", "qemu"):
        buf = synthetic_records(kind, n)
        with tempfile.TemporaryDirectory() as d:
            w = BundleWriter(os.path.join(d, "b"), producer="bench")
            t0 = time.perf_counter()
            dec = decode(buf)
            t1 = time.perf_counter()
            for table, cols in dec.tables.items():
                w.append(table, cols)
            t2 = time.perf_counter()
            w.flush()
            t3 = time.perf_counter()
        out[kind] = {"decode": n / (t1 - t0), "append": n / (t2 - t0), "flush": n / (t3 - t0),
                     "rows": sum(dec.rows(t) for t in dec.tables)}
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="decode-rate benchmark on synthetic ring records")
    ap.add_argument("-n", type=int, default=200_000, help="records per kind")
    a = ap.parse_args()
    for kind, r in bench(a.n).items():
        print(f"{kind:10s} decode {r['decode'] / 1e6:5.2f} M rec/s   +append {r['append'] / 1e6:5.2f}   "
              f"+parquet {r['flush'] / 1e6:5.2f}   ({r['rows']} rows)")
