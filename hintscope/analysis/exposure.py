"""How exposed a Linux guest is to c': its early block returns and writes into not-yet-applied hints.

For a ``lab migrate --guest linux`` bundle (guest probe + host probe), :func:`page_exposure` gives one
row per hinted page the guest allocated again before the host applied that page's hint, and
:func:`block_exposure` one row per hinted block; :func:`run_exposure` sums a run into one row
(docs/findings.md, "Linux guests: exposure").

What is **measured** (guest probe, guest CLOCK_MONOTONIC, exact between guest events):
* each hinted block (``virtqueue_add_inbuf`` inside ``report_free_page_func``: the moment the hint is
  made available) and its cmd id;
* each return of a block to the allocator and why (``done`` or ``shrinker``), and when DONE was read;
* each allocation that lands in a returned block (``kmem:mm_page_alloc``, at most REUSE_CAP per block
  and return; the rest are counted in the probe's stats, ``reuse_suppressed``).  The allocation is
  taken as the page's first write: with ``init_on_alloc=1`` the allocator zeroes the page inside the
  allocation; with ``init_on_alloc=0`` the new owner writes it next (fault zero-fill, copy on write,
  the block layer's read), after the allocation, so the write time is a lower bound there.

What is **measured on the host** and joined through the guest/host clock band (analysis/clock_align):
the apply of each block (``qemu_guest_free_page_hint``), the syncs, and the migration thread's sends.
Orders between a guest event and an apply are ``sure`` when the whole band agrees, else ``maybe``.

What is **inferred** (TCG has no KVM dirty log, so nothing here is armed or harvested for real): whether
the page would be *unarmed* under KVM manual protect (``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` with
``INITIALLY_SET``) when the guest wrote it.  Two rules, both reported:

* ``exposed`` (the issue's rule): written after its hint was made available and before the apply, in
  a round where the page was harvested dirty and not yet re-armed.  In the bulk round (the first
  hinting round) with INITIALLY_SET every page is dirty and unarmed.  In a later round the page was
  dirty at that round's sync when the guest timeline shows a write to it in the round before
  (``dirty_at_sync``: an allocation the probe saw, or with init_on_alloc the driver's own zeroing
  allocation of the block it hinted then); without such a write TCG cannot tell, and ``exposed`` is
  missing (NA), never guessed;
* ``exposed_chunk``: additionally, the write came before the first re-arm of the page's
  ``clear_bmap`` chunk in that round (QEMU clears a whole chunk, ``1 << clear_shift`` pages, at its first
  send or first hint apply after the sync; shift 18 = 1 GiB is QEMU's default).  A write after that
  re-arm is recorded by KVM and sent, whatever the apply does.

A page that is ``exposed`` would lose that write under manual protect unless the guest rewrites it
later (the predicted loss); under TCG, legacy GET or the dirty ring the next sync harvests it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hintscope.analysis import epochs
from hintscope.bundle import read_bundle
from hintscope.analysis.context import Context
from hintscope.analysis.facts import Facts, load_facts, match_hints
from hintscope.protocol import CMD_ID_MIN

DEFAULT_CLEAR_SHIFT = 18        # QEMU's clear_bmap chunk: 2^18 pages = 1 GiB
PAGE_COLUMNS = ["gfn", "block_pfn", "cmd_id", "round", "bulk", "hint_g", "return_g", "return_reason", "write_g",
                "apply_ns", "apply_g_lo", "apply_g_hi", "before_apply", "hint_to_write_ns", "write_to_apply_ns",
                "chunk", "chunk_rearm_ns", "before_chunk_rearm", "dirty_at_sync", "exposed", "exposed_chunk"]
BLOCK_COLUMNS = ["block_pfn", "pages", "cmd_id", "round", "bulk", "hint_g", "apply_ns", "applied", "hint_to_apply_ns",
                 "return_g",
                 "return_reason", "returned_before_apply", "returned_before_done", "reused_pages",
                 "reused_before_apply"]


def _facts(target) -> Facts:
    if isinstance(target, Facts):
        return target
    if isinstance(target, Context):
        ctx = target
    else:
        ctx = Context(target if hasattr(target, "problems") else read_bundle(target))
    f = load_facts(ctx)
    if f.ctx is None:
        f.ctx = ctx
    return f


def _order(g: np.ndarray, f: Facts, host: np.ndarray) -> np.ndarray:
    """'sure' / 'maybe' / 'no' that guest time g came before host time ``host`` (NaN host: 'no')."""
    lo, hi = f.band.to_host(g) if len(g) else (np.zeros(0), np.zeros(0))
    host = np.asarray(host, float)
    return np.where(hi < host, "sure", np.where(lo < host, "maybe", "no"))


def _guest_of(f: Facts, host: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Earliest and latest guest time of host times (inf when the band is unknown or host is NaN)."""
    host = np.asarray(host, float)
    if not f.band.known:
        return np.full(host.shape, -np.inf), np.full(host.shape, np.inf)
    return host - f.band.hi, host - f.band.lo


