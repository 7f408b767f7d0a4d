"""Stale destination pages explained: which ones a free page hint hid, and by which mechanism.

Input: the lab memory check (``lost_pages``: every page whose destination copy differs from the
source), the lab guest's own log (``hintguest_hints``, ``hintguest_writes``, ``hintguest_events``),
the guest's page records in both RAM images (``hintguest_pages``), its kicks as the host saw them
(``hintguest_kicks``) and the host probe (``qemu_events`` hint applies and syncs, ``bitmap_words``
GET harvests and CLEAR masks, ``ioctls``), plus page sends (``page_send`` or QEMU's
``ram_save_page``).

For each differing page p:

* no guest hint ever covered p -> not handled here (the detector's memory check reports it as
  ``lost-write-not-hint``);
* a hint covered p and the guest did not write p after making it available -> **not a loss**: the
  device may skip a hinted page (VIRTIO 1.2 §5.5.6.5.2), its content is irrelevant;
* the guest wrote p after making the hint available (its write log; the source RAM's ``HGRW``
  record when the log lost the line) -> a loss the hint caused when a host apply covering p ended
  after the write:

  - ``rearm-wipe`` (protocol §4 c'): the first ``KVM_CLEAR_DIRTY_LOG`` whose mask holds p after the
    write ran inside that apply (same thread, between its entry and return) and no sync harvested
    p between the write and that CLEAR.  With manual protect p was dirty and unarmed, so the write
    left no trace; the CLEAR re-armed p and dropped its dirty bit, the apply cleared its migration
    bitmap bit;
  - ``lost-write`` (c) otherwise (the write was harvested first, or no CLEAR covered p);
  - with no apply after the write the hint cannot have hidden it: ``lost-write-not-hint``.

Confidence is ``confirmed`` (the destination copy is stale) unless the guest/host clock error
cannot order the write against the CLEAR (``ambiguous``).  The guest's TSC is put on the host
clock by a linear fit of the guest's logged kicks against the host's ``kvm:kvm_pio`` of them;
the error band is twice the fit's largest residual plus 1 µs.

``page_classes`` and ``hint_rounds`` are the per-page and per-round views the lab prints after a
run (hinted-held / lost-reuse-write / ...; writes lost per round and who re-armed them first).

All matching is ``pd.merge_asof`` by gfn; per-finding work is a handful of groups, not pages.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from hintscope.analysis import harvest
from hintscope.analysis.context import Context
from hintscope.parse import guest_stream

GUEST_TABLES = ("hintguest_hints",)      # hintguest_writes is absent when the guest wrote nothing (polite)
BAND_FLOOR_NS = 1_000                 # clock error added to twice the fit's worst residual
SEVERITY = {"rearm-wipe": "safety", "lost-write": "safety", "lost-write-not-hint": "migration"}
MAX_GFNS = 4096


def _table(bundle, name: str) -> pd.DataFrame:
    try:
        return bundle.table(name) if bundle.has(name) else pd.DataFrame()
    except KeyError:
        return pd.DataFrame()


def guest_clock(bundle) -> dict[str, Any] | None:
    """host_ns = tsc * k + b from the guest's logged kicks (ev kick/stop, TSC read just before the
    port write) paired in order with the host's kvm_pio of them (``hintguest_kicks``); None when
    fewer than two pairs."""
    ev, kicks = _table(bundle, "hintguest_events"), _table(bundle, "hintguest_kicks")
    if not len(ev) or not len(kicks):
        return None
    g = ev.loc[ev["ev"].isin(["kick", "stop"]), "tsc"].to_numpy(np.float64)
    h = np.sort(kicks["ts_ns"].to_numpy(np.float64))
    n = min(len(g), len(h))     # the source log can end early (VM stopped mid-print), never start late
    if n < 2:
        return None
    k, b = np.polyfit(g[:n], h[:n], 1)
    resid = float(np.abs(h[:n] - (g[:n] * k + b)).max())
    return {"ns_per_tsc": float(k), "offset_ns": float(b), "pairs": int(n), "max_abs_residual_ns": resid,
            "band_ns": 2 * resid + BAND_FLOOR_NS}


def _expand_blocks(df: pd.DataFrame) -> pd.DataFrame:
    """hintguest_hints rows -> one row per page (gfn) with the block's tsc, cmd_id, round, first gfn."""
    n = np.clip(df["npages"].to_numpy(np.int64), 0, 1 << 18)
    idx = np.repeat(np.arange(len(df)), n)
    off = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
    return pd.DataFrame({"gfn": df["gfn"].to_numpy(np.int64)[idx] + off,
                         "h_tsc": df["tsc"].to_numpy(np.uint64)[idx].astype(np.float64),
                         "h_id": df["cmd_id"].to_numpy(np.int64)[idx], "h_round": df["round"].to_numpy(np.int64)[idx],
                         "h_block": df["gfn"].to_numpy(np.int64)[idx]})


