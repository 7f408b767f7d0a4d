"""The detector's and the accounting's per-page state, from one sweep over the compact ops (pagestate).

``page_state(ctx)`` (cached on the Context) runs the sweep once and keeps:

* per dense page: ``H`` last harvest, ``Rb`` re-arm before that harvest, ``S`` last send, ``A`` last
  apply entry, ``C`` last KVM_CLEAR_DIRTY_LOG (int64 ns, ``NONE`` when never);
* per apply: its c' exposure read at its return (pages re-armed after the cmd id was issued while
  harvested dirty and not re-armed before, and not sent since: checks/rearm.py);
* per page of each apply: whether the page had been sent in the apply's epoch before the apply
  (hints.py "late").

``est_new(ctx, ...)`` is the sync table's smaller sweep (sends, applies, harvests only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from hintscope.analysis import memslots as ms, pagestate as ps
from hintscope.analysis.pagestate import NONE

BIG = np.iinfo(np.int64).max
PRIO = {"send": 0, "entry": 1, "harvest": 2, "clear": 3, "query": 4}


def apply_bounds(a: pd.DataFrame) -> np.ndarray:
    """Per hint_applies row: its return, or, when lost, the next entry on its thread (BIG when none)."""
    if not len(a):
        return np.zeros(0, np.int64)
    ts, tid = a["ts_ns"].to_numpy(np.int64), a["tid"].to_numpy(np.int64)
    end = a["end_ns"].to_numpy(np.int64)
    o = np.lexsort((np.arange(len(a)), ts, tid))
    nxt_s = np.where(np.r_[tid[o][1:] == tid[o][:-1], False], np.r_[ts[o][1:], BIG], BIG)
    nxt = np.empty(len(a), np.int64)
    nxt[o] = nxt_s
    return np.where(end >= 0, end, nxt)


def announced(qe: pd.DataFrame, syncs: pd.DataFrame, after: np.ndarray) -> np.ndarray:
    """Per AFTER_BITMAP_SYNC (sorted): when the guest could first see the new cmd id.

    The device bumps the id and raises the config interrupt (``notify_config``) inside the AFTER
    notifier; a CLEAR the migration thread issues in the notifier before that (a re-arm ahead of
    the id) comes before the window opens. Without a notify_config in the epoch, the AFTER entry."""
    if not len(after) or not len(qe) or "event" not in qe:
        return after
    nc = np.sort(qe.loc[qe["event"] == "notify_config", "ts_ns"].to_numpy(np.int64))
    before = np.sort(syncs["before"].to_numpy(np.int64)) if len(syncs) else np.zeros(0, np.int64)
    j = np.searchsorted(nc, after, side="left")
    cand = np.where(j < len(nc), nc[np.minimum(j, max(len(nc) - 1, 0))] if len(nc) else BIG, BIG)
    nb = np.searchsorted(before, after, side="right")
    next_before = np.where(nb < len(before), before[np.minimum(nb, max(len(before) - 1, 0))] if len(before) else BIG, BIG)
    return np.where(cand < next_before, cand, after)


def issued_at(qe: pd.DataFrame, syncs: pd.DataFrame, t: np.ndarray) -> np.ndarray:
    """Per time: when the cmd id of the epoch holding it was announced (-inf before the first AFTER)."""
    after = syncs["after"].to_numpy(np.int64) if len(syncs) else np.zeros(0, np.int64)
    after = np.sort(after[after < BIG])
    k = np.searchsorted(after, t, side="right") - 1
    ann = announced(qe, syncs, after)
    return np.where(k >= 0, ann[np.maximum(k, 0)] if len(after) else 0, -np.inf)


def clear_in_apply(clear_ts: np.ndarray, clear_tid: np.ndarray, a: pd.DataFrame, bound: np.ndarray) -> np.ndarray:
    """Per CLEAR: issued inside a hint apply (same thread, between its entry and bound)."""
    if not len(a) or not len(clear_ts):
        return np.zeros(len(clear_ts), bool)
    C = pd.DataFrame({"ts_ns": clear_ts, "tid": clear_tid, "i": np.arange(len(clear_ts))})
    A = pd.DataFrame({"a": a["ts_ns"].to_numpy(np.int64), "tid": a["tid"].to_numpy(np.int64), "bound": bound})
    m = pd.merge_asof(C.sort_values("ts_ns"), A.sort_values("a"), left_on="ts_ns", right_on="a", by="tid",
                      direction="backward").sort_values("i")
    return (m["a"].notna() & (m["ts_ns"] <= m["bound"])).to_numpy()


def ring_ops(ctx) -> ps.Ops:
    """Dirty-ring pushes as harvest ops at the reset that collected them (x = push time).  A page
    pushed twice before one reset is two ops at the same instant: the handlers only raise maxima
    then, so duplicates are harmless and no (reset, page) grouping is needed."""
    done = ctx.__dict__.get("_ring_ops")
    if done is not None:
        return done
    rp = ctx.ring_push
    if not len(rp):
        return ps.Ops.empty()
    io = ctx.ioctls
    rs = np.sort(io.loc[io["name"] == "RESET_DIRTY_RINGS", "ts_ns"].to_numpy(np.int64))
    push = rp["ts_ns"].to_numpy(np.int64)
    i = np.searchsorted(rs, push, side="left")
    reset = np.where(i < len(rs), rs[np.minimum(i, max(len(rs) - 1, 0))] if len(rs) else BIG, BIG)
    t = np.where(reset < BIG, reset, push)
    del i, reset
    # straight from the pushes (slot, offset) to dense pages: no per-page frame (harvest.ring_pages)
    g = ms.slot_page_to_gfn(rp["slot"].to_numpy(np.int64), rp["offset"].to_numpy().astype(np.int64), push, ctx.iv)
    d = ctx.gindex.to_idx(g)
    del g
    k = d >= 0
    out = ctx.__dict__["_ring_ops"] = ps.Ops.ranges(t[k], d[k], np.ones(int(k.sum()), np.int64), push[k])
    return out


def harvest_ops(ctx) -> ps.Ops:
    return ps.concat([ctx.get_ops, ring_ops(ctx)]) if len(ctx.ring_push) else ctx.get_ops


@dataclass
class PageState:
    """``S`` holds ns (sends carry interpolated per-page times); ``H``, ``Rb``, ``A``, ``C`` hold ranks
    into ``T`` (the sorted distinct op times, 0 = never) as int32: 4 bytes per page instead of 8."""

    index: ps.GfnIndex
    T: np.ndarray | None            # None: H, Rb, A, C hold ns (dirty ring), never = NONE
    H: np.ndarray
    Rb: np.ndarray
    S: np.ndarray
    A: np.ndarray
    C: np.ndarray
    applies: ps.Ops                 # apply page ranges (x = apply row)
    off: np.ndarray                 # offset of each apply op in the flat per-apply-page arrays
    late: np.ndarray                # flat: the page was sent in the apply's epoch before the apply
    exposure: dict = field(default_factory=dict)    # apply row -> per-apply exposure (rearm.py)
    exposed: np.ndarray | None = None               # dense mask of every exposed page

    def ns(self, v: np.ndarray, ranked: bool = True) -> np.ndarray:
        """Values of a last-time array as int64 ns (NONE where never)."""
        v = np.asarray(v)
        if not ranked or self.T is None:
            return v.astype(np.int64, copy=False)
        T = self.T if len(self.T) else np.zeros(1, np.int64)
        return np.where(v > 0, T[np.maximum(v.astype(np.int64) - 1, 0)], NONE)

    @property
    def never(self):
        """The 'never' value of H, Rb, A, C (0 as a rank, NONE as ns)."""
        return NONE if self.T is None else 0

    def at(self, arr: np.ndarray, gfn: np.ndarray) -> np.ndarray:
        """arr at each gfn (float ns, -inf where never or unknown page)."""
        i = self.index.to_idx(np.asarray(gfn, np.int64))
        v = arr[np.maximum(i, 0)] if len(arr) else np.zeros(len(i), np.int64)
        t = self.ns(v, ranked=arr is not self.S)
        return np.where((i >= 0) & (t != NONE), t.astype(float), -np.inf)


def page_state(ctx) -> PageState:
    """The sweep for one Context, computed once."""
    done = ctx.__dict__.get("_page_state")
    if done is None:
        done = ctx.__dict__["_page_state"] = _page_state(ctx)
    return done


def _page_state(ctx) -> PageState:
    from hintscope.analysis import epochs, hints as hints_mod
    from hintscope.analysis.syncs import sync_table

    gi = ctx.gindex
    n = gi.size
    mode = ctx.dirty_mode
    a = ctx.hint_applies
    aops = ctx.apply_ops
    harv = harvest_ops(ctx)
    clr = ctx.clear_ops
    sends = ctx.send_ops
    have_sends = ctx.send_ops_source in ("page_send", "tap") and len(sends) > 0

    # op times as ranks into T (int32 arrays); sends stay ns
    # op times as ranks into T (int32 arrays); sends stay ns.  Dirty-ring captures are per page
    # already (one push per row): ranking millions of push times costs more than it saves there.
    if mode == "ring":
        T, rdt, zero = None, np.int64, NONE

        def rank(t):
            return np.asarray(t, np.int64)
    else:
        T = ps.distinct(np.concatenate([aops.t, harv.t, clr.t]))
        rdt = np.int32 if len(T) < 2**31 - 1 else np.int64
        zero = 0

        def rank(t):
            return (np.searchsorted(T, t) + 1).astype(rdt)
    r_app, r_harv, r_clr = rank(aops.t), rank(harv.t), rank(clr.t)
    r_lo = rank(harv.x) if mode == "ring" else None
    S = np.full(n, NONE, np.int64)
    A = np.full(n, zero, rdt)
    H = np.full(n, zero, rdt)
    Rb = np.full(n, zero, rdt)
    C = np.full(n, zero, rdt)
    manual = mode == "manual"
    Ch = np.full(n, zero, rdt) if manual and len(clr) else None
    Cf = np.zeros(n, np.int8) if Ch is not None else None

    # per apply: bound (query time), cmd id announcement, epoch start (late sends)
    bound = apply_bounds(a)
    syn = epochs.sync_table(ctx)
    issued = issued_at(ctx.qe, syn, a["ts_ns"].to_numpy(np.int64)) if len(a) else np.zeros(0)
    s_tab = sync_table(ctx)
    ep = hints_mod.epochs(s_tab, ctx.end_ns)
    start_of = hints_mod.epoch_start_of(a["ts_ns"].to_numpy(np.int64), ep) if len(a) else np.zeros(0, np.int64)

    off = np.cumsum(aops.n) - aops.n
    late = np.zeros(int(aops.n.sum()), bool)

    # CLEARs issued inside an apply (by_apply): per ioctl seq
    by_apply = np.zeros(len(clr), np.int8)
    if len(clr) and len(a):
        io = ctx.ioctls.drop_duplicates("seq").set_index("seq")
        tid = io["tid"].reindex(clr.x).fillna(-1).to_numpy(np.int64)
        by_apply = clear_in_apply(clr.t, tid, a, bound).astype(np.int8)

    def on_send(sel, t, op):
        ps.raise_max(S, sel, t)

    def on_entry(sel, t, op):
        row = aops.x[op]
        if isinstance(sel, slice):
            o = int(off[op[0]])
            late[o:o + sel.stop - sel.start] = S[sel] >= start_of[row[0]]
            ps.raise_max(A, sel, r_app[op[0]])
        else:
            pos = off[op] + (sel - aops.g0[op])
            late[pos] = S[sel] >= start_of[row]
            ps.raise_max(A, sel, r_app[op])

    def on_harvest(sel, t, op):
        one = isinstance(sel, slice)
        rt = r_harv[op[0]] if one else r_harv[op]
        if mode == "ring":
            ps.raise_max(Rb, sel, r_lo[op[0]] if one else r_lo[op])
        elif mode == "get":
            h = H[sel]
            Rb[sel] = np.where(h < rt, h, Rb[sel])
        else:
            Rb[sel] = C[sel]
        H[sel] = rt

    def on_clear(sel, t, op):
        one = isinstance(sel, slice)
        if Ch is not None:
            h = H[sel]
            ba = by_apply[op[0]] if one else by_apply[op]
            Cf[sel] = ((h > C[sel]).astype(np.int8) | (ba << 1)).astype(np.int8)
            Ch[sel] = h
        C[sel] = r_clr[op[0]] if one else r_clr[op]

    exposure: dict = {}
    exposed = np.zeros(n, bool) if Ch is not None else None
    st_ns = PageState(gi, T, H, Rb, S, A, C, aops, off, late).ns

    def on_query(sel, t, op):
        # t here is the op's entry time; the query instant is the bound (qops.t)
        rows = qops.x[op]
        fl = Cf[sel]
        rearm, h = st_ns(C[sel]), st_ns(Ch[sel])
        iss = issued[rows]
        ok = (rearm != NONE) & ((fl & 1) == 1) & (h != NONE) & (rearm.astype(float) > iss)
        if have_sends:
            s = S[sel]
            ok &= ~(s > rearm)
        if not ok.any():
            return
        if isinstance(sel, slice):
            g = np.arange(sel.start, sel.stop, dtype=np.int64)
            rows = np.full(len(g), rows[0])
            iss = np.full(len(g), iss[0])
        else:
            g = sel
        g, rows, rearm, h, fl, iss = g[ok], rows[ok], rearm[ok], h[ok], fl[ok], iss[ok]
        exposed[g] = True
        for r in np.unique(rows):
            k = rows == r
            e = exposure.get(int(r))
            part = {"g": g[k], "rearm_min": int(rearm[k].min()), "rearm_max": int(rearm[k].max()),
                    "h_min": int(h[k].min()), "wlo_min": float(np.maximum(h[k].astype(float), iss[k]).min()),
                    "by_apply": int(((fl[k] >> 1) & 1).sum()), "all_by_apply": bool(((fl[k] >> 1) & 1).all())}
            if e is None:
                exposure[int(r)] = part
            else:
                e["g"] = np.r_[e["g"], part["g"]]
                for key, fn in (("rearm_min", min), ("rearm_max", max), ("h_min", min), ("wlo_min", min)):
                    e[key] = fn(e[key], part[key])
                e["by_apply"] += part["by_apply"]
                e["all_by_apply"] = e["all_by_apply"] and part["all_by_apply"]

    fams = [ps.Family("entry", aops, PRIO["entry"], on_entry),
            ps.Family("harvest", harv, PRIO["harvest"], on_harvest, mixes_times=False),
            ps.Family("clear", clr, PRIO["clear"], on_clear, mixes_times=False)]
    qops = ps.Ops.empty()
    if Ch is not None and len(aops):
        qt = np.minimum(bound[aops.x], BIG - 1)
        qops = ps.Ops(qt, aops.g0, aops.n, aops.mask, aops.x)
        o = np.argsort(qops.t, kind="stable")
        qops = qops.take(o)
        fams.append(ps.Family("query", qops, PRIO["query"], on_query))
    other_t = np.concatenate([f.ops.t for f in fams])
    fams.insert(0, ps.Family("send", ps.split_runs(sends, other_t), PRIO["send"], on_send))
    ps.sweep(fams)
    del Ch, Cf
    return PageState(gi, T, H, Rb, S, A, C, aops, off, late, exposure, exposed)


def est_new(ctx, get: ps.Ops, d: np.ndarray, nsync: int) -> np.ndarray:
    """Per sync: harvested pages whose migration-bitmap bit was clear at the harvest (a send or an
    apply since the page's last harvest; the bitmap starts all ones).  ``get``: the harvests (sets),
    ``d``: the sync of each (-1: none, not a set)."""
    gi = ctx.gindex
    n = gi.size
    if not len(get):
        return np.zeros(nsync, np.int64)
    S = np.full(n, NONE, np.int64)
    Ts = ps.distinct(get.t)
    Hs = np.zeros(n, np.int32 if len(Ts) < 2**31 - 1 else np.int64)     # rank into Ts of the last set
    rs = (np.searchsorted(Ts, get.t) + 1).astype(Hs.dtype)
    Tz = np.r_[np.int64(NONE), Ts]
    counts = np.zeros(nsync + 1, np.int64)

    def on_clear(sel, t, op):
        ps.raise_max(S, sel, t)

    def on_set(sel, t, op):
        k = d[op] if not isinstance(sel, slice) else np.full(1, d[op[0]])
        new = S[sel] > Tz[Hs[sel]]
        if isinstance(sel, slice):
            if k[0] >= 0:
                counts[k[0]] += int(new.sum())
                Hs[sel] = rs[op[0]]
            return
        m = k >= 0
        hit = m & new
        if hit.any():
            # duplicates of a page within one instant (ring pushes) share S and Hs: count each once
            key = ps.distinct(k[hit] * max(n, 1) + sel[hit])
            counts[:] += np.bincount(key // max(n, 1), minlength=nsync + 1)[:nsync + 1]
        Hs[sel[m]] = rs[op][m]

    aops = ctx.apply_ops
    sends = ctx.send_ops
    fams = [ps.Family("entry", aops, 0, on_clear), ps.Family("set", get, 1, on_set, mixes_times=False)]
    other_t = np.concatenate([f.ops.t for f in fams])
    fams.insert(0, ps.Family("send", ps.split_runs(sends, other_t), 0, on_clear))
    ps.sweep(fams)
    return counts[:nsync]
