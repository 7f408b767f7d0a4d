"""Unsafe orderings of free page hinting against dirty-log syncs, and the writes they lose.

``detect(bundle)`` returns one row per finding (see ``FINDING_COLUMNS``); ``verdict(bundle,
findings)`` says whether the capture shows an unsafe ordering, shows none, or cannot tell;
``exit_code`` maps both to the ``hintscope analyze --fail-on`` status.  Definitions are those of
docs/detector.md (protocol notes §4: a, b, c, c', d1-d6).

Everything is vectorised: events are put on the host clock, then matched with
``np.searchsorted`` / ``pd.merge_asof`` and per-page group maxima; no per-event Python loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from hintscope.analysis import clock_align, epochs, harvest
from hintscope.analysis.context import Context
from hintscope.analysis.qemu_states import FINAL_STATES

SEVERITY = {
    "stale-epoch-apply": "safety", "lost-write": "safety", "rearm-wipe": "safety", "stale-id-apply": "safety",
    "apply-during-sync": "safety", "reuse-before-apply": "safety", "apply-when-impossible": "safety",
    "bad-id-sequence": "safety", "lost-write-not-hint": "migration", "bulk-stall": "performance",
}
LOST_KINDS = ("lost-write", "rearm-wipe", "lost-write-not-hint")
FINDING_COLUMNS = ["kind", "confidence", "severity", "gfn_first", "gfn_last", "gfn_count", "gfns", "evidence",
                   "sentence"]
MAX_GFNS = 1 << 16             # gfns kept per finding (gfn_count has the true number)
MAX_EVIDENCE = 8
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
    apply_pages: pd.DataFrame   # apply, ts_ns, gfn
    sends: pd.DataFrame         # ts_ns, gfn
    send_source: str
    harvest: pd.DataFrame       # ts_ns, gfn (GET bits and ring pushes)
    clears: pd.DataFrame        # ts_ns, gfn, tid (pages a KVM_CLEAR_DIRTY_LOG re-armed)
    hints: pd.DataFrame         # guest hint blocks: pfn, order, cmd_id, guest_ns, lo, hi
    returns: pd.DataFrame       # guest returns: pfn, order, reason, guest_ns, lo, hi
    reuse: pd.DataFrame         # guest reuse allocs: pfn, order, guest_ns, lo, hi
    guest_events: pd.DataFrame
    lost_pages: pd.DataFrame
    band: clock_align.ClockBand
    states: pd.DataFrame
    qe: pd.DataFrame
    missing: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    no_hint_applied: str | None = None    # the basis when the capture proves no hint was applied
    state_names: str = ""                 # where the migrate_state names came from (qemu_states)


# ---------------------------------------------------------------------------------- loading
def _dirty_mode(ioctls: pd.DataFrame, has_ring: bool) -> str:
    names = set(ioctls["name"].unique()) if len(ioctls) else set()
    caps = set(ioctls.loc[ioctls["name"] == "ENABLE_CAP", "cap"].tolist()) if len(ioctls) else set()
    if has_ring or "RESET_DIRTY_RINGS" in names or 192 in caps:
        return "ring"
    if "CLEAR_DIRTY_LOG" in names or 168 in caps:
        return "manual"
    if "GET_DIRTY_LOG" in names:
        return "get"
    return "unknown"


def _table(bundle, name: str) -> pd.DataFrame:
    try:
        return bundle.table(name)
    except KeyError:
        return pd.DataFrame()


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


def load_facts(bundle) -> Facts:
    ctx = Context(bundle)
    qe = ctx.qe
    syncs = epochs.sync_table(qe, ctx.states)
    ap = ctx.hint_pages
    a = ctx.hint_applies
    gfn0 = ap.groupby("apply")["gfn"].min().reindex(range(len(a))).fillna(-1).to_numpy(np.int64)
    applies = pd.DataFrame({"apply": np.arange(len(a)), "a": a["ts_ns"].to_numpy(np.int64),
                            "a_end": np.where(a["end_ns"] >= 0, a["end_ns"], a["ts_ns"]).astype(np.int64),
                            "tid": a["tid"].to_numpy(np.int64), "gfn0": gfn0,
                            "npages": (a["len"].to_numpy(np.int64) + 4095) // 4096})
    apply_pages = ap[["apply", "ts_ns", "gfn"]][ap["gfn"] >= 0].reset_index(drop=True)
    sends = ctx.sends
    gp = ctx.get_pages
    rp = ctx.ring_pages
    ioctls = ctx.ioctls
    if len(rp):
        # a push is the first write after a re-arm; later writes stay invisible until the reset
        # that collects it, so the dirtiness a push shows spans [push, next RESET_DIRTY_RINGS]
        rs = np.sort(ioctls.loc[ioctls["name"] == "RESET_DIRTY_RINGS", "ts_ns"].to_numpy(np.int64))
        push = rp["ts_ns"].to_numpy(np.int64)
        i = np.searchsorted(rs, push, side="left")
        reset = np.where(i < len(rs), rs[np.minimum(i, max(len(rs) - 1, 0))] if len(rs) else BIG, BIG)
        rp = pd.DataFrame({"ts_ns": np.where(reset < BIG, reset, push), "gfn": rp["gfn"].to_numpy(np.int64),
                           "lo_ns": push.astype(float)})
    harv = pd.concat([gp[["ts_ns", "gfn"]].assign(lo_ns=np.nan), rp], ignore_index=True)
    cp = harvest.bitmap_pages(ctx.words, "clear", ctx.iv, ioctls)
    if len(cp):
        tid = ioctls.drop_duplicates("seq").set_index("seq")["tid"]
        cp = cp.assign(tid=tid.reindex(cp["seq"]).fillna(-1).to_numpy(np.int64))
        # CLEAR_DIRTY_LOG re-arms only pages that were dirty; the mask is what QEMU asked for
        clears = cp[["ts_ns", "gfn", "tid"]]
    else:
        clears = pd.DataFrame({"ts_ns": pd.Series(dtype="int64"), "gfn": pd.Series(dtype="int64"),
                               "tid": pd.Series(dtype="int64")})
    probs = list(ctx.problems)
    hints = _sane_blocks(_table(bundle, "guest_hints"), "guest_hints", probs)
    returns = _sane_blocks(_table(bundle, "guest_returns"), "guest_returns", probs)
    reuse = _sane_blocks(_table(bundle, "guest_reuse"), "guest_reuse", probs)
    ge = _table(bundle, "guest_events")
    band = clock_align.estimate(qe, ge, applies.rename(columns={"a": "ts_ns"}), hints, gfn0)
    f = Facts(
        mode=_dirty_mode(ioctls, ctx.bundle.has("ring_push")), syncs=syncs, applies=applies,
        apply_pages=apply_pages, sends=sends, send_source=ctx.send_source, harvest=harv, clears=clears,
        hints=_band_cols(hints, band), returns=_band_cols(returns, band), reuse=_band_cols(reuse, band),
        guest_events=ge, lost_pages=_table(bundle, "lost_pages"), band=band, states=ctx.states, qe=qe,
        problems=probs)
    ev = set(qe["event"].unique()) if len(qe) else set()
    if not ({"precopy_notify", "sync_fetch_begin"} & ev):
        f.missing.append("sync boundaries (precopy_notify / sync_fetch uprobes)")
    if "hint_apply" not in ev and len(hints):
        f.missing.append("hint applies (qemu_guest_free_page_hint uprobe)")
    if ctx.memslot_source == "none":
        f.missing.append("memslots (HVA and slot offsets cannot be turned into guest pages)")
    if f.mode == "unknown" or not len(harv):
        f.missing.append("dirty-log harvest (KVM_GET_DIRTY_LOG bitmaps or dirty-ring pushes)")
    hint_sym = _hint_symbol_status(bundle)
    if hint_sym is not None and not hint_sym.startswith("attached") and "hint_apply" not in ev and not len(hints):
        f.missing.append(f"hint applies (qemu_guest_free_page_hint uprobe {hint_sym})")
    if f.send_source != "page_send":
        f.missing.append(f"{MISSING_SENDS} (buffer_is_zero uprobe; have: {f.send_source})")
    if not len(ge) and not len(hints):
        f.missing.append(f"{MISSING_GUEST} (guest probe)")
    f.state_names = ctx.state_names.basis
    f.no_hint_applied = _no_hint_applied(bundle, qe, ctx.states, hint_sym)
    return f


MISSING_SENDS = "page sends"
MISSING_GUEST = "guest balloon events"


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


def _finding(kind: str, confidence: str, gfns, evidence: list, sentence: str) -> dict[str, Any]:
    g = _uniq(gfns)
    return {"kind": kind, "confidence": confidence, "severity": SEVERITY[kind],
            "gfn_first": int(g[0]) if len(g) else -1, "gfn_last": int(g[-1]) if len(g) else -1,
            "gfn_count": int(len(g)), "gfns": g[:MAX_GFNS].tolist(),
            "evidence": [(int(t) if np.isfinite(t) else -1, s, e) for t, s, e in evidence[:MAX_EVIDENCE]],
            "sentence": sentence}


def _pages_of(applies_idx: np.ndarray, f: Facts) -> np.ndarray:
    ap = f.apply_pages
    return ap.loc[ap["apply"].isin(applies_idx), "gfn"].to_numpy(np.int64)


def _hex(x: int) -> str:
    return f"{int(x):#x}"


def _match_hints(f: Facts) -> pd.DataFrame:
    """Each apply with the guest hint it applies: the latest add of that block possibly before it."""
    A = f.applies[f.applies["gfn0"] >= 0].sort_values("a")
    if not len(A) or not len(f.hints):
        return A.assign(matched=False, h_g=np.int64(0), h_lo=np.nan, h_hi=np.nan, h_id=np.int64(0))
    H = pd.DataFrame({"gfn0": f.hints["pfn"].to_numpy().astype(np.int64), "h_lo": f.hints["lo"].to_numpy(float),
                      "h_hi": f.hints["hi"].to_numpy(float), "h_g": f.hints["guest_ns"].to_numpy(np.int64),
                      "h_id": f.hints["cmd_id"].to_numpy().astype(np.int64)})
    H = H[np.isfinite(H["h_lo"])].sort_values("h_lo")
    m = pd.merge_asof(A.assign(a_f=A["a"].astype(float)), H, left_on="a_f", right_on="h_lo", by="gfn0",
                      direction="backward")
    return m.drop(columns="a_f").assign(matched=m["h_g"].notna(), h_g=m["h_g"].fillna(0).astype(np.int64),
                                        h_id=m["h_id"].fillna(0).astype(np.int64))


# ---------------------------------------------------------------------------------- host-order checks
def _check_orderings(f: Facts, m: pd.DataFrame, out: list) -> dict[str, np.ndarray]:
    s = f.syncs
    flags: dict[str, np.ndarray] = {}
    if not len(s) or not len(m):
        return flags
    ds = s["fetch_begin"].to_numpy(np.int64)
    de = s["fetch_end"].to_numpy(np.int64)
    af = s["after"].to_numpy(np.int64)
    bf = s["before"].to_numpy(np.int64)
    num = s["sync"].to_numpy(np.int64)         # the analysis sync table's numbers (syncs.py)
    a = m["a"].to_numpy(np.int64)
    ae = m["a_end"].to_numpy(np.int64)
    # (b) stale epoch: the hint was queued before a sync's fetch began, the apply came after it ended
    ia = np.searchsorted(de, a, side="left")                      # syncs whose fetch ended before a
    hh, hl = m["h_hi"].to_numpy(float), m["h_lo"].to_numpy(float)
    known = np.isfinite(hh)
    j_hi = np.searchsorted(ds, np.where(known, hh, np.inf), side="right")
    j_lo = np.searchsorted(ds, np.where(known, hl, np.inf), side="right")
    stale = known & (ia > j_hi)
    maybe = known & ~stale & (ia > j_lo)
    flags["stale"] = stale
    for conf, sel in (("hazard", stale), ("ambiguous", maybe)):
        if not sel.any():
            continue
        rows = m[sel]
        d = j_hi[sel] if conf == "hazard" else j_lo[sel]
        for dk in np.unique(d):
            r = rows[d == dk]
            r0 = r.iloc[0]
            ev = [(r0["h_lo"], "guest", f"hint add pfn {_hex(r0['gfn0'])} id {_hex(r0['h_id'])} (earliest host time)"),
                  (ds[dk], "qemu", f"sync {num[dk]} fetch begins"),
                  (de[dk], "qemu", f"sync {num[dk]} fetch ends"),
                  (r0["a"], "qemu", f"hint_apply gfn {_hex(r0['gfn0'])} ({len(r)} applies)")]
            out.append(_finding("stale-epoch-apply", conf, _pages_of(r["apply"].to_numpy(), f), ev,
                                f"{len(r)} hint(s) queued by the guest before sync {num[dk]} fetched the dirty log "
                                f"were applied after that fetch ended, so writes the sync caught can be dropped from "
                                f"the migration bitmap" + ("" if conf == "hazard" else
                                                           " (the clock band cannot settle the order)") + "."))
    # d2: apply overlapping [fetch begin, AFTER] of some sync
    k = np.searchsorted(ds, ae, side="right") - 1
    endw = np.where(af[np.maximum(k, 0)] < BIG, af[np.maximum(k, 0)], de[np.maximum(k, 0)])
    during = (k >= 0) & (endw > a)
    flags["during"] = during
    if during.any():
        r = m[during]
        kk = k[during]
        r0 = r.iloc[0]
        k0 = int(kk[0])
        out.append(_finding("apply-during-sync", "hazard", _pages_of(r["apply"].to_numpy(), f),
                            [(bf[k0], "qemu", f"sync {num[k0]} BEFORE_BITMAP_SYNC"),
                             (ds[k0], "qemu", f"sync {num[k0]} fetch begins"),
                             (r0["a"], "qemu", f"hint_apply gfn {_hex(r0['gfn0'])}"),
                             (int(endw[during][0]), "qemu", "AFTER_BITMAP_SYNC")],
                            f"{len(r)} hint apply(s) ran while a bitmap sync was fetching or merging "
                            f"(syncs {', '.join(map(str, num[np.unique(kk)[:6]]))}); QEMU 7.2 stops hinting before "
                            f"each sync, so a bit the sync just set can be cleared."))
    # d4: after the final BEFORE, after DONE (CLEANUP) or after migration reached a final state
    imposs_t = BIG
    fin = s.loc[s["final"], "before"]
    if len(fin):
        imposs_t = int(fin.iloc[0])
    qe = f.qe
    cl = qe.loc[(qe["event"] == "precopy_notify") & (qe["a1"].astype(np.int64) == 4), "ts_ns"]
    if len(cl):
        imposs_t = min(imposs_t, int(cl.min()))
    st = f.states.loc[f.states["state"].isin(FINAL_STATES) & (f.states["ts_ns"] >= 0), "ts_ns"]
    if len(st):
        imposs_t = min(imposs_t, int(st.min()))
    late = a > imposs_t
    flags["impossible"] = late
    if late.any():
        r = m[late]
        out.append(_finding("apply-when-impossible", "hazard", _pages_of(r["apply"].to_numpy(), f),
                            [(imposs_t, "qemu", "final sync BEFORE / DONE / final state"),
                             (r.iloc[0]["a"], "qemu", f"hint_apply gfn {_hex(r.iloc[0]['gfn0'])}")],
                            f"{len(r)} hint apply(s) ran after the final sync began (VM stopped, DONE or "
                            f"migration over), when no hint may be applied."))
    # d1: the hint's id is not the id the host held when applying it
    hid = m["h_id"].to_numpy(np.int64)
    host_id = epochs.epoch_id_at(s, a)
    wrong = (hid > 1) & (hid != host_id) & ~stale & ~maybe & ~during & ~late
    if wrong.any():
        r = m[wrong]
        out.append(_finding("stale-id-apply", "hazard", _pages_of(r["apply"].to_numpy(), f),
                            [(r.iloc[0]["h_lo"], "guest", f"hint add id {_hex(r.iloc[0]['h_id'])}"),
                             (r.iloc[0]["a"], "qemu", f"hint_apply while host id {_hex(host_id[wrong][0])}")],
                            f"{len(r)} hint(s) were applied under a different cmd id than the one the guest "
                            f"queued them with."))
    return flags


def _check_reuse_before_apply(f: Facts, m: pd.DataFrame, out: list) -> None:
    """d3: the guest took a hinted block back before the host applied its hint."""
    R = f.returns
    if not len(R) or not len(m):
        return
    R = R[R["reason"] != "done"]
    mm = m[m["matched"]]
    if not len(R) or not len(mm):
        return
    Rr = pd.DataFrame({"gfn0": R["pfn"].to_numpy().astype(np.int64), "r_g": R["guest_ns"].to_numpy(np.int64),
                       "r_lo": R["lo"].to_numpy(float), "r_hi": R["hi"].to_numpy(float)}).sort_values("r_g")
    x = pd.merge_asof(mm.sort_values("h_g"), Rr, left_on="h_g", right_on="r_g", by="gfn0",
                      direction="forward", allow_exact_matches=False)
    x = x[x["r_g"].notna()]
    a = x["a"].to_numpy(float)
    sure = x["r_hi"].to_numpy(float) < a
    maybe = ~sure & (x["r_lo"].to_numpy(float) < a)
    for conf, sel in (("hazard", sure), ("ambiguous", maybe)):
        if not sel.any():
            continue
        r = x[sel]
        r0 = r.iloc[0]
        out.append(_finding("reuse-before-apply", conf, _pages_of(r["apply"].to_numpy(), f),
                            [(r0["h_lo"], "guest", f"hint add pfn {_hex(r0['gfn0'])}"),
                             (r0["r_lo"], "guest", "block returned by the shrinker (earliest host time)"),
                             (r0["a"], "qemu", "hint_apply of that block")],
                            f"the guest returned {len(r)} hinted block(s) to its allocator before the host applied "
                            f"their hints, so a write to a reused page can be hidden by the later apply"
                            + ("" if conf == "hazard" else " (order not settled by the clock band)") + "."))


def _host_time(f: Facts, g) -> float:
    """Earliest host time of a guest time (the guest time itself when the band is unknown)."""
    lo = f.band.to_host(np.asarray([g]))[0][0]
    return float(lo) if np.isfinite(lo) else float(g)


def _check_id_sequence(f: Facts, out: list) -> None:
    """d5: ids the guest read must rise by one; start messages must carry the id read; no run without one."""
    ge = f.guest_events
    ev = []
    bad_g = []
    if len(ge):
        ge = ge.sort_values("guest_ns", kind="stable")
        rd = ge[ge["event"] == "cmd_id"]
        v = rd["a0"].to_numpy().astype(np.int64)
        g = rd["guest_ns"].to_numpy(np.int64)
        new = v >= epochs.CMD_ID_MIN
        v, g = v[new], g[new]
        if len(v) > 1:
            ch = np.r_[True, v[1:] != v[:-1]]
            vv, gg = v[ch], g[ch]
            step = (vv[1:] - vv[:-1]) % (1 << 31)
            badi = np.flatnonzero(step != 1)
            for i in badi[:3]:
                ev.append((_host_time(f, gg[i + 1]), "guest", f"id read {_hex(vv[i + 1])} after {_hex(vv[i])}"))
            bad_g += [len(badi)]
        # a start message must carry the id the guest read last
        ob = ge[(ge["event"] == "outbuf") & (ge["a0"].to_numpy().astype(np.int64) >= epochs.CMD_ID_MIN)]
        if len(ob) and len(g):
            i = np.searchsorted(g, ob["guest_ns"].to_numpy(np.int64), side="right") - 1
            sent = ob["a0"].to_numpy().astype(np.int64)
            mism = (i < 0) | (v[np.maximum(i, 0)] != sent)
            for j in np.flatnonzero(mism)[:3]:
                ev.append((_host_time(f, int(ob["guest_ns"].iloc[j])), "guest",
                           f"start message {_hex(sent[j])} but the id read last was "
                           f"{_hex(v[i[j]]) if i[j] >= 0 else 'none'}"))
    h = f.hints
    if len(h):
        noid = h["cmd_id"].to_numpy().astype(np.int64) < epochs.CMD_ID_MIN
        applied = np.isin(h["pfn"].to_numpy().astype(np.int64), f.applies["gfn0"].to_numpy())
        sel = noid & applied
        if sel.any():
            r = h[sel]
            ev.append((r["lo"].iloc[0] if np.isfinite(r["lo"].iloc[0]) else r["guest_ns"].iloc[0], "guest",
                       f"hint pfn {_hex(r['pfn'].iloc[0])} queued with no start id"))
            out.append(_finding("bad-id-sequence", "hazard", _expand(r["pfn"].to_numpy(), r["order"].to_numpy())[1], ev,
                                f"{int(sel.sum())} applied hint(s) were queued with no start message carrying a cmd "
                                f"id, so the host reached START without a REQUESTED id it could check."))
            return
    if ev:
        out.append(_finding("bad-id-sequence", "hazard", [], ev,
                            "the cmd ids the guest read do not rise by exactly one between hinting rounds, or a "
                            "start message carried an id other than the one the guest read (guest clock)."))


def _check_bulk_stall(f: Facts, out: list) -> None:
    """d6: the sender idles at the start of (or during) the bulk round while the guest hints."""
    s = f.syncs
    if f.send_source != "page_send" or not len(s) or not len(f.sends):
        return
    t1 = int(s["after"].iloc[0]) if s["after"].iloc[0] < BIG else int(s["fetch_end"].iloc[0])
    end1 = int(s["before"].iloc[1]) if len(s) > 1 else BIG
    st = f.sends["ts_ns"].to_numpy(np.int64)
    st = _uniq(st[(st > t1) & (st < end1)])
    if len(st) < 3:
        return
    gaps = np.diff(np.r_[t1, st])
    med = float(np.median(gaps))
    i = int(np.argmax(gaps))
    g = int(gaps[i])
    if g > STALL_MIN_NS and g > STALL_FACTOR * max(med, 1.0):
        t0 = t1 if i == 0 else int(st[i - 1])
        napply = int(((f.applies["a"] >= t0) & (f.applies["a"] < t0 + g)).sum())
        bulk = f"sync {int(s['sync'].iloc[0])} AFTER_BITMAP_SYNC: bulk round starts"
        out.append(_finding("bulk-stall", "confirmed", [], [(t1, "qemu", bulk), (t0, "qemu", "sender idle from"),
                                                            (t0 + g, "qemu", "next page_send")],
                            f"the migration thread sent nothing for {g / 1e6:.1f} ms in the bulk round "
                            f"({napply} hint applies in that gap; median gap between sends {med / 1e3:.1f} us), "
                            f"so the bulk round waited on hinting instead of sending."))


# ---------------------------------------------------------------------------------- lost writes
DENSE_MAX_GFN = 1 << 25         # per-gfn arrays up to 128 GiB of guest memory; sparser ids use groupby
_LAST_CACHE: dict[int, tuple[pd.DataFrame, pd.Series]] = {}


def _max_by_gfn(g: np.ndarray, t: np.ndarray) -> pd.Series:
    """Largest t per gfn (float), via ufunc.at on a dense array when gfns are small, else groupby."""
    if not len(g):
        return pd.Series(dtype="float64")
    lo, hi = int(g.min()), int(g.max())
    if lo >= 0 and hi < DENSE_MAX_GFN:
        out = np.full(hi + 1, -np.inf)
        np.maximum.at(out, g, t)
        idx = np.flatnonzero(out > -np.inf)
        return pd.Series(out[idx], index=idx)
    return pd.Series(t).groupby(g).max()


def _last_by_gfn(df: pd.DataFrame, col: str = "ts_ns") -> pd.Series:
    """Latest ``col`` per gfn (float; cached per frame, the checks ask for the same tables repeatedly)."""
    if not len(df):
        return pd.Series(dtype="float64")
    hit = _LAST_CACHE.get(id(df))
    if hit is not None and hit[0] is df:
        return hit[1]
    out = _max_by_gfn(df["gfn"].to_numpy(np.int64), df[col].to_numpy(np.int64).astype(float))
    if len(_LAST_CACHE) > 16:
        _LAST_CACHE.clear()
    _LAST_CACHE[id(df)] = (df, out)
    return out


def _max_before(src_g: np.ndarray, src_t: np.ndarray, q_g: np.ndarray, q_t: np.ndarray,
                src_v: np.ndarray | None = None, inclusive: bool = False) -> np.ndarray:
    """Per query (distinct gfns q_g, time q_t): max src_v (default src_t) over src rows of that gfn
    with src_t < q_t (<= when inclusive); -inf when none."""
    q_g = np.asarray(q_g, np.int64)
    if not len(q_g) or not len(src_g):
        return np.full(len(q_g), -np.inf)
    src_v = src_t if src_v is None else src_v
    Q = pd.Series(np.asarray(q_t, float), index=q_g)
    qt = Q.reindex(src_g).to_numpy() if not (q_g.min() >= 0 and q_g.max() < DENSE_MAX_GFN and
                                             src_g.min() >= 0) else None
    if qt is None:
        dense = np.full(max(int(q_g.max()), int(src_g.max())) + 1, np.nan)
        dense[q_g] = q_t
        qt = dense[src_g]
    m = (src_t <= qt) if inclusive else (src_t < qt)     # NaN compares False: gfns not queried
    r = _max_by_gfn(src_g[m], src_v[m])
    return r.reindex(q_g).fillna(-np.inf).to_numpy()


def _rearm_before(f: Facts, gfn: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per distinct gfn and time t: the last time before t the page was re-armed (-inf when unknown).

    Legacy GET re-arms what it returns (the previous harvest); manual protect re-arms on CLEAR;
    a ring push is itself the first write after a re-arm, so the push behind the harvest at t
    (the reset that collected it) is returned.
    """
    src = f.clears if f.mode == "manual" else f.harvest
    if not len(src) or not len(gfn):
        return np.full(len(gfn), -np.inf)
    sg = src["gfn"].to_numpy(np.int64)
    st = src["ts_ns"].to_numpy(np.int64).astype(float)
    if f.mode == "ring":
        return _max_before(sg, st, gfn, t, src["lo_ns"].to_numpy(float), inclusive=True)
    return _max_before(sg, st, gfn, t)


