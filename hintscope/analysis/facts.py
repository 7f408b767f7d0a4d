"""The normalised capture every check runs on: :class:`Facts`, built once per bundle from its Context.

Everything is on the host clock and in guest frame numbers; guest tables carry ``lo``/``hi`` (the
earliest and latest host time of each guest event, from the clock band).  ``available`` says which
kinds of evidence the capture holds, in the vocabulary checks use for ``requires``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from hintscope.analysis import clock_align, epochs, pagefacts
from hintscope.analysis import pagestate as ps
from hintscope.analysis.context import EVERY_PAGE_SOURCES, Context
from hintscope.analysis.findings import finding
from hintscope.analysis.qemu_states import FINAL_STATES
from hintscope.protocol import RETURN_REASONS

CLOCK_MAX_NS = 1_000_000        # a wider guest/host band cannot order guest facts against syncs
STALL_MIN_NS = 2_000_000        # sender idle long enough to call a bulk-round stall
STALL_FACTOR = 50               # ... and this many times the median gap between sends
BIG = np.iinfo(np.int64).max


@dataclass
class Facts:
    """The normalised capture the checks run on (host clock, gfns)."""

    mode: str
    syncs: pd.DataFrame
    applies: pd.DataFrame       # apply, a, a_end, tid, gfn0, npages
    apply_pages: Any            # pagestate.Ops: hinted page ranges (x = apply)
    sends: Any                  # pagestate.Ops: page sends (ranges, tap runs)
    send_source: str
    harvest: Any                # pagestate.Ops: GET bits and ring pushes
    clears: Any                 # pagestate.Ops: pages a KVM_CLEAR_DIRTY_LOG re-armed
    hints: pd.DataFrame         # guest hint blocks: pfn, order, cmd_id, guest_ns, lo, hi
    returns: pd.DataFrame       # guest returns: pfn, order, reason, guest_ns, lo, hi
    reuse: pd.DataFrame         # guest reuse allocs: pfn, order, guest_ns, lo, hi
    guest_events: pd.DataFrame
    lost_pages: pd.DataFrame
    band: clock_align.ClockBand
    states: pd.DataFrame
    qe: pd.DataFrame
    problems: list[str] = field(default_factory=list)
    pops: pd.DataFrame = field(default_factory=pd.DataFrame)   # host hint pops (hint_pops)
    no_hint_applied: str | None = None    # the basis when the capture proves no hint was applied
    state_names: str = ""                 # where the migrate_state names came from (qemu_states)
    hint_sym: str | None = None           # the probe's attach status of qemu_guest_free_page_hint
    available: dict[str, str | None] = field(default_factory=dict)
    ctx: Any = None                       # the Context these facts came from (checks that read more tables)
    st: Any = None                        # pagefacts.PageState: per-page last times, per-apply exposure


# ---------------------------------------------------------------------------------- loading
def _band_cols(df: pd.DataFrame, band: clock_align.ClockBand) -> pd.DataFrame:
    lo, hi = band.to_host(df["guest_ns"].to_numpy(np.int64)) if len(df) else (np.zeros(0), np.zeros(0))
    return df.assign(lo=lo, hi=hi)


MAX_ORDER = 10                  # Linux MAX_ORDER - 1 on x86-64: no block the driver hints is larger


def _sane_blocks(df: pd.DataFrame, name: str, problems: list[str]) -> pd.DataFrame:
    """Guest rows are hostile input: drop impossible orders or pfns instead of expanding them."""
    if not len(df):
        return df
    o = df["order"].to_numpy().astype(np.int64)
    pfn = df["pfn"].to_numpy().astype(np.uint64)
    bad = (o < 0) | (o > MAX_ORDER) | (pfn >= np.uint64(1 << 40))
    if bad.any():
        problems.append(f"{name}: {int(bad.sum())} rows with an impossible order or pfn ignored")
        df = df[~bad].reset_index(drop=True)
    return df


def load_facts(ctx: Context) -> Facts:
    """Facts for one Context (the one ``hintscope analyze`` builds; never a second one)."""
    bundle = ctx.bundle
    qe = ctx.qe
    _check_fetch_order(qe, ctx)
    syncs = epochs.sync_table(ctx)
    a = ctx.hint_applies
    st = pagefacts.page_state(ctx)
    aops = st.applies
    gfn0 = np.full(len(a), -1, np.int64)
    if len(aops):
        g0 = st.index.to_gfn(aops.g0)
        first = pd.Series(g0).groupby(aops.x).min()
        gfn0[first.index.to_numpy(np.int64)] = first.to_numpy(np.int64)
    applies = pd.DataFrame({"apply": np.arange(len(a)), "a": a["ts_ns"].to_numpy(np.int64),
                            "a_end": np.where(a["end_ns"] >= 0, a["end_ns"], a["ts_ns"]).astype(np.int64),
                            "end_known": (a["end_ns"] >= 0).to_numpy(),
                            "tid": a["tid"].to_numpy(np.int64), "gfn0": gfn0, "hva": a["hva"].to_numpy(np.int64),
                            "npages": (a["len"].to_numpy(np.int64) + 4095) // 4096})
    ioctls = ctx.ioctls
    probs = ctx.problems
    ge = _table(bundle, "guest_events")
    _check_guest_clock(ge, ctx)
    hints = _sane_blocks(_guest_table(ctx, ge, "guest_hints"), "guest_hints", probs)
    returns = _sane_blocks(_guest_table(ctx, ge, "guest_returns"), "guest_returns", probs)
    reuse = _sane_blocks(_guest_table(ctx, ge, "guest_reuse"), "guest_reuse", probs)
    band = clock_align.estimate(qe, ge, applies.rename(columns={"a": "ts_ns"}), hints, gfn0)
    f = Facts(
        mode=ctx.dirty_mode, syncs=syncs, applies=applies,
        apply_pages=aops, sends=ctx.send_ops, send_source=ctx.send_source, harvest=pagefacts.harvest_ops(ctx),
        clears=ctx.clear_ops,
        hints=_band_cols(hints, band), returns=_band_cols(returns, band), reuse=_band_cols(reuse, band),
        guest_events=ge, lost_pages=_table(bundle, "lost_pages"), band=band, states=ctx.states, qe=qe,
        problems=probs, pops=hint_pops(ctx, applies), st=st)
    f.state_names = ctx.state_names.basis
    f.hint_sym = _hint_symbol_status(bundle)
    f.no_hint_applied = _no_hint_applied(bundle, qe, ctx.states, f.hint_sym)
    f.available = available(ctx, f)
    return f


def _table(bundle, name: str) -> pd.DataFrame:
    try:
        return bundle.table(name) if bundle.has(name) else pd.DataFrame()
    except KeyError:
        return pd.DataFrame()


# guest_events rows that carry the same facts as the derived guest tables (schema/guest.py):
# event -> (table, {column: guest_events column})
_FROM_EVENTS = {
    "guest_hints": ("hint", {"pfn": "a0", "order": "a1", "cmd_id": "a2"}),
    "guest_returns": ("block_returned", {"pfn": "a0", "reason": "a1", "order": "a2"}),
    "guest_reuse": ("reuse", {"pfn": "a0", "order": "a1"}),
}


def _guest_table(ctx: Context, ge: pd.DataFrame, name: str) -> pd.DataFrame:
    """A derived guest table, or the same facts from ``guest_events`` when the table is absent or damaged."""
    t = _table(ctx.bundle, name)
    if len(t) and name not in ctx.damaged:
        return t
    ev, cols = _FROM_EVENTS[name]
    rows = ge[ge["event"] == ev] if len(ge) else ge
    if not len(rows):
        return t
    out = pd.DataFrame({"guest_ns": rows["guest_ns"].to_numpy(np.int64),
                        **{c: rows[src].to_numpy().astype(np.int64) for c, src in cols.items()}})
    if "reason" in out:
        out["reason"] = [RETURN_REASONS.get(int(r), "other") for r in out["reason"]]
    if "side" in rows:
        out["side"] = rows["side"].to_numpy()
    why = "damaged" if name in ctx.damaged else "absent"
    ctx.problems.append(f"{name} {why}: {len(out)} rows taken from guest_events '{ev}' events instead")
    return out


GUEST_CLOCK_SLACK_NS = 1_000_000    # ring-buffer order across vCPUs may invert stamps by microseconds


def _check_guest_clock(ge: pd.DataFrame, ctx: Context) -> None:
    """Guest stamps in stream order must not run backwards (beyond cross-CPU slack)."""
    if not len(ge) or "seq" not in ge:
        return
    for side, g in ge.groupby("side") if "side" in ge else [("", ge)]:
        t = g.sort_values("seq", kind="stable")["guest_ns"].to_numpy(np.int64)
        back = np.maximum.accumulate(t) - t > GUEST_CLOCK_SLACK_NS
        if back.any():
            ctx.inconsistent(f"guest_events{' ' + str(side) if side else ''}: the guest clock runs backwards "
                             f"by more than {GUEST_CLOCK_SLACK_NS / 1e6:.0f} ms at {int(back.sum())} events in "
                             "stream order; guest facts cannot be placed on the host clock")


def _check_fetch_order(qe: pd.DataFrame, ctx: Context) -> None:
    """Each sync_fetch_end must close an open sync_fetch_begin."""
    if not len(qe):
        return
    x = qe[qe["event"].isin(["sync_fetch_begin", "sync_fetch_end"])]
    if not len(x):
        return
    step = np.where(x["event"].to_numpy() == "sync_fetch_begin", 1, -1)
    depth = np.cumsum(step[np.argsort(x["ts_ns"].to_numpy(np.int64), kind="stable")])
    if (depth < 0).any():
        ctx.inconsistent(f"qemu_events: {int((np.diff(np.r_[0, np.minimum(depth, 0)]) < 0).sum())} sync_fetch_end "
                         "stamped before any open sync_fetch_begin")


POP_CMD, POP_HINT = "vq_pop_cmd", "vq_pop_hint"


def hint_pops(ctx: Context, applies: pd.DataFrame) -> pd.DataFrame:
    """Host pops of hint elements on the free page vq: ts_ns, tid, hva, len, cmd_id (the last start id
    popped on that vq before it; 0 when none), applied (a hint_apply of that HVA followed on the tid).

    The free page vq is told from other devices' queues by what QEMU does next: a vq whose popped
    element's HVA is applied later (QEMU applies on the popping thread; a deferred design may not),
    or whose 4-byte messages carry cmd ids.
    """
    qe = ctx.qe
    cols = {"ts_ns": "int64", "tid": "int64", "hva": "int64", "len": "int64", "cmd_id": "int64", "applied": "bool"}
    empty = pd.DataFrame({c: pd.Series(dtype=d) for c, d in cols.items()})
    if not len(qe):
        return empty
    p = qe[qe["event"].isin([POP_CMD, POP_HINT])]
    if not len(p):
        return empty
    p = p.assign(vq=p["a0"].to_numpy().astype(np.int64), val=p["a1"].to_numpy().astype(np.int64),
                 ln=p["a2"].to_numpy().astype(np.int64), tid=p["tid"].to_numpy(np.int64),
                 ts_ns=p["ts_ns"].to_numpy(np.int64))
    h = p[p["event"] == POP_HINT]
    A = applies.sort_values("a")
    applied = np.zeros(len(h), bool)
    if len(h) and len(A):
        m = pd.merge_asof(h[["ts_ns", "val"]].reset_index().sort_values("ts_ns"),
                          A[["a", "hva"]].rename(columns={"hva": "val"}), left_on="ts_ns", right_on="a",
                          by="val", direction="forward")
        applied = m.sort_values("index")["a"].notna().to_numpy()
    c = p[p["event"] == POP_CMD]
    fpvq = set(h.loc[applied, "vq"].tolist()) | set(c.loc[c["val"] >= epochs.CMD_ID_MIN, "vq"].tolist())
    p = p[p["vq"].isin(fpvq)]
    h, applied = h[h["vq"].isin(fpvq)], applied[h["vq"].isin(fpvq).to_numpy()]
    c = p[p["event"] == POP_CMD]
    ids = np.zeros(len(h), np.int64)
    if len(h) and len(c):
        starts = c[c["val"] >= epochs.CMD_ID_MIN].sort_values("ts_ns")
        m = pd.merge_asof(h[["ts_ns", "vq"]].reset_index().sort_values("ts_ns"),
                          starts[["ts_ns", "vq", "val"]], on="ts_ns", by="vq", direction="backward",
                          allow_exact_matches=True)
        ids = m.sort_values("index")["val"].fillna(0).to_numpy().astype(np.int64)
    return pd.DataFrame({"ts_ns": h["ts_ns"].to_numpy(np.int64), "tid": h["tid"].to_numpy(np.int64),
                         "hva": h["val"].to_numpy(np.int64), "len": h["ln"].to_numpy(np.int64), "cmd_id": ids,
                         "applied": applied})


# Evidence kinds a check can require (``Check.requires``); ``available`` maps each to None when the
# capture has it, else the reason it lacks it.
EVIDENCE = {
    "syncs": "sync boundaries (precopy_notify / sync_fetch uprobes)",
    "applies": "hint applies (qemu_guest_free_page_hint uprobe)",
    "memslots": "memslots (HVA and slot offsets cannot be turned into guest pages)",
    "dirty_log": "KVM dirty-log harvest (KVM_GET_DIRTY_LOG bitmaps or dirty-ring pushes)",
    "rearms": "KVM_CLEAR_DIRTY_LOG masks (manual protect)",
    "hint_times": "when each applied hint was made available (host vq_pop_hint uprobe, or guest hints with a "
                  "clock band narrower than 1 ms)",
    "hint_ids": "the cmd id each applied hint was queued under (host vq_pop_cmd uprobe, or guest hints)",
    "sends": "page sends (migration-stream tap page_sends, or the buffer_is_zero uprobe)",
    "guest": "guest balloon events (guest probe)",
    "guest_writes": "guest writes to hinted pages (guest probe reuse, or the lab guest's write log)",
    "memcheck": "destination memory check (lost_pages)",
}


def available(ctx: Context, f: Facts) -> dict[str, str | None]:
    """Evidence kind -> None when present, else why not (one line)."""
    ev = set(f.qe["event"].unique()) if len(f.qe) else set()
    bundle = ctx.bundle
    out: dict[str, str | None] = {k: None for k in EVIDENCE}

    def lack(k: str, why: str = "") -> None:
        out[k] = EVIDENCE[k] + (f" ({why})" if why else "")

    if not ({"precopy_notify", "sync_fetch_begin"} & ev):
        lack("syncs")
    if "hint_apply" not in ev and not (f.hint_sym or "").startswith("attached"):
        lack("applies", f.hint_sym or "no hint_apply events and the bundle does not say the uprobe was attached")
    if ctx.memslot_source == "none":
        lack("memslots")
    if f.mode in ("unknown", "tcg") or not len(f.harvest):
        lack("dirty_log", "TCG: QEMU's own bitmap, no KVM dirty log" if f.mode == "tcg" else "")
    if f.mode == "manual" and not (len(f.clears) or "bitmap_words" in ctx.bundle.tables()):
        lack("rearms")
    if f.no_hint_applied or not len(f.applies):
        pass        # nothing applied (or nothing seen applied: 'applies' says whether that is known)
    else:
        band_ok = f.band.width_ns is not None and f.band.width_ns <= CLOCK_MAX_NS
        pops = len(f.pops) > 0
        if not pops and not (len(f.hints) and band_ok):
            lack("hint_times", "no vq_pop_hint events" + ("; guest clock band too wide" if len(f.hints) else ""))
        if not pops and not len(f.hints):
            lack("hint_ids", "no vq_pop_cmd events, no guest hints")
    if f.send_source not in EVERY_PAGE_SOURCES:
        lack("sends", f"have: {f.send_source}")
    if not len(f.guest_events) and not len(f.hints) and not bundle.has("hintguest_hints"):
        lack("guest")
    if not len(f.reuse) and not bundle.has("hintguest_hints"):
        lack("guest_writes")
    if not len(f.lost_pages) and not _memcheck_ran(bundle):
        lack("memcheck")
    for k, tables in _TABLES.items():
        bad = sorted(t for t in tables if t in ctx.damaged)
        if bad and out[k] is None:
            out[k] = EVIDENCE[k] + f" (damaged: {', '.join(bad)})"
    return out


# bundle tables behind each evidence kind: a damaged one makes that evidence partial
_TABLES = {
    "syncs": ("qemu_events",), "applies": ("qemu_events",), "memslots": ("memslots",),
    "dirty_log": ("ioctls", "bitmap_words", "ring_push"), "rearms": ("ioctls", "bitmap_words"),
    "hint_times": ("qemu_events", "guest_hints"), "hint_ids": ("qemu_events", "guest_hints"),
    "sends": ("page_sends", "qemu_events"), "guest": ("guest_events", "guest_hints"),
    "guest_writes": ("guest_reuse", "hintguest_writes"), "memcheck": ("lost_pages",),
}


def _memcheck_ran(bundle) -> bool:
    src = (getattr(bundle, "meta", None) or {}).get("sources")
    mc = src.get("memcheck") if isinstance(src, dict) else None
    return isinstance(mc, dict) and mc.get("status") == "captured"



def _hint_symbol_status(bundle) -> str | None:
    """The probe's attach status of qemu_guest_free_page_hint (meta), None when the bundle does not say."""
    src = (getattr(bundle, "meta", None) or {}).get("sources")
    q = src.get("qemu_uprobes") if isinstance(src, dict) else None
    sym = q.get("symbols") if isinstance(q, dict) else None
    st = sym.get("qemu_guest_free_page_hint") if isinstance(sym, dict) else None
    return " ".join(st.split())[:120] if isinstance(st, str) else None


