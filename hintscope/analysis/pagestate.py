"""Per-page questions answered from compact capture data: one time-ordered sweep over page ops.

A capture's page-level facts arrive compact: a KVM_GET/CLEAR_DIRTY_LOG is a few ``bitmap_words``
rows (runs of equal words, schema 2), a tap send is a run of contiguous pages, a hint apply is one
HVA range.  Expanding them to one row per page costs 30+ bytes per page and event (issue 14: a
256 GiB guest needed ~32 GB).  Here every family stays a table of **ops** (time, first page, page
count, bit pattern) and the questions the checks ask are answered by one sweep in time order that
keeps dense per-page arrays of "last time" (one int64 per guest page and family):

* ``S``  last send of each page, ``A`` last apply entry, ``H`` last harvest (GET bit or ring push);
* ``C``  last KVM_CLEAR_DIRTY_LOG re-arm, ``Rb`` the re-arm before the last harvest (manual: last
  CLEAR before it; legacy GET: the harvest before it; ring: the latest push it collected);
* at each apply's return the c' exposure of its pages is read off ``C``, the harvest at that
  CLEAR, and ``S`` (rearm.py), and at its entry the send before it (hints.py "late").

Pages are addressed by a dense index over the union of the memslot GPA ranges (:class:`GfnIndex`),
so a 64-bit BAR far above RAM costs nothing.  Within one instant the order is: sends, apply
entries, harvests, CLEARs, apply returns; that is the order of the per-page joins this replaces
(tests/oracle_perpage, checked by tests/test_analysis_oracle.py on 1 GiB simulated guests).
Expansion to per-page index arrays happens only inside one batch of ops and at most
``CHUNK_PAGES`` pages at a time; a contiguous range of ``SLICE_MIN`` pages or more is a slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from hintscope.analysis import memslots as ms

NONE = np.iinfo(np.int64).min       # "never" in the last-time arrays (compares below every time)
ALL = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
SLICE_MIN = 256                     # a contiguous op this long is updated as one slice, not expanded
CHUNK_PAGES = 1 << 22               # expansion bound per step (32 MiB of int64 per array)
MAX_DENSE_PAGES = 1 << 27           # 512 GiB of guest pages: memslot ranges beyond this get no per-page state


# ------------------------------------------------------------------------------------- gfn index
@dataclass
class GfnIndex:
    """Dense page index over the union of memslot GPA ranges: gfn <-> 0..size-1."""

    start: np.ndarray       # sorted first gfn of each merged range
    base: np.ndarray        # dense index of each range's first gfn
    length: np.ndarray
    capped: int = 0         # memslot pages left out (beyond MAX_DENSE_PAGES)

    @property
    def size(self) -> int:
        return int(self.base[-1] + self.length[-1]) if len(self.base) else 0

    @classmethod
    def from_intervals(cls, iv: pd.DataFrame) -> "GfnIndex":
        if not len(iv):
            z = np.zeros(0, np.int64)
            return cls(z, z, z)
        lo = iv["gpa"].to_numpy(np.int64) >> ms.PAGE_SHIFT
        hi = lo + (iv["size"].to_numpy(np.int64) >> ms.PAGE_SHIFT)
        o = np.argsort(lo, kind="stable")
        lo, hi = lo[o], hi[o]
        # merge overlapping or touching ranges (slot versions, aliases of the same GPA in as_id 1)
        reach = np.maximum.accumulate(hi)
        new = np.r_[True, lo[1:] > reach[:-1]]
        grp = np.cumsum(new) - 1
        s = lo[new]
        e = np.maximum.reduceat(hi, np.flatnonzero(new)) if len(lo) else hi
        ln = e - s
        ln = np.where(np.cumsum(ln) <= MAX_DENSE_PAGES, ln, 0)
        del grp
        out = cls(s, np.cumsum(ln) - ln, ln)
        out.capped = int((e - s).sum() - ln.sum())
        return out

    def to_idx(self, gfn: np.ndarray) -> np.ndarray:
        """Dense index per gfn, -1 where no range holds it."""
        g = np.asarray(gfn, np.int64)
        if not len(self.start):
            return np.full(g.shape, -1, np.int64)
        if len(self.start) <= 4:        # a VM has a handful of RAM ranges: a few masked passes beat a search
            out = np.full(g.shape, -1, np.int64)
            for st, b, ln in zip(self.start.tolist(), self.base.tolist(), self.length.tolist()):
                off = g - st
                np.copyto(out, off + b, where=(off >= 0) & (off < ln))
            return out
        k = np.searchsorted(self.start, g, side="right") - 1
        kk = np.maximum(k, 0)
        ok = (k >= 0) & (g - self.start[kk] < self.length[kk]) & (g >= 0)
        return np.where(ok, self.base[kk] + g - self.start[kk], -1)

    def to_gfn(self, idx: np.ndarray) -> np.ndarray:
        i = np.asarray(idx, np.int64)
        if not len(self.base):
            return np.full(i.shape, -1, np.int64)
        k = np.searchsorted(self.base, i, side="right") - 1
        return self.start[np.maximum(k, 0)] + i - self.base[np.maximum(k, 0)]


# ----------------------------------------------------------------------------------------- ops
@dataclass
class Ops:
    """One family of page ops, sorted by time: pages ``g0 .. g0+n-1`` (dense index) at time ``t``.

    ``mask`` != ALL: a run of ``n // 64`` bitmap words all equal to ``mask`` (bit b of word j is
    page g0 + 64 j + b).  Sends may carry ``t1``/``i0``/``npar``: page i of the op is page
    ``i0 + i`` of a tap run of ``npar`` pages stamped from ``t`` to ``t1`` (interpolated as the
    per-page code did).  ``x``: per-op payload (apply number, CLEAR thread, push time...).
    """

    t: np.ndarray
    g0: np.ndarray
    n: np.ndarray
    mask: np.ndarray
    x: np.ndarray
    t1: np.ndarray | None = None
    i0: np.ndarray | None = None
    npar: np.ndarray | None = None
    tp: np.ndarray | None = None        # run start time (page times are interpolated from tp)

    def __len__(self) -> int:
        return len(self.t)

    @property
    def pages(self) -> int:
        """Page events (set bits times run length for word ops)."""
        if not len(self.t):
            return 0
        bits = np.where(self.mask == ALL, 64, np.bitwise_count(self.mask).astype(np.int64))
        return int((self.n // 64 * bits + np.where(self.mask == ALL, self.n % 64, 0)).sum())

    def take(self, sel) -> "Ops":
        return Ops(*(None if a is None else a[sel] for a in (self.t, self.g0, self.n, self.mask, self.x,
                                                            self.t1, self.i0, self.npar, self.tp)))

    @classmethod
    def empty(cls) -> "Ops":
        z = np.zeros(0, np.int64)
        return cls(z, z, z, np.zeros(0, np.uint64), z)

    @classmethod
    def ranges(cls, t, g0, n, x=None) -> "Ops":
        t = np.asarray(t, np.int64)
        x = np.zeros(len(t), np.int64) if x is None else np.asarray(x, np.int64)
        g0, n = np.asarray(g0, np.int64), np.asarray(n, np.int64)
        if len(t) > 1 and not (t[1:] >= t[:-1]).all():
            o = np.argsort(t, kind="stable")
            t, g0, n, x = t[o], g0[o], n[o], x[o]
        if len(n) and (n == 1).all():
            n = np.broadcast_to(np.int64(1), len(t))       # one page per op (ring pushes): no column
        return cls(t, g0, n, np.broadcast_to(ALL, len(t)), x)


def concat(parts: list[Ops]) -> Ops:
    parts = [p for p in parts if len(p)]
    if not parts:
        return Ops.empty()
    if len(parts) == 1 and (parts[0].t[1:] >= parts[0].t[:-1]).all():
        return parts[0]
    run = any(p.t1 is not None for p in parts)

    def col(name):
        if name in ("t1", "i0", "npar", "tp") and not run:
            return None
        cols = []
        for p in parts:
            v = getattr(p, name)
            if v is None:
                v = {"t1": p.t, "tp": p.t, "i0": np.zeros(len(p), np.int64), "npar": p.n}[name]
            cols.append(v)
        return np.concatenate(cols)
    out = Ops(*(col(c) for c in ("t", "g0", "n", "mask", "x", "t1", "i0", "npar", "tp")))
    if len(out) > 1 and not (out.t[1:] >= out.t[:-1]).all():
        out = out.take(np.argsort(out.t, kind="stable"))
    return out


def compress(idx: np.ndarray, page: np.ndarray, t: np.ndarray, x: np.ndarray | None = None) -> Ops:
    """Per-page rows (op number, dense page, time) -> range ops of consecutive pages (page < 0 dropped)."""
    keep = page >= 0
    idx, page, t = idx[keep], page[keep], t[keep]
    xx = np.zeros(len(idx), np.int64) if x is None else x[keep]
    if not len(idx):
        return Ops.empty()
    brk = np.r_[True, (idx[1:] != idx[:-1]) | (page[1:] != page[:-1] + 1) | (t[1:] != t[:-1])]
    st = np.flatnonzero(brk)
    n = np.diff(np.r_[st, len(idx)])
    return Ops.ranges(t[st], page[st], n, xx[st])


def page_times(ops: Ops, op: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Time of page k (0-based in the op) of each op, interpolated along tap runs."""
    if ops.t1 is None:
        return ops.t[op]
    t0, t1 = ops.tp[op], ops.t1[op]
    i = ops.i0[op] + k
    interp = t0 + ((t1 - t0) * (i / np.maximum(ops.npar[op] - 1, 1))).astype(np.int64)
    return np.where(t1 == t0, ops.t[op], interp)