def _done_g(f: Facts) -> float:
    """Guest time DONE was read (cmd id 1 after a hinting round), inf when never."""
    ge = f.guest_events
    if not len(ge):
        return np.inf
    d = ge.loc[(ge["event"] == "cmd_id") & (ge["a0"].astype(np.int64) == 1), "guest_ns"]
    return float(d.min()) if len(d) else np.inf


def _apply_of_blocks(f: Facts) -> pd.DataFrame:
    """Each guest hint (guest_ns, pfn) with the host apply that applied it (NaN when none)."""
    H = f.hints
    if not len(H):
        return pd.DataFrame(columns=["hint_g", "block_pfn", "order", "cmd_id", "apply_ns", "apply"])
    m = match_hints(f)
    m = m[m["matched"]] if len(m) else m
    out = pd.DataFrame({"hint_g": H["guest_ns"].to_numpy(np.int64), "block_pfn": H["pfn"].to_numpy().astype(np.int64),
                        "order": H["order"].to_numpy().astype(np.int64),
                        "cmd_id": H["cmd_id"].to_numpy().astype(np.int64)})
    if len(m):
        ap = m.groupby(["gfn0", "h_g"], as_index=False).agg(apply_ns=("a", "min"), apply=("apply", "min"))
        out = out.merge(ap, left_on=["block_pfn", "hint_g"], right_on=["gfn0", "h_g"], how="left")
        out = out.drop(columns=["gfn0", "h_g"])
    else:
        out = out.assign(apply_ns=np.nan, apply=np.nan)
    return out


def _chunk_rearm(f: Facts, gfn: np.ndarray, rnd_start: np.ndarray, shift: int) -> np.ndarray:
    """First host time >= rnd_start a send or an apply touched the page's clear chunk (inf: none)."""
    ev_t, ev_c = [], []
    st, sg = _send_times(f)
    if len(st):
        ev_t.append(st)
        ev_c.append(sg >> shift)
    if len(f.applies):
        A = f.applies[f.applies["gfn0"] >= 0]
        ev_t.append(A["a"].to_numpy(np.int64))
        ev_c.append(A["gfn0"].to_numpy(np.int64) >> shift)
    out = np.full(len(gfn), np.inf)
    if not ev_t or not len(gfn):
        return out
    t = np.concatenate(ev_t)
    c = np.concatenate(ev_c)
    E = pd.DataFrame({"t": t.astype(float), "c": c}).sort_values("t")
    Q = pd.DataFrame({"i": np.arange(len(gfn)), "t": np.asarray(rnd_start, float),
                      "c": np.asarray(gfn, np.int64) >> shift})
    ok = np.isfinite(Q["t"].to_numpy())
    q = Q[ok].sort_values("t")
    if len(q):
        x = pd.merge_asof(q, E.rename(columns={"t": "e"}), left_on="t", right_on="e", by="c", direction="forward")
        out[x["i"].to_numpy()] = x["e"].fillna(np.inf).to_numpy(float)
    return out