def _asof(left: pd.DataFrame, on: str, right: pd.DataFrame, right_on: str, direction: str,
          allow_exact: bool = True) -> pd.DataFrame:
    """merge_asof by gfn keeping ``left``'s row order (both sides need float keys)."""
    L = left.assign(_i=np.arange(len(left)))
    if not len(right):
        out = L.copy()
        for c in right.columns:
            if c != "gfn":
                out[c] = np.nan
        return out.sort_values("_i").drop(columns="_i").reset_index(drop=True)
    m = pd.merge_asof(L.sort_values(on), right.sort_values(right_on), left_on=on, right_on=right_on, by="gfn",
                      direction=direction, allow_exact_matches=allow_exact)
    return m.sort_values("_i").drop(columns="_i").reset_index(drop=True)


def sends(bundle, ctx: Context) -> tuple[pd.DataFrame, str]:
    """Page sends (ts_ns, gfn) and their source.  Without the probe's page_send or the QEMU trace log
    (the committed samples drop the 5 MB log), the lab's reduced trace table still holds every
    ram_save_page of the hint pool, which is where hinted pages live."""
    if ctx.send_source != "none":
        return ctx.sends, ctx.send_source
    q = _table(bundle, "hintguest_qemu_trace")
    if len(q):
        q = q[(q["kind"] == "send") & (q["gfn"] >= 0)]
        return (pd.DataFrame({"ts_ns": q["ts_ns"].to_numpy(np.int64), "gfn": q["gfn"].to_numpy(np.int64)}),
                "ram_save_page of hint-pool pages (hintguest_qemu_trace)")
    return ctx.sends, "none"


