"""Lost writes: confirmed from guest writes plus sends, from the memory check, or with no hint involved.

Protocol notes §4 (c) and (c'), and the migration's own losses (``lost-write-not-hint``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hintscope.analysis import lost_pages
from hintscope.analysis.context import EVERY_PAGE_SOURCES
from oracle_perpage.facts import Facts, _expand, _hex, _last_by_gfn, _rearm_before, _uniq
from hintscope.analysis.findings import finding


def lost_writes(f: Facts, run) -> None:
    """(c) and (c'): guest writes to reused hinted pages that no send carried and no later sync caught.

    A page counts when the guest's last balloon event for it is a reuse (it was written after its
    last hint).  Its last write evidence L is the reuse or a later harvest of it; the write is lost
    when no send of the page follows L.  An apply of the page after the reuse makes the loss
    hint-caused: rearm-wipe when a KVM_CLEAR_DIRTY_LOG re-armed the page after the write with no
    harvest since (c'), lost-write otherwise.  Returns the gfns reported (to keep them out of the
    host-only check).
    """
    covered, out = run.covered, run.out
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
        return
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
        return
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
    have_sends = f.send_source in EVERY_PAGE_SOURCES
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
            out.append(finding(kind, conf, gfn[sel], [(int(t), s, e) for t, s, e in ev], sentence))
            if conf != "ambiguous":
                covered.update(gfn[sel].tolist())


def host_losses(f: Facts, run) -> None:
    """Dirty pages a sync harvested that were never sent afterwards and no hint touched: not a hint problem."""
    covered, out = run.covered, run.out
    if not len(f.harvest):
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
    seen = f.ctx.send_gfns if f.ctx is not None else None
    if seen is not None:
        lost &= np.isin(gfn, seen)      # pages of blocks the send source does not decode prove nothing
    if not lost.any():
        return
    sure = lost & (s < lo)
    for conf, sel, why in (("confirmed", sure, "no send since the page was last re-armed, so the write is lost"),
                           ("hazard", lost & ~sure, "a send between the re-arm and the harvest may have carried "
                            "the write")):
        if not sel.any():
            continue
        i0 = int(np.flatnonzero(sel)[0])
        out.append(finding("lost-write-not-hint", conf, gfn[sel],
                            [(h[i0], "kvm", f"last harvest of gfn {_hex(gfn[i0])}"),
                             (s[i0] if np.isfinite(s[i0]) else 0, "qemu",
                              "last page_send (before the harvest)" if np.isfinite(s[i0]) else "never sent")],
                            f"{int(sel.sum())} page(s) a sync reported dirty were never sent afterwards and no "
                            f"hint touched them ({why}): a migration loss with no hint involved."))
        covered.update(gfn[sel].tolist())


def memcheck(f: Facts, run) -> None:
    """Destination pages that differ (lab ``lost_pages``): classify those no finding explains yet."""
    covered, out = run.covered, run.out
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
            out.append(finding(kind, conf, gfn[sel], [(0, "memcheck", f"gfn {_hex(gfn[sel][0])} differs")],
                                f"{int(sel.sum())} {sent}."))



def lab_lost_pages(f: Facts, run) -> None:
    """The lab guest's write log against the memory check (lost_pages.py: rearm-wipe, lost-write)."""
    lost_pages.check(f.ctx, run.covered, run.out)