def _send_times(f: Facts) -> tuple[np.ndarray, np.ndarray]:
    """(time, gfn) of page sends: per page from a frame, or the first and last page of each range op
    (analysis.pagestate.Ops, dense page index; a run's time is its first page's, which is what the
    first touch of a clear chunk needs to within one run)."""
    s = f.sends
    if s is None or not len(s):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if isinstance(s, pd.DataFrame):
        return s["ts_ns"].to_numpy(np.int64), s["gfn"].to_numpy(np.int64)
    idx = getattr(f.st, "index", None)
    if idx is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    g0 = np.asarray(s.g0, np.int64)
    last = g0 + np.maximum(np.asarray(s.n, np.int64), 1) - 1
    t = np.asarray(s.t, np.int64)
    return np.r_[t, t], np.r_[idx.to_gfn(g0), idx.to_gfn(last)]


def _rounds(f: Facts, cmd_id: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round number (1 = bulk), bulk flag, and host time the round's sync fetch ended (NaN unknown)."""
    ids = np.asarray(cmd_id, np.int64)
    new = ids[ids >= CMD_ID_MIN]
    first = int(new.min()) if len(new) else CMD_ID_MIN + 1
    rnd = np.where(ids >= CMD_ID_MIN, ids - first + 1, 0)
    start = np.full(len(ids), np.nan)
    S = f.syncs
    if len(S):
        start = _fetch_end_of(S, ids)
    return rnd, rnd == 1, start


def _fetch_end_of(S: pd.DataFrame, epoch_ids: np.ndarray) -> np.ndarray:
    """Host time each epoch's sync fetch ended (NaN when the epoch has no sync), vectorised per id."""
    fe = pd.Series(S["fetch_end"].to_numpy(np.int64).astype(float), index=S["epoch_id"].to_numpy(np.int64))
    fe = fe[~fe.index.duplicated(keep="first")]
    return fe.reindex(np.asarray(epoch_ids, np.int64)).to_numpy(float)


def block_exposure(target) -> pd.DataFrame:
    """One row per hinted block (BLOCK_COLUMNS): its apply, its early return, its reuse.

    ``returned_before_apply``/``reused_before_apply`` are 'sure', 'maybe' or 'no' (clock band, see the
    module doc); ``returned_before_done`` is a guest-clock fact (a shrinker return before DONE was read).
    """
    f = _facts(target)
    B = _blocks(f)
    if B is None:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in BLOCK_COLUMNS})
    P = page_exposure(f, blocks=B)
    cnt = P.groupby(["block_pfn", "hint_g"]).agg(reused_pages=("gfn", "size"),
                                                 reused_before_apply=("before_apply", lambda s: (s == "sure").sum()))
    B = B.merge(cnt, left_on=["block_pfn", "hint_g"], right_index=True, how="left")
    B[["reused_pages", "reused_before_apply"]] = B[["reused_pages", "reused_before_apply"]].fillna(0).astype(np.int64)
    return B[BLOCK_COLUMNS].reset_index(drop=True)