def explain(bundle, ctx: Context | None = None) -> pd.DataFrame | None:
    """One row per differing page of a hintguest capture that a guest hint covered; None when the
    bundle is not one (no hintguest tables or no memory check).

    Columns: gfn, written (guest wrote it after making the hint available), kind (rearm-wipe,
    lost-write, lost-write-not-hint, or '' for a hinted page the guest never rewrote), confidence,
    h_id, h_round, h_block, hint_ns, w_ns, w_seq, w_phase, sync_ns (last GET harvesting the page
    before the write), a_ns, a_end_ns, a_tid, a_hva, a_len, clr_ns, clr_seq, harvest_after_ns,
    send_after_ns, src_seq, dst_seq.  Times are host CLOCK_MONOTONIC ns (NaN when unknown).
    """
    lp = _table(bundle, "lost_pages")
    if not all(bundle.has(t) for t in GUEST_TABLES) or not len(lp):
        return None
    ctx = ctx or Context(bundle)
    if "classification" in lp:
        lp = lp[lp["classification"].astype(str) == "lost-write"]
    lost = pd.DataFrame({"gfn": np.unique(lp["gfn"].to_numpy().astype(np.int64))})
    hints = _table(bundle, "hintguest_hints")
    hints = hints[(hints["gfn"] >= 0) & (hints["npages"] > 0) & (hints["npages"] <= 1 << 18)]
    if not len(hints):
        return None
    clock = guest_clock(bundle)
    k, b, band = ((clock["ns_per_tsc"], clock["offset_ns"], clock["band_ns"]) if clock else (np.nan, np.nan, np.nan))

    # guest writes per page: the last logged one; the source RAM's record when the log lost it
    w = _table(bundle, "hintguest_writes")
    if not len(w):
        w = pd.DataFrame({"tsc": pd.Series(dtype="uint64"), "gfn": pd.Series(dtype="int64"),
                          "seq": pd.Series(dtype="int64"), "phase": pd.Series(dtype="string")})
    w = w.sort_values("tsc", kind="stable").drop_duplicates("gfn", keep="last")
    P = lost.merge(pd.DataFrame({"gfn": w["gfn"].to_numpy(np.int64), "w_tsc": w["tsc"].to_numpy(np.uint64)
                                 .astype(np.float64), "w_seq": w["seq"].to_numpy(np.int64),
                                 "w_phase": w["phase"].astype(str).to_numpy()}), on="gfn", how="left")
    pg = _table(bundle, "hintguest_pages")
    if len(pg):
        ram = pg[["gfn", "src_magic", "src_seq", "dst_seq"]].drop_duplicates("gfn")
        P = P.merge(ram, on="gfn", how="left")
    else:
        P = P.assign(src_magic="", src_seq=-1, dst_seq=-1)

    # the hint the write followed (latest block covering the page made available before the write);
    # unwritten pages: the latest block covering them at all
    H = _expand_blocks(hints)
    H = H[H["gfn"].isin(P["gfn"])]
    key = np.where(np.isfinite(P["w_tsc"]), P["w_tsc"], np.inf)
    P = _asof(P.assign(_k=key), "_k", H, "h_tsc", "backward").drop(columns="_k")
    P = P[P["h_tsc"].notna()].reset_index(drop=True)        # no hint covered it: not ours
    logged = P["w_tsc"].notna().to_numpy()
    written = logged | P["src_magic"].astype(str).eq("HGRW").to_numpy()
    P["written"] = written
    P["hint_ns"] = P["h_tsc"] * k + b
    P["w_ns"] = np.where(logged, P["w_tsc"] * k + b, np.nan)
    w_lo = np.where(logged, P["w_ns"] - band, P["hint_ns"] - band)   # unlogged write: after the hint
    w_hi = np.where(logged, P["w_ns"] + band, np.inf)
    # without a clock fit nothing can be ordered: keys span everything, every ordering stays unsettled
    P["w_lo"] = np.where(np.isnan(w_lo), -np.inf, w_lo)
    P["w_hi"] = np.where(np.isnan(w_hi), np.inf, w_hi)

    # host applies covering the page: the first whose return follows the earliest write time
    ap = ctx.hint_pages
    ha = ctx.hint_applies
    A = pd.DataFrame({"gfn": ap["gfn"].to_numpy(np.int64), "a_ns": ap["ts_ns"].to_numpy(np.float64),
                      "a_end_ns": np.where(ha["end_ns"].to_numpy(np.int64) >= 0, ha["end_ns"], ha["ts_ns"])
                      .astype(np.float64)[ap["apply"].to_numpy()] if len(ap) else np.zeros(0),
                      "a_tid": ap["tid"].to_numpy(np.float64), "a_hva": ha["hva"].to_numpy(np.float64)[ap["apply"]
                      .to_numpy()] if len(ap) else np.zeros(0),
                      "a_len": ha["len"].to_numpy(np.float64)[ap["apply"].to_numpy()] if len(ap) else np.zeros(0)})
    A = A[(A["gfn"] >= 0) & A["gfn"].isin(P["gfn"])]
    A = A.assign(_ae=A["a_end_ns"])
    P = _asof(P, "w_lo", A, "_ae", "forward").drop(columns="_ae")
    # the apply must belong to a hint made available no later than it started
    stale_apply = P["a_ns"].notna() & (P["a_ns"] < P["hint_ns"] - band)
    P.loc[stale_apply, ["a_ns", "a_end_ns", "a_tid", "a_hva", "a_len"]] = np.nan

    # KVM_CLEAR_DIRTY_LOG pages (the masks the probe read): the first re-arm of the page after the write
    io = ctx.ioctls
    cp = harvest.bitmap_pages(ctx.words, "clear", ctx.iv, io)
    cp = cp[cp["gfn"].isin(P["gfn"])]
    ci = io.drop_duplicates("seq").set_index("seq") if len(io) else pd.DataFrame(columns=["tid"])
    C = pd.DataFrame({"gfn": cp["gfn"].to_numpy(np.int64), "clr_ns": cp["ts_ns"].to_numpy(np.float64),
                      "clr_seq": cp["seq"].to_numpy(np.float64),
                      "clr_tid": ci["tid"].reindex(cp["seq"]).to_numpy(np.float64) if len(cp) else np.zeros(0)})
    P = _asof(P, "w_lo", C, "clr_ns", "forward", allow_exact=False)

    # GET harvests of the page: the last before the write; any between the write and the re-arm
    gp = ctx.get_pages
    G = pd.DataFrame({"gfn": gp["gfn"].to_numpy(np.int64), "sync_ns": gp["ts_ns"].to_numpy(np.float64)})
    G = G[G["gfn"].isin(P["gfn"])]
    P = _asof(P.assign(_k=P["w_hi"].where(np.isfinite(P["w_hi"]), P["w_lo"])), "_k", G, "sync_ns", "backward",
              allow_exact=False).drop(columns="_k")
    G2 = G.rename(columns={"sync_ns": "harvest_after_ns"})
    P = _asof(P, "w_lo", G2, "harvest_after_ns", "forward", allow_exact=False)
    # page sends after the write (ram_save_page or page_send)
    S, send_source = sends(bundle, ctx)
    S = pd.DataFrame({"gfn": S["gfn"].to_numpy(np.int64), "send_after_ns": S["ts_ns"].to_numpy(np.float64)})
    S = S[S["gfn"].isin(P["gfn"])]
    P = _asof(P, "w_lo", S, "send_after_ns", "forward", allow_exact=False)

    # The CLEAR of a whole clear_bmap chunk runs inside the *first* apply that touches the chunk in
    # an epoch, which need not be the apply of the page's own block: find the apply (any block, same
    # thread) whose [entry, return] holds the CLEAR.
    ha_g = ap.groupby("apply")["gfn"].min() if len(ap) else pd.Series(dtype="int64")
    W = pd.DataFrame({"_tid": ha["tid"].to_numpy(np.float64), "ca_ns": ha["ts_ns"].to_numpy(np.float64),
                      "ca_end_ns": np.where(ha["end_ns"] >= 0, ha["end_ns"], ha["ts_ns"]).astype(np.float64),
                      "ca_gfn": ha_g.reindex(range(len(ha))).fillna(-1).to_numpy(np.float64)})
    has_clr = P["clr_ns"].notna().to_numpy()
    P["ca_ns"], P["ca_end_ns"], P["ca_gfn"] = np.nan, np.nan, np.nan
    if has_clr.any() and len(W):
        Q = P.loc[has_clr, ["clr_ns", "clr_tid"]].rename(columns={"clr_tid": "_tid"}).assign(_i=np.flatnonzero(has_clr))
        m = pd.merge_asof(Q.sort_values("clr_ns"), W.sort_values("ca_ns"), left_on="clr_ns", right_on="ca_ns",
                          by="_tid", direction="backward")
        for c in ("ca_ns", "ca_end_ns", "ca_gfn"):
            P.loc[m["_i"].to_numpy(), c] = m[c].to_numpy()
    has_apply = P["a_ns"].notna().to_numpy()
    in_apply = has_apply & has_clr & (P["clr_ns"] <= P["ca_end_ns"]).fillna(False).to_numpy()
    # a harvest between the write and the re-arm means a sync saw the write first: (c), not (c')
    seen_first = P["harvest_after_ns"].notna().to_numpy() & (
        P["harvest_after_ns"].to_numpy() < np.where(P["clr_ns"].notna(), P["clr_ns"], np.inf))
    wipe = written & in_apply & ~seen_first
    kind = np.where(~written, "", np.where(~has_apply, "lost-write-not-hint",
                                           np.where(wipe, "rearm-wipe", "lost-write")))
    # the clock must put the write before the re-arm (rearm-wipe) / before the apply's return
    t_after = np.where(wipe, P["clr_ns"].to_numpy(), P["a_end_ns"].to_numpy())
    settled = logged & (P["w_hi"].to_numpy() < t_after)
    conf = np.where(~written, "", np.where((kind == "lost-write-not-hint") | settled, "confirmed", "ambiguous"))
    P["kind"], P["confidence"] = kind, conf
    P["clr_in_apply"] = in_apply
    P["ram_written"] = P["src_magic"].astype(str).eq("HGRW").to_numpy()
    P.attrs["send_source"] = send_source
    return P


