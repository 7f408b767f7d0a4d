"""Dirty bitmaps -> pages: expand ``bitmap_words`` into one row per page (numpy unpackbits).

op=get rows give the pages KVM_GET_DIRTY_LOG reported dirty (page = word*64 + bit of the slot);
op=clear rows give the pages KVM_CLEAR_DIRTY_LOG re-armed (page = first_page + word*64 + bit,
first_page from the CLEAR ioctl with the same ``seq``).  Dirty-ring pushes are already one row
per page.  ``gfn`` comes from the memslot table at the event's time (-1 when no slot is known).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hintscope.analysis import memslots as ms

PAGE_COLS = ["ts_ns", "seq", "slot", "page", "gfn"]


def expand_words(word: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row index, page) for every set bit: bit b of word w is page w*64 + b (little-endian words)."""
    mask = np.ascontiguousarray(np.asarray(mask, dtype=np.uint64))
    word = np.asarray(word, dtype=np.int64)
    if not len(mask):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    bits = np.unpackbits(mask.astype("<u8").view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
    row, bit = np.nonzero(bits)
    return row.astype(np.int64), word[row] * 64 + bit.astype(np.int64)


def unrun(words: pd.DataFrame) -> pd.DataFrame:
    """``bitmap_words`` with every run (``nwords`` > 1, schema 2) split into one row per word."""
    if not len(words) or "nwords" not in words or (words["nwords"].to_numpy() == 1).all():
        return words
    n = np.clip(words["nwords"].to_numpy(np.int64), 1, None)
    out = words.loc[words.index.repeat(n)].reset_index(drop=True)
    start = np.cumsum(n) - n
    out["word"] = out["word"].to_numpy(np.int64) + (np.arange(int(n.sum())) - np.repeat(start, n))
    out["nwords"] = 1
    return out


def popcount(mask: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.asarray(mask, dtype=np.uint64)).astype(np.int64)


def run_popcount(words: pd.DataFrame) -> np.ndarray:
    """Pages per ``bitmap_words`` row: popcount(mask) times the run length."""
    n = words["nwords"].to_numpy(np.int64) if "nwords" in words else 1
    return popcount(words["mask"].to_numpy()) * n


def _empty() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64") for c in PAGE_COLS})


def bitmap_pages(words: pd.DataFrame, op: str, iv: pd.DataFrame, ioctls: pd.DataFrame | None = None) -> pd.DataFrame:
    """Pages of ``bitmap_words`` rows with ``op`` ('get' or 'clear'): ``PAGE_COLS`` (slot as KVM passes it)."""
    w = unrun(words[words["op"] == op])
    if not len(w):
        return _empty()
    row, page = expand_words(w["word"].to_numpy(), w["mask"].to_numpy())
    ts = w["ts_ns"].to_numpy(np.int64)[row]
    seq = w["seq"].to_numpy(np.int64)[row]
    slot = w["slot"].to_numpy(np.int64)[row]
    if op == "clear":
        first = np.zeros(len(page), np.int64)
        if ioctls is not None and len(ioctls):
            c = ioctls[ioctls["name"] == "CLEAR_DIRTY_LOG"].drop_duplicates("seq")
            fp = pd.Series(c["first_page"].to_numpy(np.int64), index=c["seq"].to_numpy(np.int64))
            first = fp.reindex(seq).fillna(0).to_numpy(np.int64)
        page = page + first
    gfn = ms.slot_page_to_gfn(slot, page, ts, iv)
    # copy=False: the arrays are fresh; pandas 3 would otherwise copy 16 M-row columns again.
    return pd.DataFrame({"ts_ns": ts, "seq": seq, "slot": slot, "page": page, "gfn": gfn}, copy=False)


def ring_pages(ring_push: pd.DataFrame, iv: pd.DataFrame) -> pd.DataFrame:
    """Dirty-ring pushes as pages (seq = -1)."""
    if not len(ring_push):
        return _empty()
    ts = ring_push["ts_ns"].to_numpy(np.int64)
    slot = ring_push["slot"].to_numpy(np.int64)
    page = ring_push["offset"].to_numpy().astype(np.int64)
    gfn = ms.slot_page_to_gfn(slot, page, ts, iv)
    return pd.DataFrame({"ts_ns": ts, "seq": np.full(len(ts), -1, np.int64), "slot": slot, "page": page, "gfn": gfn})


def word_ops(words: pd.DataFrame, op: str, iv: pd.DataFrame, index, ioctls: pd.DataFrame | None = None):
    """``bitmap_words`` rows of ``op`` as compact page ops (pagestate.Ops, x = ioctl seq), no per-page rows.

    A row (a run of ``nwords`` equal words) inside one memslot becomes one op: a range when every
    bit is set (a fully dirty 64 GiB slot is one op), else the word pattern with its run length.
    Rows that cross a slot's end or no slot maps are expanded page by page (``bitmap_pages``).
    """
    from hintscope.analysis import pagestate as ps

    w = words[words["op"] == op]
    if not len(w):
        return ps.Ops.empty()
    ts = w["ts_ns"].to_numpy(np.int64)
    seq = w["seq"].to_numpy(np.int64)
    slot = w["slot"].to_numpy(np.int64)
    nw = np.clip(w["nwords"].to_numpy(np.int64), 1, None) if "nwords" in w else np.ones(len(w), np.int64)
    mask = w["mask"].to_numpy().astype(np.uint64)
    first = np.zeros(len(w), np.int64)
    if op == "clear" and ioctls is not None and len(ioctls):
        c = ioctls[ioctls["name"] == "CLEAR_DIRTY_LOG"].drop_duplicates("seq")
        fp = pd.Series(c["first_page"].to_numpy(np.int64), index=c["seq"].to_numpy(np.int64))
        first = fp.reindex(seq).fillna(0).to_numpy(np.int64)
    p0 = first + w["word"].to_numpy(np.int64) * 64
    span = nw * 64
    g_a = ms.slot_page_to_gfn(slot, p0, ts, iv)
    g_b = ms.slot_page_to_gfn(slot, p0 + span - 1, ts, iv)
    d_a, d_b = index.to_idx(g_a), index.to_idx(g_b)
    ok = (g_a >= 0) & (g_b == g_a + span - 1) & (d_a >= 0) & (d_b == d_a + span - 1)
    parts = [_merge_full(ps.Ops(ts[ok], d_a[ok], span[ok], mask[ok], seq[ok]))]
    if not ok.all():
        bad = w[~ok]
        pg = bitmap_pages(bad, op, iv, ioctls)
        sq = pg["seq"].to_numpy(np.int64)
        parts.append(ps.compress(sq, index.to_idx(pg["gfn"].to_numpy(np.int64)), pg["ts_ns"].to_numpy(np.int64), sq))
    return ps.concat(parts)


def _merge_full(ops):
    """Consecutive all-ones words of one ioctl as one range (schema 1 writes a fully dirty 64 GiB slot
    as 262,144 rows; as one op it is one slice in every sweep)."""
    from hintscope.analysis import pagestate as ps

    if len(ops) < 2:
        return ops
    full = ops.mask == ps.ALL
    nxt = np.r_[False, full[1:] & full[:-1] & (ops.t[1:] == ops.t[:-1]) & (ops.x[1:] == ops.x[:-1]) &
                (ops.g0[1:] == ops.g0[:-1] + ops.n[:-1])]
    if not nxt.any():
        return ops
    start = np.flatnonzero(~nxt)
    n = np.add.reduceat(ops.n, start)
    return ps.Ops(ops.t[start], ops.g0[start], n, ops.mask[start], ops.x[start])