def _check_lost_writes(f: Facts, out: list) -> set:
    """(c) and (c'): guest writes to reused hinted pages that no send carried and no later sync caught.

    A page counts when the guest's last balloon event for it is a reuse (it was written after its
    last hint).  Its last write evidence L is the reuse or a later harvest of it; the write is lost
    when no send of the page follows L.  An apply of the page after the reuse makes the loss
    hint-caused: rearm-wipe when a KVM_CLEAR_DIRTY_LOG re-armed the page after the write with no
    harvest since (c'), lost-write otherwise.  Returns the gfns reported (to keep them out of the
    host-only check).
    """
    covered: set = set()
    reuse = f.reuse
    if len(reuse):
        # writes the source VM can have made: not on the destination, not after the final sync began
        # (the VM is stopped from there on; after DONE the guest reuses every block on the destination)
        keep = np.ones(len(reuse), bool)
        if "side" in reuse:
            keep &= reuse["side"].to_numpy() != "dst"
        fin = f.syncs.loc[f.syncs["final"], "before"] if len(f.syncs) else []
        if len(fin):
            keep &= reuse["lo"].to_numpy(float) < float(fin.iloc[0])
        reuse = reuse[keep]
    if not len(reuse):
        return covered
    ri, rg = _expand(reuse["pfn"].to_numpy().astype(np.int64), reuse["order"].to_numpy())
    R = pd.DataFrame({"gfn": rg, "g": reuse["guest_ns"].to_numpy(np.int64)[ri], "kind": 1,
                      "lo": reuse["lo"].to_numpy(float)[ri], "hi": reuse["hi"].to_numpy(float)[ri]})
    if len(f.hints):
        hi_, hg = _expand(f.hints["pfn"].to_numpy().astype(np.int64), f.hints["order"].to_numpy())
        H = pd.DataFrame({"gfn": hg, "g": f.hints["guest_ns"].to_numpy(np.int64)[hi_], "kind": 0,
                          "lo": f.hints["lo"].to_numpy(float)[hi_], "hi": f.hints["hi"].to_numpy(float)[hi_]})
        R = pd.concat([R, H], ignore_index=True)
    last = R.sort_values("g", kind="stable").groupby("gfn").tail(1)
    c = last[last["kind"] == 1].set_index("gfn")
    if not len(c) or not np.isfinite(c["lo"]).all():
        if len(c):
            f.problems.append("guest reuse events cannot be placed on the host clock; lost writes not checked")
        return covered
    gfn = c.index.to_numpy(np.int64)
    w_lo, w_hi = c["lo"].to_numpy(float), c["hi"].to_numpy(float)
    h_last = _last_by_gfn(f.harvest).reindex(gfn).fillna(-np.inf).to_numpy()
    h_after = np.where(h_last > w_lo, h_last, -np.inf)
    harvested = np.isfinite(h_after)
    # earliest time the write a harvest shows can have happened: the page's re-arm before it
    rearm = _rearm_before(f, gfn, np.where(harvested, h_after, 0))
    E_lo = np.where(harvested, np.maximum(w_lo, rearm), w_lo)
    E_hi = np.where(harvested, h_after, w_hi)
    s_last = _last_by_gfn(f.sends).reindex(gfn).fillna(-np.inf).to_numpy()
    a_last = _last_by_gfn(f.apply_pages).reindex(gfn).fillna(-np.inf).to_numpy()
    c_last = _last_by_gfn(f.clears).reindex(gfn).fillna(-np.inf).to_numpy()
    have_sends = f.send_source == "page_send"
    lost_sure = s_last < E_lo           # no send since the earliest time of the write (a tie may carry it)
    dropped = s_last <= E_hi            # no send after the latest evidence of it
    by_hint = a_last > np.where(harvested, h_after, w_lo)
    wipe = (f.mode == "manual") & (c_last > w_lo) & ~harvested
    for kind, sel_kind in (("rearm-wipe", by_hint & wipe), ("lost-write", by_hint & ~wipe),
                           ("lost-write-not-hint", ~by_hint)):
        sure = sel_kind & lost_sure
        unsure = sel_kind & dropped & ~lost_sure
        for conf, sel in (("confirmed" if have_sends else "hazard", sure),
                          ("hazard", unsure & harvested), ("ambiguous", unsure & ~harvested)):
            if not sel.any():
                continue
            i0 = int(np.flatnonzero(sel)[0])
            ev = [(w_lo[i0], "guest", f"reuse alloc writes gfn {_hex(gfn[i0])} (earliest host time)")]
            if np.isfinite(h_after[i0]):
                ev.append((h_after[i0], "kvm", "a sync harvested the page dirty"))
            if np.isfinite(c_last[i0]) and c_last[i0] > w_lo[i0]:
                ev.append((c_last[i0], "kvm", "KVM_CLEAR_DIRTY_LOG re-armed the page"))
            if np.isfinite(a_last[i0]):
                ev.append((a_last[i0], "qemu", "hint_apply cleared its migration-bitmap bit"))
            ev.append((s_last[i0] if np.isfinite(s_last[i0]) else 0, "qemu",
                       "last page_send of the page" if np.isfinite(s_last[i0]) else "never sent"))
            ev.sort(key=lambda e: e[0])
            n = int(sel.sum())
            certain = conf == "confirmed" or (conf == "hazard" and sel is sure)
            tail = ("" if conf == "confirmed" else
                    " (the clock band cannot settle whether a send followed the write)" if conf == "ambiguous" else
                    " (page sends not captured: the skip itself is not observed)" if sel is sure else "")
            verb = "lost" if certain else "may have lost"
            sentence = {
                "rearm-wipe": f"{n} page(s) the guest rewrote after taking back a hinted block were re-armed by "
                              f"KVM_CLEAR_DIRTY_LOG before any sync saw the write, then the hint cleared their "
                              f"migration-bitmap bit, so the write was never sent (manual-protect c'){tail}.",
                "lost-write": (f"{n} page(s) the guest wrote after their hint {verb} that write: a hint apply came "
                               f"after the write and no later send carried the page{tail}." if certain or
                               conf == "ambiguous" else
                               f"{n} page(s) the guest wrote after their hint were caught dirty by a sync, then a "
                               f"hint apply cleared their bit and they were never sent again; only a send between "
                               f"the write and that sync can have carried the write."),
                "lost-write-not-hint": f"{n} page(s) the guest reused were never sent after their last write "
                                       f"and no hint apply touched them since{tail}.",
            }[kind]
            out.append(_finding(kind, conf, gfn[sel], [(int(t), s, e) for t, s, e in ev], sentence))
            if conf != "ambiguous":
                covered.update(gfn[sel].tolist())
    return covered


