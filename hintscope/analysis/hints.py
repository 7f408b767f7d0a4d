"""Skipped free page accounting (protocol.md §4 (a)), per host epoch and in total.

Host epoch k = [AFTER_k, BEFORE_{k+1}) (the sync table's ``epoch`` column; without notifier
probes, from the end of sync k's fetch window to the start of the next one).  For every 4 KiB
page of every ``hint_apply`` (HVA -> GPA through the memslots at the apply's time):

* skipped: no send of the page after the apply (to the end of the capture);
* late (wasted hint): the page was already sent between the start of its epoch and the apply;
* resent: hinted, then sent again after the apply (the guest reused and dirtied it, or the
  hint came too late to matter);
* bytes saved: skipped pages x 4096, an upper bound (a skipped page might have gone as a
  zero-page flag of a few bytes).

Sends come from, best first, ``page_send`` uprobes, QEMU's ``ram_save_page`` trace, or an
estimate from later harvests; ``source`` and ``source_caveat`` say which and what it misses.
Guest-side totals (``guest_hints``) are per cmd id, as the guest saw them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from hintscope.analysis.context import SEND_SOURCES, Context
from hintscope.analysis.memslots import PAGE
from hintscope.analysis.syncs import sync_table, windows
from hintscope.bundle import Bundle
from hintscope.protocol import CMD_ID_MIN

EPOCH_COLUMNS = ["epoch", "start_ns", "end_ns", "applies", "applied_pages", "skipped_pages", "late_pages",
                 "resent_pages", "bytes_saved"]
_BIG = np.iinfo(np.int64).max


def epochs(syncs: pd.DataFrame, end_ns: int) -> pd.DataFrame:
    """Epoch k: start (AFTER_k, else end of sync k's window) and end (BEFORE_{k+1}, else next window start)."""
    st, en = windows(syncs) if len(syncs) else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    after = syncs["after_ns"].to_numpy(np.int64) if len(syncs) else st
    before = syncs["before_ns"].to_numpy(np.int64) if len(syncs) else st
    start = np.where(after >= 0, after, en)
    nb = np.r_[before[1:], -1]
    # Clamped: a hostile ts_ns of 2**63-1 must not overflow the sentinel.
    ns = np.r_[st[1:], min(max(end_ns, int(en.max()) if len(en) else 0), _BIG - 1) + 1]
    end = np.where(nb >= 0, nb, ns)
    ep = syncs["epoch"].to_numpy(np.int64) if len(syncs) else st
    keep = ep > 0
    return pd.DataFrame({"epoch": ep[keep], "start_ns": start[keep], "end_ns": end[keep]})


def _epoch_of(t: np.ndarray, ep: pd.DataFrame) -> np.ndarray:
    if not len(ep):
        return np.full(len(t), -1, np.int64)
    st = ep["start_ns"].to_numpy(np.int64)
    en = ep["end_ns"].to_numpy(np.int64)
    i = np.searchsorted(st, t, side="right") - 1
    ok = (i >= 0) & (t < en[np.maximum(i, 0)])
    return np.where(ok, ep["epoch"].to_numpy(np.int64)[np.maximum(i, 0)], -1)


def epoch_start_of(t: np.ndarray, ep: pd.DataFrame) -> np.ndarray:
    """Per apply time: the start of its epoch (BIG outside every epoch)."""
    e = _epoch_of(t, ep)
    ep_ids = ep["epoch"].to_numpy(np.int64)
    pos = np.searchsorted(ep_ids, e)  # epochs are ascending
    found = (pos < len(ep_ids)) & (ep_ids[np.minimum(pos, max(len(ep_ids) - 1, 0))] == e) if len(ep_ids) else \
        np.zeros(len(e), bool)
    return np.where(found, ep["start_ns"].to_numpy(np.int64)[np.minimum(pos, max(len(ep_ids) - 1, 0))]
                    if len(ep_ids) else _BIG, _BIG)


def page_counts(c: Context, ep: pd.DataFrame) -> tuple[dict[str, np.ndarray], dict[str, int], int]:
    """Distinct hinted pages per epoch (keys of ``ep`` then -1) and in total: applied, skipped, late,
    resent; and the number of (apply, page) events.

    From the compact apply ranges and the per-page state of one sweep (pagefacts): skipped = no send
    of the page after the apply; late = sent between its epoch's start and the apply (-1 without
    sends); with no send source, a later harvest stands for a later send (an estimate).
    """
    from hintscope.analysis import pagefacts, pagestate as psm

    st = pagefacts.page_state(c)
    aops = st.applies
    keys = np.r_[ep["epoch"].to_numpy(np.int64), -1]
    names = ("applied", "skipped", "late", "resent")
    per = {k: np.zeros(len(keys), np.int64) for k in names}
    n = st.index.size
    tot = {k: np.zeros(n, bool) for k in names}
    if not len(aops):
        return per, {k: 0 for k in names}, 0
    sends = c.send_source != "none"
    last_of = (lambda g: st.S[g]) if sends else (lambda g: st.ns(st.H[g]))
    a_t = c.hint_applies["ts_ns"].to_numpy(np.int64)
    e_app = _epoch_of(a_t, ep)
    kpos = np.searchsorted(keys[:-1], e_app)
    kpos = np.where((kpos < len(keys) - 1) & (keys[np.minimum(kpos, len(keys) - 1)] == e_app), kpos, len(keys) - 1)
    op_k = kpos[aops.x]
    # chunks of whole epochs: a page counted once per epoch needs all its epoch's applies together
    order = np.argsort(op_k, kind="stable")
    ks = op_k[order]
    cum = np.cumsum(aops.n[order])
    edge = np.r_[np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]]), len(order)]
    events = 0
    sizes = np.diff(np.r_[0, cum[edge[1:] - 1]])
    groups, acc, g0 = [], 0, 0
    for j, sz in enumerate(sizes.tolist()):       # one step per epoch, not per apply
        acc += sz
        if acc >= psm.CHUNK_PAGES or j == len(sizes) - 1:
            groups.append((int(edge[g0]), int(edge[j + 1])))
            acc, g0 = 0, j + 1
    for a, b in groups:
        for sel, t, op in psm.pieces(aops, order[a:b], chunk=1 << 62):
            g = np.arange(sel.start, sel.stop, dtype=np.int64) if isinstance(sel, slice) else sel
            op = np.full(len(g), op[0]) if isinstance(sel, slice) else op
            after = last_of(g) > aops.t[op]
            late = st.late[st.off[op] + (g - aops.g0[op])] if c.send_source != "none" else np.zeros(len(g), bool)
            k = op_k[op]
            events += len(g)
            for name, m in (("applied", None), ("skipped", ~after), ("late", late), ("resent", after)):
                gg, kk = (g, k) if m is None else (g[m], k[m])
                if not len(gg):
                    continue
                tot[name][gg] = True
                u = psm.distinct(kk * n + gg)
                per[name] += np.bincount(u // n, minlength=len(keys))[:len(keys)]
    return per, {k: int(np.count_nonzero(v)) for k, v in tot.items()}, events


def accounting(b: Bundle | Context, syncs: pd.DataFrame | None = None) -> dict[str, Any]:
    """Per-epoch table (``EPOCH_COLUMNS``), totals, and the send source used."""
    c = b if isinstance(b, Context) else Context(b)
    s = sync_table(c) if syncs is None else syncs
    ep = epochs(s, c.end_ns)
    src = c.send_source
    per, tot, events = page_counts(c, ep)
    a = c.hint_applies
    a_ep = _epoch_of(a["ts_ns"].to_numpy(np.int64), ep)
    late_known = src != "none"
    per_epoch = _per_epoch(ep, per, a_ep, late_known)
    captured = applies_captured(c)
    if not captured:
        # Zero applies would read as "hinting skipped nothing": say instead that nobody looked.
        per_epoch = per_epoch.iloc[0:0]
    skipped_total = tot["skipped"]
    totals = {
        "applies": int(len(a)),
        "applied_bytes": int(a["len"].sum()) if len(a) else 0,
        "applied_pages": tot["applied"],
        "applied_page_events": events,
        "skipped_pages": skipped_total,
        "late_pages": tot["late"] if late_known else None,
        "resent_pages": tot["resent"],
        "bytes_saved_upper_bound": skipped_total * PAGE,
        "applies_outside_epochs": int((a_ep < 0).sum()),
    }
    if not captured:
        totals = {k: None for k in totals}
    return {"per_epoch": per_epoch, "totals": totals, "source": src, "source_caveat": SEND_SOURCES[src],
            "applies_captured": captured, "guest": guest_hints(c),
            "matching": match_guest_host(c, s) if captured else None}


def _per_epoch(ep: pd.DataFrame, per: dict[str, np.ndarray], a_ep: np.ndarray, late_known: bool) -> pd.DataFrame:
    """One row per epoch (plus -1 for applies outside any epoch, when there are some), from the
    distinct page counts of ``page_counts`` (indexed by the epochs of ``ep`` then -1)."""
    keys = np.r_[ep["epoch"].to_numpy(np.int64), -1]
    n_app = pd.Series(a_ep, dtype=np.int64).value_counts().reindex(keys, fill_value=0).to_numpy(np.int64)
    sl = slice(None) if n_app[-1] else slice(0, -1)
    keys, n_app = keys[sl], n_app[sl]
    bounds = ep.drop_duplicates("epoch").set_index("epoch")
    start = bounds["start_ns"].reindex(keys).fillna(-1).to_numpy(np.int64)
    end = bounds["end_ns"].reindex(keys).fillna(-1).to_numpy(np.int64)
    start = np.where(keys > 0, start, -1)
    end = np.where(keys > 0, end, -1)
    skipped = per["skipped"][sl]
    return pd.DataFrame({
        "epoch": keys, "start_ns": start, "end_ns": end, "applies": n_app,
        "applied_pages": per["applied"][sl], "skipped_pages": skipped,
        "late_pages": per["late"][sl] if late_known else np.full(len(keys), -1, np.int64),
        "resent_pages": per["resent"][sl], "bytes_saved": skipped * PAGE,
    }, columns=EPOCH_COLUMNS)


def applies_captured(c: Context) -> bool:
    """Whether the capture could see hint applies (the qemu_guest_free_page_hint uprobe ran)."""
    if len(c.hint_applies):
        return True
    src = c.bundle.meta.get("sources", {})
    st = src.get("qemu_uprobes") if isinstance(src, dict) else None
    if isinstance(st, dict):
        sym = st.get("symbols")
        if isinstance(sym, dict) and "qemu_guest_free_page_hint" in sym:
            return sym["qemu_guest_free_page_hint"] == "attached"
        return st.get("status") in ("captured", "partial")
    return c.bundle.has("qemu_events")


def guest_hints(c: Context) -> dict[str, Any] | None:
    """Pages the guest hinted, per cmd id (guest tables), or None when the bundle has none."""
    try:
        g = c.bundle.table("guest_hints")
    except KeyError:
        return None
    if not len(g):
        return None
    order = g["order"].to_numpy(np.int64).clip(0, 20)
    pages = np.left_shift(1, order)
    by = pd.DataFrame({"cmd_id": g["cmd_id"].to_numpy(np.int64), "blocks": 1, "pages": pages}) \
        .groupby("cmd_id")[["blocks", "pages"]].sum().reset_index()
    return {"blocks": int(len(g)), "pages": int(pages.sum()),
            "per_cmd_id": [{"cmd_id": hex(int(r.cmd_id)), "blocks": int(r.blocks), "pages": int(r.pages)}
                           for r in by.itertuples(index=False)]}




def match_guest_host(c: Context, syncs: pd.DataFrame) -> dict[str, Any] | None:
    """Every cmd id the host issued against the guest's reads, every hinted block against an apply.

    The host issues one id per sync with the VM running (AFTER_BITMAP_SYNC -> REQUESTED); the
    probe cannot read the id's value, so host epoch k is matched to the k-th distinct id >= 0x80000000
    the guest read (ids rise by one, so a gap is an id the guest never saw). A hinted block is
    matched when some apply covers its first page (guest pfn = gfn); one that no apply covers was
    dropped by the host (popped with a stale id or after STOP) or never popped before migration ended.
    """
    try:
        ge, gh = c.bundle.table("guest_events"), c.bundle.table("guest_hints")
    except KeyError:
        return None
    if not len(gh) and not len(ge):
        return None
    ids = ge.loc[ge["event"] == "cmd_id", "a0"].to_numpy().astype(np.int64)
    read = np.unique(ids[ids >= CMD_ID_MIN])
    host_epochs = np.unique(syncs.loc[syncs["epoch"] > 0, "epoch"].to_numpy(np.int64)) if len(syncs) else np.array([])
    first = int(read.min()) if len(read) else CMD_ID_MIN + 1
    expect = first + np.arange(len(host_epochs), dtype=np.int64)
    pfn = gh["pfn"].to_numpy().astype(np.int64)
    from hintscope.analysis import pagefacts
    st = pagefacts.page_state(c)
    applied = np.isfinite(st.at(st.A, pfn))
    gid = gh["cmd_id"].to_numpy().astype(np.int64)
    per_id = [{"epoch": int(k), "cmd_id": hex(int(i)), "guest_read": bool(np.isin(i, read)),
               "guest_blocks": int((gid == i).sum()), "applied_blocks": int(((gid == i) & applied).sum())}
              for k, i in zip(host_epochs, expect)]
    return {"host_ids": int(len(host_epochs)), "guest_ids_read": [hex(int(i)) for i in read],
            "ids_unread": [d["cmd_id"] for d in per_id if not d["guest_read"]],
            "ids_not_issued": [hex(int(i)) for i in read if not np.isin(i, expect)],
            "per_id": per_id, "blocks_hinted": int(len(gh)), "blocks_applied": int(applied.sum()),
            "blocks_not_applied": int((~applied).sum())}
