"""Host-order checks: applies against sync windows and cmd ids (protocol notes §4 b, d1, d2, d4).

All four run on the host clock.  The hint's availability time and cmd id come from the host's
vq_pop uprobe when the capture has it (exact), else from the guest's hint adds through the
clock band.
"""

from __future__ import annotations

import numpy as np

from hintscope.analysis import epochs
from oracle_perpage.facts import BIG, Facts, _hex, _pages_of
from hintscope.analysis.findings import finding
from hintscope.analysis.qemu_states import FINAL_STATES


def _cols(f: Facts):
    s = f.syncs
    return (s["fetch_begin"].to_numpy(np.int64), s["fetch_end"].to_numpy(np.int64), s["after"].to_numpy(np.int64),
            s["before"].to_numpy(np.int64), s["sync"].to_numpy(np.int64))


def _src(r0) -> tuple[str, str]:
    return ("qemu", "vq pop of the hint") if bool(r0.get("pop", False)) else ("guest", "hint add (earliest host time)")


def stale_epoch(f: Facts, run) -> None:
    """(b) the hint was made available before a sync's fetch began, the apply came after it ended."""
    m = run.m
    run.flags["stale"] = run.flags["maybe"] = np.zeros(len(m), bool)
    if not len(f.syncs) or not len(m):
        return
    ds, de, _, _, num = _cols(f)
    a = m["a"].to_numpy(np.int64)
    ia = np.searchsorted(de, a, side="left")                      # syncs whose fetch ended before a
    hh, hl = m["h_hi"].to_numpy(float), m["h_lo"].to_numpy(float)
    known = np.isfinite(hh)
    j_hi = np.searchsorted(ds, np.where(known, hh, np.inf), side="right")
    j_lo = np.searchsorted(ds, np.where(known, hl, np.inf), side="right")
    stale = known & (ia > j_hi)
    maybe = known & ~stale & (ia > j_lo)
    run.flags["stale"], run.flags["maybe"] = stale, maybe
    for conf, sel in (("hazard", stale), ("ambiguous", maybe)):
        if not sel.any():
            continue
        rows = m[sel]
        d = j_hi[sel] if conf == "hazard" else j_lo[sel]
        for dk in np.unique(d):
            r = rows[d == dk]
            r0 = r.iloc[0]
            side, what = _src(r0)
            ev = [(r0["h_lo"], side, f"{what}: pfn {_hex(r0['gfn0'])} id {_hex(r0['h_id'])}"),
                  (ds[dk], "qemu", f"sync {num[dk]} fetch begins"),
                  (de[dk], "qemu", f"sync {num[dk]} fetch ends"),
                  (r0["a"], "qemu", f"hint_apply gfn {_hex(r0['gfn0'])} ({len(r)} applies)")]
            run.out.append(finding("stale-epoch-apply", conf, _pages_of(r["apply"].to_numpy(), f), ev,
                                   f"{len(r)} hint(s) made available before sync {num[dk]} fetched the dirty log "
                                   f"were applied after that fetch ended, so writes the sync caught can be dropped "
                                   f"from the migration bitmap" + ("" if conf == "hazard" else
                                                                  " (the clock band cannot settle the order)") + "."))


def during_sync(f: Facts, run) -> None:
    """d2: an apply overlapping [fetch begin, AFTER] of some sync."""
    m = run.m
    run.flags["during"] = np.zeros(len(m), bool)
    if not len(f.syncs) or not len(m):
        return
    ds, de, af, bf, num = _cols(f)
    a = m["a"].to_numpy(np.int64)
    ae = m["a_end"].to_numpy(np.int64)
    k = np.searchsorted(ds, ae, side="right") - 1
    endw = np.where(af[np.maximum(k, 0)] < BIG, af[np.maximum(k, 0)], de[np.maximum(k, 0)])
    during = (k >= 0) & (endw > a)
    run.flags["during"] = during
    if during.any():
        r = m[during]
        kk = k[during]
        r0 = r.iloc[0]
        k0 = int(kk[0])
        run.out.append(finding("apply-during-sync", "hazard", _pages_of(r["apply"].to_numpy(), f),
                               [(bf[k0], "qemu", f"sync {num[k0]} BEFORE_BITMAP_SYNC"),
                                (ds[k0], "qemu", f"sync {num[k0]} fetch begins"),
                                (r0["a"], "qemu", f"hint_apply gfn {_hex(r0['gfn0'])}"),
                                (int(endw[during][0]), "qemu", "AFTER_BITMAP_SYNC")],
                               f"{len(r)} hint apply(s) ran while a bitmap sync was fetching or merging "
                               f"(syncs {', '.join(map(str, num[np.unique(kk)[:6]]))}); QEMU stops hinting before "
                               f"each sync, so a bit the sync just set can be cleared."))


def impossible(f: Facts, run) -> None:
    """d4: after the final BEFORE, after DONE (CLEANUP) or after migration reached a final state."""
    m = run.m
    run.flags["impossible"] = np.zeros(len(m), bool)
    s = f.syncs
    if not len(s) or not len(m):
        return
    a = m["a"].to_numpy(np.int64)
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
    run.flags["impossible"] = late
    if late.any():
        r = m[late]
        run.out.append(finding("apply-when-impossible", "hazard", _pages_of(r["apply"].to_numpy(), f),
                               [(imposs_t, "qemu", "final sync BEFORE / DONE / final state"),
                                (r.iloc[0]["a"], "qemu", f"hint_apply gfn {_hex(r.iloc[0]['gfn0'])}")],
                               f"{len(r)} hint apply(s) ran after the final sync began (VM stopped, DONE or "
                               f"migration over), when no hint may be applied."))


def stale_id(f: Facts, run) -> None:
    """d1: the hint's id is not the id the host held when applying it (a pop with no start id counts)."""
    m = run.m
    if not len(f.syncs) or not len(m):
        return
    a = m["a"].to_numpy(np.int64)
    hid = m["h_id"].to_numpy(np.int64)
    host_id = epochs.epoch_id_at(f.syncs, a)
    z = np.zeros(len(m), bool)
    already = run.flags.get("stale", z) | run.flags.get("maybe", z) | run.flags.get("during", z) | \
        run.flags.get("impossible", z)
    popped = m["pop"].to_numpy(bool)
    # a guest hint without an id (0/1) says nothing about the host; a popped hint with none was
    # accepted without a start message: the host applied it under no id at all
    wrong = ((hid > 1) | popped) & (hid != host_id) & ~already
    if wrong.any():
        r = m[wrong]
        r0 = r.iloc[0]
        side, what = _src(r0)
        run.out.append(finding("stale-id-apply", "hazard", _pages_of(r["apply"].to_numpy(), f),
                               [(r0["h_lo"], side, f"{what}: id {_hex(r0['h_id']) if r0['h_id'] else 'none'}"),
                                (r0["a"], "qemu", f"hint_apply while host id {_hex(host_id[wrong][0])}")],
                               f"{len(r)} hint(s) were applied under a different cmd id than the one they were "
                               f"queued with (or with no start message at all)."))