def _check_host_losses(f: Facts, covered: set, out: list) -> None:
    """Dirty pages a sync harvested that were never sent afterwards and no hint touched: not a hint problem."""
    if f.send_source != "page_send" or not len(f.harvest):
        return
    h_last = _last_by_gfn(f.harvest)
    gfn = h_last.index.to_numpy(np.int64)
    h = h_last.to_numpy()
    lo = _rearm_before(f, gfn, h)       # earliest time the harvested write can have happened
    s = _last_by_gfn(f.sends).reindex(gfn).fillna(-np.inf).to_numpy()
    a = _last_by_gfn(f.apply_pages).reindex(gfn).fillna(-np.inf).to_numpy()
    # an apply after the earliest write time means a hint may have covered the write legally
    # (the page freed and hinted after it); reused pages are judged by _check_lost_writes
    lost = (s < h) & (a <= lo) & (gfn >= 0)
    if len(f.hints):
        hi_, hg = _expand(f.hints["pfn"].to_numpy().astype(np.int64), f.hints["order"].to_numpy())
        hint_hi = pd.Series(f.hints["hi"].to_numpy(float)[hi_], index=hg).groupby(level=0).max()
        lost &= ~(hint_hi.reindex(gfn).fillna(-np.inf).to_numpy() > lo)
    lost &= ~np.isin(gfn, list(covered))
    if not lost.any():
        return
    sure = lost & (s < lo)
    for conf, sel, why in (("confirmed", sure, "no send since the page was last re-armed, so the write is lost"),
                           ("hazard", lost & ~sure, "a send between the re-arm and the harvest may have carried "
                            "the write")):
        if not sel.any():
            continue
        i0 = int(np.flatnonzero(sel)[0])
        out.append(_finding("lost-write-not-hint", conf, gfn[sel],
                            [(h[i0], "kvm", f"last harvest of gfn {_hex(gfn[i0])}"),
                             (s[i0] if np.isfinite(s[i0]) else 0, "qemu",
                              "last page_send (before the harvest)" if np.isfinite(s[i0]) else "never sent")],
                            f"{int(sel.sum())} page(s) a sync reported dirty were never sent afterwards and no "
                            f"hint touched them ({why}): a migration loss with no hint involved."))
        covered.update(gfn[sel].tolist())