def _no_hint_applied(bundle, qe: pd.DataFrame, states: pd.DataFrame, hint_sym: str | None) -> str | None:
    """A basis sentence when the capture proves QEMU applied no hint during the whole migration, else None.

    The apply uprobe was attached, its source fully captured with no lost events, the capture
    finished, the probe saw the migration from setup to completed, and qemu_guest_free_page_hint
    never ran: then no page can have been filtered, so page sends and guest events are not needed
    to answer the hint-ordering question.
    """
    meta = getattr(bundle, "meta", None) or {}
    q = (meta.get("sources") or {}).get("qemu_uprobes") if isinstance(meta.get("sources"), dict) else None
    if hint_sym != "attached" or not isinstance(q, dict) or q.get("status") != "captured":
        return None
    lost = meta.get("lost") if isinstance(meta.get("lost"), dict) else {}
    if any(not isinstance(v, int) or v != 0 for v in lost.values()) or not getattr(bundle, "complete", False):
        return None
    st = states[states["ts_ns"] >= 0]
    seen = set(st["state"].tolist())
    if not {"setup", "completed"} <= seen:
        return None
    if (st.loc[st["state"] == "setup", "ts_ns"].min() > st.loc[st["state"] == "completed", "ts_ns"].max()):
        return None
    if len(qe) and qe["event"].isin(["hint_apply", "hint_apply_ret"]).any():
        return None
    return ("no hint was applied (qemu_guest_free_page_hint attached, 0 calls from migration setup to "
            "completed), so no page can have been filtered")