HGRW = "HGRW"   # the record magic of a reuse write (lab/guests/hintguest)


def page_classes(bundle) -> pd.DataFrame | None:
    """Every page the memory check found different, plus every page the guest rewrote after hinting
    it, in one class each; None when the bundle is no hintguest capture.

    cls: ``hinted-held`` (in a hinted block the guest never rewrote: the host may skip it, not a
    loss), ``lost-reuse-write`` (rewritten after the hint, stale on the destination), ``reuse-ok``
    (rewritten and carried over), ``kvmclock`` (only SeaBIOS's kvmclock record differs: KVM rewrites
    it on each host), ``lost-other`` (differs, no hint covers it).  Other columns: cmd_id and
    h_round of the latest hint covering the page (-1 none), write_seq (last reuse write, log or
    source RAM; -1 none), src_seq, dst_seq, src_magic, dst_magic (records in the two RAM images)."""
    if not bundle.has("hintguest_events"):
        return None
    lp, rec, w = _table(bundle, "lost_pages"), _table(bundle, "hintguest_pages"), _table(bundle, "hintguest_writes")
    mc = bundle.meta.get("memcheck") or {}
    kvmclock = np.array([g for g in mc.get("kvmclock_gfns", []) if isinstance(g, int)], np.int64)
    diff = np.union1d(lp["gfn"].to_numpy().astype(np.int64) if len(lp) else np.zeros(0, np.int64), kvmclock)
    if not len(rec):
        rec = pd.DataFrame({"gfn": pd.Series(dtype="int64"), "src_seq": pd.Series(dtype="int64"),
                            "dst_seq": pd.Series(dtype="int64"), "src_magic": pd.Series(dtype="string"),
                            "dst_magic": pd.Series(dtype="string")})
    rec = rec.drop_duplicates("gfn").assign(gfn=lambda d: d["gfn"].astype(np.int64))
    ram_w = rec.loc[rec["src_magic"].astype(str) == HGRW, ["gfn", "src_seq"]].rename(columns={"src_seq": "seq"})
    log_w = w[["gfn", "seq"]].astype(np.int64) if len(w) else ram_w.iloc[:0]
    writes = pd.concat([log_w, ram_w], ignore_index=True)
    wseq = writes.groupby("gfn")["seq"].max()
    gfns = np.union1d(diff, wseq.index.to_numpy(np.int64))
    P = pd.DataFrame({"gfn": gfns})
    hints = _table(bundle, "hintguest_hints")
    hints = hints[(hints["gfn"] >= 0) & (hints["npages"] > 0) & (hints["npages"] <= 1 << 18)] if len(hints) else hints
    if len(hints):
        H = _expand_blocks(hints).sort_values("h_tsc", kind="stable").drop_duplicates("gfn", keep="last")
        P = P.merge(H[["gfn", "h_id", "h_round"]], on="gfn", how="left")
    else:
        P = P.assign(h_id=np.nan, h_round=np.nan)
    P["cmd_id"] = P.pop("h_id").fillna(-1).astype(np.int64)
    P["h_round"] = P["h_round"].fillna(-1).astype(np.int64)
    P["write_seq"] = wseq.reindex(gfns).fillna(-1).to_numpy(np.int64)
    P = P.merge(rec[["gfn", "src_seq", "dst_seq", "src_magic", "dst_magic"]], on="gfn", how="left")
    P[["src_seq", "dst_seq"]] = P[["src_seq", "dst_seq"]].fillna(-1).astype(np.int64)
    P[["src_magic", "dst_magic"]] = P[["src_magic", "dst_magic"]].fillna("").astype(str)
    differs = np.isin(gfns, diff)
    reused = P["write_seq"].to_numpy() >= 0
    cls = np.where(reused, np.where(differs, "lost-reuse-write", "reuse-ok"),
                   np.where(P["cmd_id"].to_numpy() >= 0, "hinted-held", "lost-other"))
    cls = np.where((cls == "lost-other") & np.isin(gfns, kvmclock), "kvmclock", cls)
    P.insert(1, "cls", cls)
    return P