def _check_memcheck(f: Facts, covered: set, out: list) -> None:
    """Destination pages that differ (lab ``lost_pages``): classify those no finding explains yet."""
    lp = f.lost_pages
    if len(lp) and "classification" in lp:
        # the lab already explained some differences (kvmclock page, hinted-held ...): not losses
        lp = lp[lp["classification"].astype(str) == "lost-write"]
    if not len(lp):
        return
    gfn = _uniq(lp["gfn"].to_numpy().astype(np.int64))
    gfn = gfn[~np.isin(gfn, list(covered))]
    if not len(gfn):
        return
    applied = np.isin(gfn, f.apply_pages["gfn"].to_numpy())
    if len(f.hints) or len(f.reuse):
        rows = []
        for df, kind in ((f.hints, 0), (f.reuse, 1)):
            if len(df):
                i, g = _expand(df["pfn"].to_numpy().astype(np.int64), df["order"].to_numpy())
                rows.append(pd.DataFrame({"gfn": g, "g": df["guest_ns"].to_numpy(np.int64)[i], "kind": kind}))
        last = pd.concat(rows).sort_values("g", kind="stable").groupby("gfn")["kind"].last()
        lk = last.reindex(gfn).to_numpy()
        held = lk == 0                      # hinted and not reused: the stale copy is allowed
        reused = lk == 1
        hint_lost = reused & applied
        not_hint = ~held & ~hint_lost & ~applied
        amb = ~held & ~hint_lost & ~not_hint
    else:
        hint_lost = np.zeros(len(gfn), bool)
        not_hint = ~applied
        amb = applied                       # hinted, but without guest events it may be a held page
    for kind, conf, sel, sent in (
            ("lost-write", "confirmed", hint_lost, "page(s) differ on the destination after the guest reused them "
             "and a hint apply followed the reuse"),
            ("lost-write-not-hint", "confirmed", not_hint, "page(s) differ on the destination and no hint ever "
             "covered them: a migration loss with no hint involved"),
            ("lost-write", "ambiguous", amb, "page(s) differ on the destination inside hinted ranges, but the guest "
             "events cannot tell whether the guest still held them (allowed) or had reused them")):
        if sel.any():
            out.append(_finding(kind, conf, gfn[sel], [(0, "memcheck", f"gfn {_hex(gfn[sel][0])} differs")],
                                f"{int(sel.sum())} {sent}."))