# ---------------------------------------------------------------------------------- helpers
def _expand(pfn: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row index, gfn) for every page of each block."""
    n = np.left_shift(1, np.clip(np.asarray(order, np.int64), 0, 18))
    idx = np.repeat(np.arange(len(n)), n)
    off = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
    return idx, np.asarray(pfn, np.int64)[idx] + off


def _uniq(x) -> np.ndarray:
    """Sorted distinct values (sort + mask: faster than np.unique's hash path on large int arrays)."""
    g = np.sort(np.asarray(x, np.int64), kind="stable")
    return g[np.r_[True, g[1:] != g[:-1]]] if len(g) else g


def _pages_of(applies_idx: np.ndarray, f: Facts) -> ps.PageMarks:
    """The pages of these applies (rows of f.applies), as a dense page set (no per-page rows)."""
    if isinstance(f.apply_pages, pd.DataFrame):     # per-page facts (the oracle in tests/oracle_perpage)
        ap = f.apply_pages
        return ap.loc[ap["apply"].isin(applies_idx), "gfn"].to_numpy(np.int64)
    st = f.st
    mask = np.zeros(st.index.size, bool)
    ops = st.applies
    if len(ops):
        sel_ops = np.flatnonzero(np.isin(ops.x, np.asarray(applies_idx, np.int64)))
        for sel, _, _ in ps.pieces(ops, sel_ops):
            mask[sel] = True
    return ps.PageMarks(st.index, mask)


def _hex(x: int) -> str:
    return f"{int(x):#x}"


def match_hints(f: Facts) -> pd.DataFrame:
    """Each apply with the hint it applies: h_lo/h_hi (earliest/latest host time the hint was made
    available), h_id (its cmd id), h_g (guest time, guest hints only), matched (a guest hint),
    pop (the host saw it popped).

    A host pop (same HVA, the last one before the apply) is exact and wins over the
    guest hint's clock band; the guest hint (the latest add of that block possibly before the
    apply) still gives h_g for the guest-side checks.
    """
    A = f.applies[f.applies["gfn0"] >= 0].sort_values("a")
    m = A.assign(matched=False, h_g=np.int64(0), h_lo=np.nan, h_hi=np.nan, h_id=np.int64(0), pop=False)
    if len(A) and len(f.hints):
        H = pd.DataFrame({"gfn0": f.hints["pfn"].to_numpy().astype(np.int64),
                          "h_lo": f.hints["lo"].to_numpy(float), "h_hi": f.hints["hi"].to_numpy(float),
                          "h_g": f.hints["guest_ns"].to_numpy(np.int64),
                          "h_id": f.hints["cmd_id"].to_numpy().astype(np.int64)})
        H = H[np.isfinite(H["h_lo"])].sort_values("h_lo")
        m = pd.merge_asof(A.assign(a_f=A["a"].astype(float)), H, left_on="a_f", right_on="h_lo", by="gfn0",
                          direction="backward")
        m = m.drop(columns="a_f").assign(matched=m["h_g"].notna(), h_g=m["h_g"].fillna(0).astype(np.int64),
                                         h_id=m["h_id"].fillna(0).astype(np.int64), pop=False)
    P = f.pops
    if len(m) and len(P):
        P = P[P["applied"]].rename(columns={"ts_ns": "p_ts", "cmd_id": "p_id"})[["p_ts", "hva", "p_id"]]
        x = pd.merge_asof(m.reset_index(drop=True).reset_index().sort_values("a"), P.sort_values("p_ts"),
                          left_on="a", right_on="p_ts", by="hva", direction="backward")
        x = x.sort_values("index").drop(columns="index")
        hit = x["p_ts"].notna().to_numpy()
        pt = x["p_ts"].to_numpy(float)
        m = x.drop(columns=["p_ts", "p_id"]).assign(
            h_lo=np.where(hit, pt, x["h_lo"]), h_hi=np.where(hit, pt, x["h_hi"]),
            h_id=np.where(hit, x["p_id"].fillna(0), x["h_id"]).astype(np.int64), pop=hit)
    return m


# ---------------------------------------------------------------------------------- page lookups
def last_at(f: Facts, name: str, gfn: np.ndarray) -> np.ndarray:
    """Per gfn: the last time of family ``name`` (H harvest, Rb re-arm before that harvest, S send,
    A apply entry, C CLEAR), float, -inf when never (pagefacts.PageState)."""
    return f.st.at(getattr(f.st, name), gfn)


def last_guest_event(f: Facts, tables: list[tuple[pd.DataFrame, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per page any guest block of ``tables`` covers: (gfn, kind, row) of the block event with the
    latest guest time (ties: the table later in the list, then the later row).

    Blocks are painted in time order onto one dense int32 array (the page's last painter), so the
    cost is the blocks' pages once, without a per-page frame or sort."""
    keys, kinds, rows, pfn, order = [], [], [], [], []
    for df, kind in tables:
        if len(df):
            keys.append(df["guest_ns"].to_numpy(np.int64))
            kinds.append(np.full(len(df), kind, np.int8))
            rows.append(np.arange(len(df), dtype=np.int64))
            pfn.append(df["pfn"].to_numpy().astype(np.int64))
            order.append(np.clip(df["order"].to_numpy().astype(np.int64), 0, 18))
    z = np.zeros(0, np.int64)
    if not keys:
        return z, np.zeros(0, np.int8), z
    g, kind, row = np.concatenate(keys), np.concatenate(kinds), np.concatenate(rows)
    pfn, order = np.concatenate(pfn), np.concatenate(order)
    rank = np.empty(len(g), np.int64)
    rank[np.argsort(g, kind="stable")] = np.arange(len(g))
    index = f.st.index
    first = index.to_idx(pfn)
    n = np.left_shift(1, order)
    last = index.to_idx(pfn + n - 1)
    ok = (first >= 0) & (last == first + n - 1)
    if not ok.all():
        f.problems.append(f"{int((~ok).sum())} guest blocks cover pages no memslot maps; left out of the "
                          "page-level guest checks")
    painter = np.full(index.size, -1, np.int32 if len(g) < 2**31 else np.int64)
    ops = ps.Ops.ranges(rank[ok], first[ok], n[ok], rank[ok])
    for sel, _, op in ps.pieces(ops, np.arange(len(ops))):
        ps.raise_max(painter, sel, ops.x[op] if not isinstance(sel, slice) else int(ops.x[op[0]]))
    pages = np.flatnonzero(painter >= 0)
    ev = np.empty(len(g), np.int64)
    ev[rank] = np.arange(len(g))        # rank -> event
    e = ev[painter[pages]]
    return index.to_gfn(pages), kind[e], row[e]