def hint_rounds(bundle, ctx: Context | None = None) -> pd.DataFrame:
    """Per hinting round of a hintguest capture (round, cmd_id): the pages the guest rewrote after
    hinting them (``writes``), how many the destination lacks (``lost``), how many of those
    hintscope explains as ``rearm-wipe``, and the first KVM_CLEAR_DIRTY_LOG after the epoch's last
    GET whose mask holds one of the round's pages: when (``first_clear_ns``, host ns;
    ``clear_minus_first_write_us`` against the round's first logged write) and by whom
    (``cleared_by``: "hint apply" when it ran inside a qemu_guest_free_page_hint call on the same
    thread, "migration thread" otherwise, "" with no such CLEAR, e.g. dirty ring or no probe).
    (c') predicts the round's writes lost when that CLEAR came from the hint apply after them."""
    cols = ["round", "cmd_id", "writes", "lost", "rearm_wipe", "first_write_ns", "first_clear_ns",
            "cleared_by", "clear_minus_first_write_us"]
    pc = page_classes(bundle)
    if pc is None:
        return pd.DataFrame(columns=cols)
    W = pc[pc["cls"].isin(["lost-reuse-write", "reuse-ok"]) & (pc["h_round"] >= 0)]
    if not len(W):
        return pd.DataFrame(columns=cols)
    ctx = ctx or Context(bundle)
    clock = guest_clock(bundle)
    w = _table(bundle, "hintguest_writes")
    first_tsc = w.groupby("round")["tsc"].min() if len(w) else pd.Series(dtype="float64")
    P = explain(bundle, ctx)
    wiped = (P[P["kind"] == "rearm-wipe"].groupby("h_round").size() if P is not None and len(P)
             else pd.Series(dtype="int64"))
    io = ctx.ioctls
    gets = np.sort(io.loc[io["name"] == "GET_DIRTY_LOG", "ts_ns"].to_numpy(np.int64)) if len(io) else np.zeros(0)
    cp = harvest.bitmap_pages(ctx.words, "clear", ctx.iv, io) if len(io) else pd.DataFrame(columns=["gfn"])
    cp = cp[cp["gfn"].isin(W["gfn"])]
    tids = io.drop_duplicates("seq").set_index("seq")["tid"] if len(io) else pd.Series(dtype="int64")
    ha = ctx.hint_applies
    rows = []
    for (rnd, cid), g in W.groupby(["h_round", "cmd_id"]):
        t_w = (float(first_tsc.get(rnd)) * clock["ns_per_tsc"] + clock["offset_ns"]
               if clock and rnd in first_tsc.index else np.nan)
        epoch = gets[gets < t_w].max() if np.isfinite(t_w) and (gets < t_w).any() else -np.inf
        c = cp[cp["gfn"].isin(g["gfn"]) & (cp["ts_ns"] >= epoch)].sort_values("ts_ns")
        first_clear, by = np.nan, ""
        if len(c):
            first_clear = float(c["ts_ns"].iloc[0])
            tid = tids.get(int(c["seq"].iloc[0]), -1)
            end = np.where(ha["end_ns"] >= 0, ha["end_ns"], np.iinfo(np.int64).max)
            inside = ((ha["tid"] == tid) & (ha["ts_ns"] <= first_clear) & (end >= first_clear)).any()
            by = "hint apply" if inside else "migration thread"
        rows.append({"round": int(rnd), "cmd_id": int(cid), "writes": int(len(g)),
                     "lost": int((g["cls"] == "lost-reuse-write").sum()), "rearm_wipe": int(wiped.get(rnd, 0)),
                     "first_write_ns": t_w, "first_clear_ns": first_clear, "cleared_by": by,
                     "clear_minus_first_write_us": round((first_clear - t_w) / 1e3, 1)
                     if np.isfinite(first_clear) and np.isfinite(t_w) else np.nan})
    return pd.DataFrame(rows, columns=cols)