# ---------------------------------------------------------------------------------- API
def detect(bundle, facts: Facts | None = None) -> pd.DataFrame:
    """All findings for a bundle (``FINDING_COLUMNS``); ``findings.attrs['coverage']`` says what was checkable."""
    f = facts or load_facts(bundle)
    out: list[dict] = []
    m = _match_hints(f)
    _check_orderings(f, m, out)
    _check_reuse_before_apply(f, m, out)
    _check_id_sequence(f, out)
    _check_bulk_stall(f, out)
    covered = _check_lost_writes(f, out)
    _check_host_losses(f, covered, out)
    from hintscope.analysis import lost_pages  # lab memory check + hintguest write log (c')
    lost_pages.check(bundle, covered, out, f.problems)
    _check_memcheck(f, covered, out)
    df = pd.DataFrame(out, columns=FINDING_COLUMNS)
    df.attrs["coverage"] = coverage(bundle, f)
    return df


def coverage(bundle, f: Facts) -> dict[str, Any]:
    meta = getattr(bundle, "meta", {}) or {}
    lost = {k: int(v) for k, v in (meta.get("lost") or {}).items() if int(v or 0) > 0}
    partial = {k: v.get("status") for k, v in (meta.get("sources") or {}).items()
               if isinstance(v, dict) and v.get("status") != "captured"}
    complete = bool(getattr(bundle, "complete", True))
    # A probe stopped mid-migration (signal, crash, disk full) still closes its bundle cleanly;
    # what tells the capture is partial is that it never saw the migration end.
    ended = bool(f.states["state"].isin(FINAL_STATES).any()) if len(f.states) else False
    return {"mode": f.mode, "migration_end_seen": ended, "missing": list(f.missing), "lost_events": lost, "sources_not_captured": partial,
            "complete": complete, "problems": list(f.problems)[:20], "clock": f.band.summary(),
            "send_source": f.send_source, "syncs": int(len(f.syncs)), "applies": int(len(f.applies)),
            "guest_hints": int(len(f.hints)), "no_hint_applied": f.no_hint_applied,
            "state_names": f.state_names}