def pieces(ops: Ops, idx: np.ndarray, chunk: int = CHUNK_PAGES):
    """Yield (sel, t, op) for the pages of ops ``idx``: sel a slice (one long range at one time)
    or an int64 page array with per-page times and op numbers; bounded by ``chunk`` pages."""
    if not len(idx):
        return
    n = ops.n[idx]
    full = ops.mask[idx] == ALL
    # a lone range op is a slice whatever its length (the sweep's common case: one send between applies)
    big = full & ((n >= SLICE_MIN) | (len(idx) == 1))
    for i in idx[big]:
        sl = slice(int(ops.g0[i]), int(ops.g0[i] + ops.n[i]))
        if ops.t1 is None or ops.t1[i] == ops.tp[i]:
            yield sl, int(ops.t[i]), np.array([i])
        else:       # a tap run: one interpolated time per page, still a slice (no index arrays)
            t0, t1, i0, npar = int(ops.tp[i]), int(ops.t1[i]), int(ops.i0[i]), int(ops.npar[i])
            k = np.arange(i0, i0 + int(ops.n[i]), dtype=np.int64)
            yield sl, t0 + ((t1 - t0) * (k / max(npar - 1, 1))).astype(np.int64), np.array([i])
    rest = idx[~big]
    if not len(rest):
        return
    nr = ops.n[rest]
    if int(nr.sum()) <= chunk:
        yield _expand(ops, rest)
        return
    grp = (np.cumsum(nr) - nr) // chunk
    b = np.concatenate([np.flatnonzero(np.concatenate([[True], grp[1:] != grp[:-1]])), [len(rest)]])
    for a, e in zip(b[:-1].tolist(), b[1:].tolist()):
        yield _expand(ops, rest[a:e])