def _t(x) -> int:
    return int(x) if x is not None and np.isfinite(x) else -1


def _sync_no(fb: np.ndarray, t: float) -> int:
    """1-based number of the last sync whose fetch began at or before t (0 if none)."""
    return int(np.searchsorted(fb, t, side="right"))


def _evidence(r: pd.Series, send_source: str, io: pd.DataFrame, fb: np.ndarray, done_ns: int) -> list:
    g = int(r["gfn"])
    ev = []
    if np.isfinite(r["sync_ns"]):
        ev.append((_t(r["sync_ns"]), "kvm", f"KVM_GET_DIRTY_LOG (sync {_sync_no(fb, r['sync_ns'])}) last harvested "
                                            f"gfn {g:#x} dirty: unarmed from then on (manual protect)"))
    else:
        ev.append((_t(fb[0]) if len(fb) else -1, "kvm",
                   f"no GET harvested gfn {g:#x} before the write: dirty and unarmed since INITIALLY_SET"))
    ev.append((_t(r["hint_ns"]), "guest", f"hint made available: block {int(r['h_block']):#x} id "
                                          f"{int(r['h_id']):#x} (round {int(r['h_round'])})"))
    if np.isfinite(r["w_ns"]):
        ev.append((_t(r["w_ns"]), "guest", f"write gfn {g:#x} seq {int(r['w_seq'])} ({r['w_phase']}), "
                                           "no trap: the page was unarmed"))
    else:
        ev.append((-1, "guest", f"write gfn {g:#x} (source RAM record HGRW seq {int(r['src_seq'])}; the serial log "
                                "lost the line, time unknown)"))
    if np.isfinite(r["a_ns"]):
        ev.append((_t(r["a_ns"]), "qemu", f"hint_apply of block {int(r['h_block']):#x} (hva {int(r['a_hva']):#x}, "
                                          f"{int(r['a_len']) >> 10} KiB; qemu_guest_free_page_hint, tid "
                                          f"{int(r['a_tid'])})"))
    if np.isfinite(r["clr_ns"]):
        c = io.loc[int(r["clr_seq"])] if int(r["clr_seq"]) in io.index else None
        what = (f"slot {int(c['slot'])} [first_page {int(c['first_page']):#x} +{int(c['num_pages'])} pages]"
                if c is not None else "")
        where = (f"inside qemu_guest_free_page_hint of block {int(r['ca_gfn']):#x}" if r["clr_in_apply"]
                 else f"tid {int(r['clr_tid'])}, outside any hint apply")
        if c is not None and np.isfinite(r["w_ns"]) and int(c["enter_ns"]) <= r["w_ns"]:
            # KVM walks the mask in page order during the ioctl: a write inside the call that is
            # lost came before KVM reached its page
            where += f"; the write fell inside this {(int(c['ts_ns']) - int(c['enter_ns'])) / 1e3:.0f} us call"
        gap = (f", {(r['clr_ns'] - r['w_ns']) / 1e6:.3f} ms after the write" if np.isfinite(r["w_ns"]) else "")
        ev.append((_t(r["clr_ns"]), "kvm", f"KVM_CLEAR_DIRTY_LOG {what} mask holds gfn {g:#x}: re-armed, dirty bit "
                                           f"dropped ({where}{gap})"))
    if np.isfinite(r["a_end_ns"]):
        ev.append((_t(r["a_end_ns"]), "qemu", "hint_apply returns: the page's migration-bitmap bit is cleared"))
    later = []
    if np.isfinite(r["send_after_ns"]):
        later.append(f"sent at {_t(r['send_after_ns'])}")
    if np.isfinite(r["harvest_after_ns"]):
        later.append(f"harvested at {_t(r['harvest_after_ns'])}")
    ev.append((done_ns, "qemu", f"migration completed; gfn {g:#x} after the write: "
                                + ("; ".join(later) if later else f"never sent ({send_source}), never harvested")))
    ev.sort(key=lambda e: e[0] if e[0] >= 0 else np.inf)
    ev.append((done_ns, "memcheck", f"destination gfn {g:#x} stale: holds seq {int(r['dst_seq'])}, source holds "
                                    f"seq {int(r['src_seq'])}"))
    return ev