def _blocks(f: Facts) -> pd.DataFrame | None:
    """The block table without the per-block reuse counts (those come from the page table), or None."""
    B = _apply_of_blocks(f)
    if not len(B):
        return None
    done = _done_g(f)
    R = f.returns
    B = B.sort_values("hint_g").reset_index(drop=True)
    B["pages"] = (1 << B["order"].to_numpy(np.int64)).astype(np.int64)
    # the first return of the block after this hint (merge_asof forward, per block)
    if len(R):
        Rr = pd.DataFrame({"block_pfn": R["pfn"].to_numpy().astype(np.int64), "return_g": R["guest_ns"].to_numpy(np.int64),
                           "return_reason": R["reason"].astype(str).to_numpy()}).sort_values("return_g")
        B = pd.merge_asof(B, Rr, left_on="hint_g", right_on="return_g", by="block_pfn", direction="forward",
                          allow_exact_matches=False)
    else:
        B = B.assign(return_g=np.nan, return_reason=None)
    # the next hint of the same block ends this hint's life (a return after it belongs to that one)
    nxt = B.groupby("block_pfn")["hint_g"].shift(-1).to_numpy(float)
    late = np.isfinite(nxt) & (B["return_g"].to_numpy(float) > nxt)
    B.loc[late, ["return_g", "return_reason"]] = [np.nan, None]
    rg = B["return_g"].to_numpy(float)
    early = np.isfinite(rg) & (B["return_reason"].to_numpy(object) != "done")
    B["returned_before_apply"] = np.where(early, _order(np.where(early, rg, 0), f,
                                                        np.where(B["apply_ns"].notna(), B["apply_ns"], np.inf)), "no")
    B["returned_before_done"] = early & (rg < done)
    B["applied"] = B["apply_ns"].notna()
    # the window a reuse has to land in: hint made available (guest) to apply (host, band middle)
    glo, ghi = _guest_of(f, B["apply_ns"].to_numpy(float))
    mid = (glo + ghi) / 2
    B["hint_to_apply_ns"] = np.where(np.isfinite(mid), mid - B["hint_g"].to_numpy(float), np.nan)
    rnd, bulk, _ = _rounds(f, B["cmd_id"].to_numpy())
    B["round"], B["bulk"] = rnd, bulk
    return B