def verdict(bundle, findings: pd.DataFrame) -> str:
    """The capture's verdict (see docs/detector.md); also kept in ``findings.attrs['verdict']``, with
    the reason for it in ``findings.attrs['verdict_basis']``."""
    v, basis = _verdict(bundle, findings)
    findings.attrs["verdict"] = v
    findings.attrs["verdict_basis"] = basis
    return v


def _verdict(bundle, findings: pd.DataFrame) -> tuple[str, str]:
    cov = findings.attrs.get("coverage") or coverage(bundle, load_facts(bundle))
    if len(findings):
        hard = findings[(findings["severity"] == "safety") & findings["confidence"].isin(["confirmed", "hazard"])]
        if len(hard):
            return "unsafe ordering found", f"{len(hard)} safety finding(s) confirmed or hazard"
    why = []
    no_apply = cov.get("no_hint_applied")
    missing = cov["missing"]
    if no_apply:
        # nothing was filtered: page sends and guest events cannot change the hint-ordering answer
        missing = [m for m in missing if not m.startswith((MISSING_SENDS, MISSING_GUEST))]
    if missing:
        why.append("missing " + "; ".join(missing))
    if cov["lost_events"]:
        why.append("lost events (" + ", ".join(f"{k} {v}" for k, v in cov["lost_events"].items()) + ")")
    if cov["sources_not_captured"]:
        why.append("sources not fully captured (" + ", ".join(f"{k} {v}" for k, v in
                                                             cov["sources_not_captured"].items()) + ")")
    if not cov["complete"]:
        why.append("capture did not finish")
    if not cov.get("migration_end_seen", True):
        why.append("the capture does not show the migration ending (no completed, failed or cancelled state)")
    clk = cov["clock"]
    if cov["guest_hints"] and not no_apply and (clk["width_ns"] is None or clk["width_ns"] > CLOCK_MAX_NS):
        w = "unknown" if clk["width_ns"] is None else f"{clk['width_ns'] / 1e6:.2f} ms"
        why.append(f"guest/host clock band too wide ({w})")
    if not cov["syncs"]:
        why.append("no bitmap sync seen")
    if len(findings):
        amb = findings[(findings["severity"] == "safety") & (findings["confidence"] == "ambiguous")]
        if len(amb):
            why.append(f"{len(amb)} ordering(s) the clock band cannot settle")
    if why:
        v = "inconclusive: " + "; ".join(why)
        return v, v
    return "no unsafe ordering found", no_apply or "every check ran on complete evidence"