SENTENCES = {
    "rearm-wipe": "{n} page(s) the guest wrote after making their hint available (round {rnd}) were dirty and "
                  "unarmed, so the write left no trace; the KVM_CLEAR_DIRTY_LOG inside the hint's apply re-armed "
                  "them and dropped their dirty bit, the apply cleared their migration-bitmap bit, and the "
                  "destination kept a stale copy (manual-protect c'){tail}.",
    "lost-write": "{n} page(s) the guest wrote after making their hint available (round {rnd}) are stale on the "
                  "destination: a hint apply covering them returned after the write and no later send carried "
                  "them{tail}.",
    "lost-write-not-hint": "{n} page(s) the guest wrote after their hint (round {rnd}) are stale on the destination, "
                           "but no host apply of that hint followed the write: the hint did not hide it.",
}


def check(ctx: Context, covered: set, out: list) -> None:
    """Append findings (detector FINDING_COLUMNS dicts) and add every page explained here to
    ``covered`` (hinted pages the guest never rewrote too: they are not losses)."""
    P = explain(ctx.bundle, ctx)
    if P is None or not len(P):
        return
    covered.update(P["gfn"].astype(int).tolist())
    io = ctx.ioctls.drop_duplicates("seq").set_index("seq") if len(ctx.ioctls) else pd.DataFrame()
    qe = ctx.qe
    fb = np.sort(qe.loc[qe["event"] == "sync_fetch_begin", "ts_ns"].to_numpy(np.int64)) if len(qe) else np.zeros(0)
    st = ctx.states
    done = st.loc[st["state"].astype(str) == "completed", "ts_ns"] if len(st) else pd.Series(dtype="int64")
    done_ns = int(done.iloc[0]) if len(done) else -1
    W = P[P["written"]]
    for (kind, conf, rnd), grp in W.groupby(["kind", "confidence", "h_round"], sort=True):
        g = np.sort(grp["gfn"].to_numpy(np.int64))
        r0 = grp.sort_values("gfn").iloc[0]
        tail = "" if conf == "confirmed" else " (the guest/host clock cannot order the write against the re-arm)"
        out.append({"kind": kind, "confidence": conf, "severity": SEVERITY[kind], "gfn_first": int(g[0]),
                    "gfn_last": int(g[-1]), "gfn_count": int(len(g)), "gfns": g[:MAX_GFNS].tolist(),
                    "evidence": _evidence(r0, P.attrs.get("send_source", "?"), io, fb, done_ns),
                    "sentence": SENTENCES[kind].format(n=len(g), rnd=int(rnd), tail=tail)})


