"""Lost writes: confirmed from guest writes plus sends, from the memory check, or with no hint involved.

Protocol notes §4 (c) and (c'), and the migration's own losses (``lost-write-not-hint``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hintscope.analysis import lost_pages
from hintscope.analysis.context import EVERY_PAGE_SOURCES
from hintscope.analysis.facts import Facts, _expand, _hex, _uniq, last_at, last_guest_event
from hintscope.analysis import pagestate as ps
from hintscope.analysis.pagestate import NONE
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
    # the guest's last balloon event of each page: a reuse after its last hint (ties: the hint)
    reuse = reuse.reset_index(drop=True)
    pg, kind, row = last_guest_event(f, [(reuse, 1), (f.hints, 0)])
    sel = kind == 1
    gfn, row = pg[sel], row[sel]
    w_lo, w_hi = reuse["lo"].to_numpy(float)[row], reuse["hi"].to_numpy(float)[row]
    if not len(gfn) or not np.isfinite(w_lo).all():
        if len(gfn):
            f.problems.append("guest reuse events cannot be placed on the host clock; lost writes not checked")
        return
    h_last = last_at(f, "H", gfn)
    h_after = np.where(h_last > w_lo, h_last, -np.inf)
    harvested = np.isfinite(h_after)
    # earliest time the write a harvest shows can have happened: the page's re-arm before it
    rearm = np.where(harvested, last_at(f, "Rb", gfn), -np.inf)
    E_lo = np.where(harvested, np.maximum(w_lo, rearm), w_lo)
    E_hi = np.where(harvested, h_after, w_hi)
    s_last = last_at(f, "S", gfn)
    a_last = last_at(f, "A", gfn)
    c_last = last_at(f, "C", gfn)
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
    """Dirty pages a sync harvested that were never sent afterwards and no hint touched: not a hint problem.

    On the dense per-page arrays of the sweep (pagefacts): H last harvest, Rb the re-arm before it
    (the earliest time the harvested write can have happened), S last send, A last apply."""
    covered, out = run.covered, run.out
    st = f.st
    if not len(f.harvest) or st is None:
        return
    S = st.S
    n = st.index.size
    # an apply after the earliest write time means a hint may have covered the write legally
    # (the page freed and hinted after it); reused pages are judged by lost_writes.  H, A, Rb are
    # time ranks (A <= Rb compares as times); S is ns: compared in chunks, no page-sized int64 copies.
    lost = np.zeros(n, bool)
    sure = np.zeros(n, bool)
    step = 1 << 22
    for a in range(0, n, step):
        b = min(n, a + step)
        h, rb = st.H[a:b], st.Rb[a:b]
        s = S[a:b]
        lost[a:b] = (h != st.never) & (s < st.ns(h)) & (st.A[a:b] <= rb)
        sure[a:b] = s < st.ns(rb)
    if not lost.any():
        return
    if len(f.hints):
        hi_, hg = _expand(f.hints["pfn"].to_numpy().astype(np.int64), f.hints["order"].to_numpy())
        hint_hi = pd.Series(f.hints["hi"].to_numpy(float)[hi_], index=hg).groupby(level=0).max()
        d = st.index.to_idx(hint_hi.index.to_numpy(np.int64))
        k = d >= 0
        d, hh = d[k], hint_hi.to_numpy()[k]
        rbt = st.ns(st.Rb[d])
        rb = np.where(rbt != NONE, rbt.astype(float), -np.inf)
        lost[d[hh > rb]] = False
    if covered:
        d = st.index.to_idx(np.fromiter(covered, np.int64, len(covered)))
        lost[d[d >= 0]] = False
    if st is not None and f.ctx is not None and f.ctx.send_seen is not None:
        lost &= f.ctx.send_seen     # pages of blocks the send source does not decode prove nothing
    if not lost.any():
        return
    sure &= lost
    for conf, sel, why in (("confirmed", sure, "no send since the page was last re-armed, so the write is lost"),
                           ("hazard", lost & ~sure, "a send between the re-arm and the harvest may have carried "
                            "the write")):
        if not sel.any():
            continue
        pages = ps.PageMarks(st.index, sel)
        i0 = int(np.flatnonzero(sel)[0])
        g0 = int(st.index.to_gfn(np.array([i0]))[0])
        s0 = float(S[i0]) if S[i0] != NONE else -np.inf
        out.append(finding("lost-write-not-hint", conf, pages,
                            [(float(st.ns(st.H[i0:i0 + 1])[0]), "kvm", f"last harvest of gfn {_hex(g0)}"),
                             (s0 if np.isfinite(s0) else 0, "qemu",
                              "last page_send (before the harvest)" if np.isfinite(s0) else "never sent")],
                            f"{len(pages)} page(s) a sync reported dirty were never sent afterwards and no "
                            f"hint touched them ({why}): a migration loss with no hint involved."))
        covered.update(pages.gfns().tolist())


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
    if covered:
        gfn = gfn[~np.isin(gfn, np.fromiter(covered, np.int64, len(covered)))]
    if not len(gfn):
        return
    applied = np.isfinite(last_at(f, "A", gfn))
    if len(f.hints) or len(f.reuse):
        # the last guest event of each differing page (ties: the reuse)
        pg, kind, _ = last_guest_event(f, [(f.hints, 0), (f.reuse, 1)])
        pos = np.searchsorted(pg, gfn)
        found = (pos < len(pg)) & (pg[np.minimum(pos, max(len(pg) - 1, 0))] == gfn) if len(pg) else \
            np.zeros(len(gfn), bool)
        lk = np.where(found, kind[np.minimum(pos, max(len(pg) - 1, 0))] if len(pg) else -1, -1)
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