def page_exposure(target, clear_shift: int = DEFAULT_CLEAR_SHIFT, blocks: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per page (PAGE_COLUMNS) the guest allocated in a hinted block it took back early (not by DONE).

    ``write_g`` is the allocation's guest time (first write, see the module doc); ``before_apply`` is
    'sure'/'maybe'/'no' by the clock band, or 'unapplied' when the host never applied the hint;
    ``exposed``/``exposed_chunk`` follow the module doc (NA where TCG cannot tell).
    """
    f = _facts(target)
    U = f.reuse
    empty = pd.DataFrame({c: pd.Series(dtype="object") for c in PAGE_COLUMNS})
    if not len(U):
        return empty
    if blocks is None:
        blocks = _blocks(f)
        if blocks is None:
            return empty
    # every return (DONE too) bounds the allocations that follow it; only early ones are kept below
    B = blocks[blocks["return_reason"].notna()]
    if not (B["return_reason"] != "done").any():
        return empty
    # one row per page of each allocation (order-k allocations cover 2^k pages)
    o = U["order"].to_numpy(np.int64).clip(0, 10)
    n = (1 << o).astype(np.int64)
    rep = np.repeat(np.arange(len(U)), n)
    off = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    pages = pd.DataFrame({"gfn": U["pfn"].to_numpy().astype(np.int64)[rep] + off,
                          "write_g": U["guest_ns"].to_numpy(np.int64)[rep]})
    pages["block_pfn"] = pages["gfn"] & ~np.int64(1023)
    # the page's first allocation after the block's early return (an allocation is its first write)
    Bk = B[["block_pfn", "hint_g", "cmd_id", "round", "bulk", "return_g", "return_reason", "apply_ns"]]
    Bk = Bk.assign(return_g=Bk["return_g"].astype(float)).sort_values("return_g")
    pages["write_g"] = pages["write_g"].astype(float)
    x = pd.merge_asof(pages.sort_values("write_g"), Bk, left_on="write_g", right_on="return_g", by="block_pfn",
                      direction="backward")
    x = x[x["return_g"].notna() & (x["return_reason"] != "done")]
    x = x.sort_values("write_g").drop_duplicates(["gfn", "hint_g"], keep="first")
    if not len(x):
        return empty
    x["write_g"] = x["write_g"].astype(np.int64)
    wg = x["write_g"].to_numpy(np.int64)
    apply_ns = x["apply_ns"].to_numpy(float)
    x["before_apply"] = np.where(np.isfinite(apply_ns), _order(wg, f, np.nan_to_num(apply_ns, nan=np.inf)),
                                 "unapplied")
    glo, ghi = _guest_of(f, apply_ns)
    x["apply_g_lo"], x["apply_g_hi"] = glo, ghi
    x["hint_to_write_ns"] = wg - x["hint_g"].to_numpy(np.int64)
    mid = (glo + ghi) / 2
    x["write_to_apply_ns"] = np.where(np.isfinite(mid), mid - wg, np.nan)
    gfn = x["gfn"].to_numpy(np.int64)
    _, _, start = _rounds(f, x["cmd_id"].to_numpy())
    x["chunk"] = gfn >> clear_shift
    x["chunk_rearm_ns"] = _chunk_rearm(f, gfn, start, clear_shift)
    x["before_chunk_rearm"] = _order(wg, f, x["chunk_rearm_ns"].to_numpy(float))
    before = x["before_apply"].to_numpy(object)
    written_in = np.isin(before, ["sure", "maybe"])
    bulk = x["bulk"].to_numpy(bool)
    # later round: dirty at that round's sync only if the guest timeline shows a write in the round before
    x["dirty_at_sync"] = np.where(bulk, True, _written_in_previous_round(f, gfn, x["cmd_id"].to_numpy(np.int64)))
    known = x["dirty_at_sync"].to_numpy(bool)
    exp = pd.array(written_in & known, dtype="boolean")
    exp[written_in & ~known] = pd.NA        # no write seen: not shown dirty, and TCG has no harvest to ask
    x["exposed"] = exp
    chunk_ok = np.isin(x["before_chunk_rearm"].to_numpy(object), ["sure", "maybe"])
    ec = pd.array(written_in & known & chunk_ok, dtype="boolean")
    ec[written_in & ~known & chunk_ok] = pd.NA
    x["exposed_chunk"] = ec
    return x[PAGE_COLUMNS].reset_index(drop=True)


def _init_on_alloc(f: Facts) -> bool:
    """Whether the guest kernel zeroes pages in the allocator (Debian's default, CONFIG_INIT_ON_ALLOC_DEFAULT_ON)."""
    lab = getattr(getattr(f.ctx, "bundle", None), "meta", {}).get("lab", {}) if f.ctx is not None else {}
    v = lab.get("init_on_alloc") if isinstance(lab, dict) else None
    return v is None or int(v) == 1


def _written_in_previous_round(f: Facts, gfn: np.ndarray, cmd_id: np.ndarray) -> np.ndarray:
    """Per page: a guest write the probe saw between the previous round's sync and this round's sync.

    Writes seen: allocations in returned blocks (guest_reuse, capped per block: a lower bound) and,
    with init_on_alloc, the driver's own allocation of a block it hinted (the allocator zeroes it).
    Such a page was dirty at this round's sync, so under manual protect it is unarmed until re-armed.
    """
    out = np.zeros(len(gfn), bool)
    S = f.syncs
    if not len(gfn) or not len(S):
        return out
    lo_t = _fetch_end_of(S, np.asarray(cmd_id, np.int64) - 1)
    hi_t = _fetch_end_of(S, cmd_id)
    ev_g, ev_p = [], []
    U = f.reuse
    if len(U):
        o = U["order"].to_numpy(np.int64).clip(0, 10)
        n = (1 << o).astype(np.int64)
        rep = np.repeat(np.arange(len(U)), n)
        ev_p.append(U["pfn"].to_numpy().astype(np.int64)[rep] + np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n))
        ev_g.append(U["guest_ns"].to_numpy(np.int64)[rep])
    H = f.hints
    if len(H) and _init_on_alloc(f):
        # only the blocks these pages are in: a hint alloc zeroes all 2^order pages of its block
        blk = np.unique(gfn & ~np.int64(1023))
        h = H[np.isin(H["pfn"].to_numpy().astype(np.int64), blk)]
        ho = h["order"].to_numpy(np.int64).clip(0, 10)
        hn = (1 << ho).astype(np.int64)
        hrep = np.repeat(np.arange(len(h)), hn)
        ev_p.append(h["pfn"].to_numpy().astype(np.int64)[hrep] + np.arange(int(hn.sum())) -
                    np.repeat(np.cumsum(hn) - hn, hn))
        ev_g.append(h["guest_ns"].to_numpy(np.int64)[hrep])
    if not ev_g:
        return out
    pg = np.concatenate(ev_p)
    lo, hi = f.band.to_host(np.concatenate(ev_g))
    return _any_between(pg, (lo + hi) / 2, np.asarray(gfn, np.int64), lo_t, hi_t)


def _any_between(wg: np.ndarray, wt: np.ndarray, qg: np.ndarray, qlo: np.ndarray, qhi: np.ndarray) -> np.ndarray:
    """Per query (gfn qg, open interval (qlo, qhi)): is there a write (wg, wt) of that gfn inside it?

    One sort of the writes by (gfn, time rank) and one search per query: O((W + Q) log W) time and
    O(W + Q) memory, where a join of queries to writes by gfn grows with their product.
    """
    out = np.zeros(len(qg), bool)
    ok = np.isfinite(wt) & (wg >= 0)
    wg, wt = wg[ok], wt[ok]
    if not len(wg) or not len(qg):
        return out
    times = np.unique(wt)
    shift = int(len(times)).bit_length()
    if int(max(wg.max(), qg.max())) >= (1 << (62 - shift)):
        raise ValueError("gfn range too large for the packed (gfn, time) key")
    key = np.sort((wg << shift) | np.searchsorted(times, wt))
    # first write strictly after qlo on the same gfn
    qok = np.isfinite(qlo) & np.isfinite(qhi) & (qg >= 0)
    r = np.searchsorted(times, np.where(qok, qlo, 0), side="right")
    pos = np.searchsorted(key, (np.where(qok, qg, 0) << shift) | r)
    pos_c = np.minimum(pos, len(key) - 1)
    same = (pos < len(key)) & ((key[pos_c] >> shift) == qg)
    t_first = times[np.minimum(key[pos_c] & ((1 << shift) - 1), len(times) - 1)]
    out[:] = qok & same & (t_first < qhi)
    return out


def run_exposure(target, clear_shift: int = DEFAULT_CLEAR_SHIFT) -> dict:
    """One run in numbers: blocks and pages hinted, early returns, reuse before the apply, exposure."""
    f = _facts(target)
    B = block_exposure(f)
    P = page_exposure(f, clear_shift, blocks=B)
    ge = f.guest_events
    rep = getattr(f.ctx, "bundle", None)
    out = {
        "hinted_blocks": int(len(B)), "hinted_pages": int(B["pages"].sum()) if len(B) else 0,
        "applied_blocks": int(B["applied"].sum()) if len(B) else 0,
        "shrinker_calls": int((ge["event"] == "shrinker_enter").sum()) if len(ge) else 0,
        "returned_early": int((B["return_reason"].notna() & (B["return_reason"] != "done")).sum()) if len(B) else 0,
        "returned_before_done": int(B["returned_before_done"].sum()) if len(B) else 0,
        "returned_before_apply": int((B["returned_before_apply"] == "sure").sum()) if len(B) else 0,
        "returned_before_apply_maybe": int((B["returned_before_apply"] == "maybe").sum()) if len(B) else 0,
        "reused_pages": int(len(P)),
        "written_before_apply": int((P["before_apply"] == "sure").sum()),
        "written_before_apply_maybe": int((P["before_apply"] == "maybe").sum()),
        "exposed": int(P["exposed"].fillna(False).sum()) if len(P) else 0,
        "exposed_unknown": int(P["exposed"].isna().sum()) if len(P) else 0,
        "exposed_chunk": int(P["exposed_chunk"].fillna(False).sum()) if len(P) else 0,
        "exposed_dirty_seen": int((P["exposed"].fillna(False) & ~P["bulk"].astype(bool)).sum()) if len(P) else 0,
        "clear_shift": clear_shift,
        "band_width_ns": None if not f.band.known else int(f.band.width_ns),
        "mode": f.mode,
    }
    # a big guest's free memory has clear chunks of its own: the same run at a 128 MiB chunk
    P15 = page_exposure(f, 15, blocks=B) if len(P) and clear_shift != 15 else P
    out["exposed_chunk_128m"] = int(P15["exposed_chunk"].fillna(False).sum()) if len(P15) else 0
    hta = B["hint_to_apply_ns"].dropna() if len(B) else pd.Series(dtype=float)
    out["hint_to_apply_ms_median"] = float(hta.median() / 1e6) if len(hta) else None
    out["hint_to_apply_ms_max"] = float(hta.max() / 1e6) if len(hta) else None
    out["first_return_after_hint_ms"] = (
        float(((B["return_g"] - B["hint_g"])[B["return_reason"] == "shrinker"]).min() / 1e6)
        if len(B) and (B["return_reason"] == "shrinker").any() else None)
    # the shrinker as the simulator models it (sim Knobs shrink_period_ns, shrink_blocks)
    se = ge[ge["event"] == "shrinker_exit"] if len(ge) else ge
    gaps = np.diff(np.sort(ge.loc[ge["event"] == "shrinker_enter", "guest_ns"].to_numpy(np.int64))) if len(ge) else []
    out["shrinker_interval_ms_median"] = float(np.median(gaps) / 1e6) if len(gaps) else None
    out["blocks_per_shrinker_call"] = (round(out["returned_early"] / max(out["shrinker_calls"], 1), 2)
                                       if out["shrinker_calls"] else None)
    out["shrinker_pages_freed"] = int(se["a0"].astype(np.int64).sum()) if len(se) else 0
    # how close the real driver came: the shrinker return nearest to (after) its block's apply
    sh = B[(B["return_reason"] == "shrinker") & B["applied"]] if len(B) else B
    if len(sh):
        _, ghi = _guest_of(f, sh["apply_ns"].to_numpy(float))
        gap = sh["return_g"].to_numpy(float) - ghi
        g = gap[np.isfinite(gap)] / 1e6
        out["min_return_after_apply_ms"] = float(g.min()) if len(g) else None
        out["median_return_after_apply_ms"] = float(np.median(g)) if len(g) else None
    else:
        out["min_return_after_apply_ms"] = out["median_return_after_apply_ms"] = None
    w = P[P["before_apply"].isin(["sure", "maybe"])]
    out["hint_to_write_ms_median"] = float(w["hint_to_write_ns"].median() / 1e6) if len(w) else None
    out["write_to_apply_ms_median"] = float(w["write_to_apply_ns"].median() / 1e6) if len(w) else None
    if rep is not None and rep.has("guest_reports"):
        r = rep.table("guest_reports")
        st = r[r["word"] == "STATS"]
        out["reuse_suppressed"] = int(st["v1"].max()) if len(st) else None
        out["probe_drops"] = int(st["v0"].max()) if len(st) else None
    return out


def epoch_of(f: Facts, host_ns: np.ndarray) -> np.ndarray:
    """The cmd id the host held at host times (0 before the first round): for placing a burst."""
    return epochs.epoch_id_at(f.syncs, np.asarray(host_ns, np.int64))