def classify_guest_diffs(diff: pd.DataFrame, t: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, int]:
    """Differing destination pages of a Linux-guest run against the guest probe's hints, returns and
    reuse (``t``: the guest stream's tables): hinted-held (the device may skip them), hinted-returned
    (the guest took the block back before the switchover: a write the hint may have hidden) or
    lost-write (no hint involved).  Returns (frame of ``guest_page_diffs`` columns, switchover guest_ns)."""
    ev, hints, rets, reuse = t["guest_events"], t["guest_hints"], t["guest_returns"], t["guest_reuse"]
    done = ev[(ev["event"] == "cmd_id") & (ev["a0"] == guest_stream.CMD_ID_DONE)]
    if len(done):
        switch = int(done["guest_ns"].iloc[0])
    else:
        src_ns = pd.concat([ev.loc[ev["side"] == "src", "guest_ns"],
                            t["guest_reports"].loc[t["guest_reports"]["side"] == "src", "guest_ns"]])
        switch = int(src_ns.max()) if len(src_ns) else np.iinfo(np.int64).max
    writer = set(t["guest_writer_pages"]["pfn"].astype(np.uint64).tolist())
    rows = []
    for r in diff.itertuples(index=False):  # differing pages are few (memdiff), not a hot path
        gfn = int(r.gfn)
        blk = (gfn >> guest_stream.HINT_ORDER) << guest_stream.HINT_ORDER
        hb = hints[(hints["pfn"] == blk) & (hints["guest_ns"] < switch)]
        h = int(hb["guest_ns"].max()) if len(hb) else -1
        ret = -1
        reused = False
        if h >= 0:
            rb = rets[(rets["pfn"] == blk) & (rets["guest_ns"] > h) & (rets["guest_ns"] < switch)
                      & (rets["reason"] != "done")]
            ret = int(rb["guest_ns"].min()) if len(rb) else -1
            if ret >= 0:
                reused = bool(((reuse["block_pfn"] == blk) & (reuse["guest_ns"] > ret)).any())
        cls = "lost-write" if h < 0 else ("hinted-returned" if ret >= 0 else "hinted-held")
        rows.append((gfn, blk, cls, h, ret, reused, gfn in writer, bool(r.src_zero), bool(r.dst_zero)))
    cols = ["gfn", "block_pfn", "cls", "hinted_ns", "returned_ns", "reused", "writer_page", "src_zero", "dst_zero"]
    out = pd.DataFrame(rows, columns=cols).astype({"gfn": np.uint64, "block_pfn": np.uint64, "hinted_ns": np.int64,
                                                     "returned_ns": np.int64, "reused": bool, "writer_page": bool,
                                                     "src_zero": bool, "dst_zero": bool})
    return out, switch