def _expand(ops: Ops, part: np.ndarray):
    n = ops.n[part]
    full = ops.mask[part] == ALL
    if (n == 1).all() and full.all():       # one page per op (ring pushes, per-page sends): no expansion
        return ops.g0[part], ops.t[part], part
    out_g, out_t, out_o = [], [], []
    r = part[full]
    if len(r):
        n = ops.n[r]
        op = np.repeat(r, n)
        k = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
        out_g.append(ops.g0[op] + k)
        out_t.append(page_times(ops, op, k))
        out_o.append(op)
    w = part[~full]
    if len(w):
        nw = ops.n[w] // 64
        wop = np.repeat(w, nw)
        j = np.arange(int(nw.sum()), dtype=np.int64) - np.repeat(np.cumsum(nw) - nw, nw)
        bits = np.unpackbits(ops.mask[wop].astype("<u8").view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
        row, bit = np.nonzero(bits)
        op = wop[row]
        out_g.append(ops.g0[op] + 64 * j[row] + bit)
        out_t.append(ops.t[op])
        out_o.append(op)
    if len(out_g) == 1:
        return out_g[0], out_t[0], out_o[0]
    g, t, o = np.concatenate(out_g), np.concatenate(out_t), np.concatenate(out_o)
    s = np.argsort(o, kind="stable")
    return g[s], t[s], o[s]


# --------------------------------------------------------------------------------------- sweep
@dataclass
class Family:
    """A family in a sweep: its ops, the priority among ops at the same instant (lower first), the
    handler ``fn(sel, t, op)``, and whether a batch may mix instants (handlers that only raise maxima
    or only read)."""

    name: str
    ops: Ops
    prio: int
    fn: Callable
    mixes_times: bool = True


def split_runs(sends: Ops, other_t: np.ndarray) -> Ops:
    """Tap runs cut where another op's instant falls inside them, so that every op of the result
    lies strictly between two other instants (ties go to the send: it sorts first)."""
    if sends.t1 is None or not len(sends):
        return sends
    E = np.unique(other_t)
    a = np.searchsorted(E, sends.t, side="right")
    b = np.searchsorted(E, sends.t1, side="right")
    inside = np.flatnonzero((b > a) & (sends.n > 1))
    if not len(inside):
        return sends
    keep = np.ones(len(sends), bool)
    keep[inside] = False
    new = []
    for i in inside:
        n = int(sends.n[i])
        k = np.arange(n, dtype=np.int64)
        tt = page_times(sends, np.full(n, i), k)
        cuts = np.searchsorted(tt, E[a[i]:b[i]], side="right")
        cuts = np.unique(cuts[(cuts > 0) & (cuts < n)])
        st = np.r_[0, cuts]
        ln = np.diff(np.r_[st, n])
        m = len(st)
        new.append(Ops(tt[st], sends.g0[i] + st, ln, np.full(m, ALL, np.uint64), np.full(m, sends.x[i]),
                       np.full(m, sends.t1[i]), sends.i0[i] + st, np.full(m, sends.npar[i]), np.full(m, sends.tp[i])))
    return concat([sends.take(keep), *new])


def sweep(families: list[Family]) -> None:
    """Run every family's handler over its ops in time order (instant ties by ``prio``)."""
    fams = [f for f in families if len(f.ops)]
    if not fams:
        return
    # families concatenated by priority, each already in time order: a stable sort on time alone
    # keeps (priority, op) order at equal times, and merges the sorted runs in O(n log families)
    fams = sorted(fams, key=lambda f: f.prio)
    T = np.concatenate([f.ops.t for f in fams])
    F = np.concatenate([np.full(len(f.ops), k, np.int8 if len(fams) < 128 else np.int64) for k, f in enumerate(fams)])
    idt = np.int32 if max(len(f.ops) for f in fams) < 2**31 else np.int64
    I = np.concatenate([np.arange(len(f.ops), dtype=idt) for f in fams])
    o = np.argsort(T, kind="stable")
    T, F, I = T[o], F[o], I[o]
    del o
    mixes = np.array([f.mixes_times for f in fams])
    brk = np.r_[True, (F[1:] != F[:-1]) | ((T[1:] != T[:-1]) & ~mixes[F[1:]])]
    st = np.flatnonzero(brk)
    en = np.r_[st[1:], len(T)]
    for a, b in zip(st.tolist(), en.tolist()):
        fam = fams[F[a]]
        for sel, t, op in pieces(fam.ops, I[a:b]):
            fam.fn(sel, t, op)


def raise_max(arr: np.ndarray, sel, t) -> None:
    """arr[sel] = max(arr[sel], t), duplicates in sel included."""
    if isinstance(sel, slice):
        np.maximum(arr[sel], t, out=arr[sel])
    else:
        np.maximum.at(arr, sel, t)


def last_times(ops: Ops, size: int) -> np.ndarray:
    """Latest time per dense page over the ops (NONE where none)."""
    out = np.full(size, NONE, np.int64)
    if len(ops):
        for sel, t, _ in pieces(ops, np.arange(len(ops))):
            raise_max(out, sel, t)
    return out


@dataclass
class PageMarks:
    """A set of pages as a dense boolean array over a :class:`GfnIndex` (what a finding names)."""

    index: GfnIndex
    mask: np.ndarray
    _gfns: np.ndarray | None = field(default=None, repr=False)

    def gfns(self, cap: int | None = None) -> np.ndarray:
        i = np.flatnonzero(self.mask)
        if cap is not None:
            i = i[:cap]
        return self.index.to_gfn(i)

    def __len__(self) -> int:
        return int(np.count_nonzero(self.mask))

    def summary(self, cap: int) -> tuple[int, int, int, np.ndarray]:
        """(count, first gfn, last gfn, the first ``cap`` gfns): dense order is gfn order."""
        n = len(self)
        if not n:
            return 0, -1, -1, np.zeros(0, np.int64)
        last = int(self.index.to_gfn(np.array([np.flatnonzero(self.mask)[-1]]))[0])
        head = self.gfns(cap)
        return n, int(head[0]), last, head


def page_times_between(ops: Ops, lo: int, hi: int) -> np.ndarray:
    """Distinct page times in (lo, hi), sorted (tap runs give one interpolated time per page)."""
    if not len(ops):
        return np.zeros(0, np.int64)
    t1 = ops.t if ops.t1 is None else np.maximum(ops.t1, ops.t)
    sel = np.flatnonzero((t1 > lo) & (ops.t < hi))
    out = []
    for _, t, _ in pieces(ops, sel):
        t = np.atleast_1d(np.asarray(t, np.int64))
        out.append(distinct(t[(t > lo) & (t < hi)]))
    return distinct(np.concatenate(out)) if out else np.zeros(0, np.int64)


def distinct(x: np.ndarray) -> np.ndarray:
    """Sorted distinct values (sort + mask: several times faster than np.unique's hash path on int64)."""
    g = np.sort(np.asarray(x, np.int64))
    return g[np.r_[True, g[1:] != g[:-1]]] if len(g) else g