FAIL_ON = ("lost-write", "hazard", "any")


def exit_code(findings: pd.DataFrame, verdict_text: str, fail_on: str | None) -> int:
    """0 clean, 1 a finding matched --fail-on, 3 inconclusive (only with --fail-on); 2 is the CLI's usage error."""
    if fail_on is None:
        return 0
    if fail_on not in FAIL_ON:
        from hintscope.errors import HintscopeError
        raise HintscopeError(f"--fail-on {fail_on!r}: choose one of {', '.join(FAIL_ON)}")
    f = findings
    if len(f):
        if fail_on == "lost-write":
            hit = f["kind"].isin(LOST_KINDS) & (f["confidence"] == "confirmed")
        elif fail_on == "hazard":
            hit = f["severity"].isin(["safety", "migration"]) & f["confidence"].isin(["confirmed", "hazard"])
        else:
            hit = pd.Series(True, index=f.index)
        if hit.any():
            return 1
    return 3 if verdict_text.startswith("inconclusive") else 0


def findings_to_json(findings: pd.DataFrame, verdict_text: str | None = None) -> dict[str, Any]:
    """JSON-able dict: verdict, coverage and the findings (evidence as {ts_ns, source, event})."""
    rows = []
    for r in findings.to_dict("records"):
        r = dict(r)
        r["evidence"] = [{"ts_ns": int(t), "source": s, "event": e} for t, s, e in r["evidence"]]
        r["gfns"] = [int(g) for g in r["gfns"]]
        rows.append(r)
    if verdict_text is None:
        verdict_text = findings.attrs.get("verdict")
    return {"verdict": verdict_text, "verdict_basis": findings.attrs.get("verdict_basis"),
            "coverage": findings.attrs.get("coverage"), "findings": rows}


def findings_json_text(findings: pd.DataFrame, verdict_text: str | None = None) -> str:
    return json.dumps(findings_to_json(findings, verdict_text), indent=1, default=str)
