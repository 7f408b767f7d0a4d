"""c' from host data alone: the apply's own KVM_CLEAR_DIRTY_LOG re-arms pages a guest write left unrecorded.

Under KVM manual dirty-log protect a page harvested dirty by KVM_GET_DIRTY_LOG stays writable
with its dirty bit set until QEMU clears its chunk; a write in between leaves no new trace.
``qemu_guest_free_page_hint`` clears every chunk still marked in ``clear_bmap`` before it drops
the hinted pages from the migration bitmap.  So for a hinted page p that was harvested dirty at h
and not re-armed since, the apply's CLEAR at c re-arms p and drops its dirty bit, and the apply
then clears p's migration-bitmap bit: a write to p in [max(h, cmd id issued), c] is sent by no one.
VIRTIO 1.2 §5.5.6.5 lets the guest make that write (it reused the page after hinting it), and the
device must keep it.

This is decided on the host alone: the apply's entry and return (uprobe), the CLEAR masks on the
same thread between them (ioctl probe), the GET harvests and earlier CLEARs of each page.  The
finding is a ``hazard`` with its exposure (pages and window); whether this guest actually wrote
is a matter for the confirming checks (guest writes, memory check).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hintscope.analysis import epochs
from hintscope.analysis.context import EVERY_PAGE_SOURCES
from oracle_perpage.facts import BIG, Facts, _hex
from hintscope.analysis.findings import EXPOSURE_COLUMNS, finding


def _apply_bounds(f: Facts) -> pd.DataFrame:
    """Applies with ``bound``: the return, or, when it was lost, the next entry on the thread."""
    A = f.applies.sort_values(["tid", "a"], kind="stable")
    a, tid = A["a"].to_numpy(np.int64), A["tid"].to_numpy(np.int64)
    nxt = np.where(np.r_[tid[1:] == tid[:-1], False], np.r_[a[1:], BIG], BIG)
    return A.assign(bound=np.where(A["end_known"].to_numpy(bool), A["a_end"].to_numpy(np.int64), nxt))


def _in_apply(f: Facts, A: pd.DataFrame) -> np.ndarray:
    """Per row of f.clears: issued inside a hint apply (same thread, between entry and bound)."""
    C = f.clears
    if not len(A) or not len(C):
        return np.zeros(len(C), bool)
    m = pd.merge_asof(C[["ts_ns", "tid"]].reset_index().sort_values("ts_ns"),
                      A[["a", "tid", "bound"]].sort_values("a"), left_on="ts_ns", right_on="a", by="tid",
                      direction="backward")
    m = m.sort_values("index")
    return (m["a"].notna() & (m["ts_ns"] <= m["bound"])).to_numpy()


def _asof(q: pd.DataFrame, on: str, src: pd.DataFrame, cols: list[str], exact: bool) -> pd.DataFrame:
    """Per row of q (gfn, ``on``): the src row (ts_ns, cols) of the same gfn last before it."""
    r = src[["ts_ns", "gfn", *cols]].rename(columns={"ts_ns": "t_" + on})
    x = pd.merge_asof(q.reset_index().sort_values(on), r.sort_values("t_" + on), left_on=on, right_on="t_" + on,
                      by="gfn", direction="backward", allow_exact_matches=exact)
    return x.sort_values("index").drop(columns="index").reset_index(drop=True)


def _announced(f: Facts, after: np.ndarray) -> np.ndarray:
    """Per AFTER_BITMAP_SYNC (sorted): when the guest could first see the new cmd id.

    The device bumps the id and raises the config interrupt (``notify_config``) inside the AFTER
    notifier; a CLEAR the migration thread issues in the notifier before that (a re-arm ahead of
    the id) comes before the window opens. Without a notify_config in the epoch, the AFTER entry."""
    qe = f.qe if isinstance(f.qe, pd.DataFrame) else pd.DataFrame()
    if not len(after) or not len(qe) or "event" not in qe:
        return after
    nc = np.sort(qe.loc[qe["event"] == "notify_config", "ts_ns"].to_numpy(np.int64))
    before = np.sort(f.syncs["before"].to_numpy(np.int64)) if len(f.syncs) else np.zeros(0, np.int64)
    j = np.searchsorted(nc, after, side="left")
    cand = np.where(j < len(nc), nc[np.minimum(j, max(len(nc) - 1, 0))] if len(nc) else BIG, BIG)
    nb = np.searchsorted(before, after, side="right")
    next_before = np.where(nb < len(before), before[np.minimum(nb, max(len(before) - 1, 0))] if len(before) else BIG, BIG)
    return np.where(cand < next_before, cand, after)


def exposure(f: Facts) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-page rows: apply, gfn, rearm_ns, harvest_ns, window_lo_ns, by_apply, sent_after; per-apply
    EXPOSURE_COLUMNS).

    A hinted page p of apply A is exposed when the last re-arm of p before A dropped it from the
    migration bitmap came after the cmd id of A's epoch was issued, p had been harvested dirty
    and not re-armed before that re-arm, and nothing sent p in between: a guest write in
    [max(harvest, id issued), re-arm] is then wiped and never sent.  The re-arm is the hint path's
    own CLEAR (inside an apply) or the migration thread's lazy chunk clear; page sends, when
    captured, clear a page that was sent between the re-arm and the drop (that send carried the write).
    """
    empty = pd.DataFrame(columns=EXPOSURE_COLUMNS)
    A = _apply_bounds(f)
    C = f.clears[f.clears["gfn"] >= 0]
    if not len(A) or not len(C):
        return pd.DataFrame(), empty
    C = C.assign(by_apply=_in_apply(f, A)[(f.clears["gfn"] >= 0).to_numpy()])
    P = f.apply_pages[["apply", "gfn"]].drop_duplicates()
    P = P.merge(A[["apply", "a", "bound"]], on="apply")
    P = P.assign(q=np.minimum(P["bound"].to_numpy(np.int64), BIG - 1))
    x = _asof(P, "q", C, ["by_apply"], exact=True).rename(columns={"t_q": "rearm_ns"})
    x = x[x["rearm_ns"].notna()].reset_index(drop=True)
    x["rearm_ns"] = x["rearm_ns"].astype(np.int64)
    prev = _asof(x.assign(r=x["rearm_ns"]), "r", C, [], exact=False)["t_r"].fillna(-np.inf).to_numpy(float)
    h = _asof(x.assign(r=x["rearm_ns"]), "r", f.harvest, [], exact=True)["t_r"].fillna(-np.inf).to_numpy(float)
    after = f.syncs["after"].to_numpy(np.int64) if len(f.syncs) else np.zeros(0, np.int64)
    after = np.sort(after[after < BIG])
    k = np.searchsorted(after, x["a"].to_numpy(np.int64), side="right") - 1
    announced = _announced(f, after)
    issued = np.where(k >= 0, announced[np.maximum(k, 0)] if len(after) else 0, -np.inf)
    have_sends = f.send_source in EVERY_PAGE_SOURCES and len(f.sends)
    if have_sends:
        s = f.sends[f.sends["gfn"] >= 0]
        sent_between = _asof(x, "q", s, [], exact=True)["t_q"].fillna(-np.inf).to_numpy(float) > x["rearm_ns"]
        last = s.groupby("gfn")["ts_ns"].max()
        sent_after = (last.reindex(x["gfn"]).fillna(-1).to_numpy(np.int64) > x["q"].to_numpy(np.int64))
    else:
        sent_between = np.zeros(len(x), bool)
        sent_after = np.full(len(x), -1)
    ok = np.isfinite(h) & (h > prev) & (x["rearm_ns"].to_numpy(float) > issued) & ~sent_between
    x = x.assign(harvest_ns=h, window_lo_ns=np.maximum(h, issued), sent_after=np.asarray(sent_after, np.int64),
                 epoch_id=epochs.epoch_id_at(f.syncs, x["a"].to_numpy(np.int64)) if len(f.syncs) else 0)[ok]
    if not len(x):
        return x, empty
    g = x.groupby("apply")
    sa = g["sent_after"]
    per = pd.DataFrame({
        "apply": g.size().index.to_numpy(np.int64),
        "clear_ns": g["rearm_ns"].min().to_numpy(np.int64),
        "epoch_id": g["epoch_id"].first().to_numpy(np.int64),
        "window_lo_ns": g["window_lo_ns"].min().to_numpy(float).astype(np.int64),
        "window_hi_ns": g["rearm_ns"].max().to_numpy(np.int64),
        "exposed_pages": g.size().to_numpy(np.int64),
        "sent_after": np.where(sa.min().to_numpy() < 0, -1, sa.sum().to_numpy()),
    })
    per = per.merge(f.applies[["apply", "tid", "a", "a_end", "npages"]].rename(
        columns={"a": "apply_ns", "a_end": "apply_end_ns", "npages": "hinted_pages"}), on="apply")
    return x, per[EXPOSURE_COLUMNS]


def rearm_in_apply(f: Facts, run) -> None:
    if f.mode != "manual" or not len(f.applies):
        return
    pages, per = exposure(f)
    run.exposure = per
    if not len(per):
        return
    p0 = per.iloc[0]
    first = pages[pages["apply"] == p0["apply"]]
    by_apply = bool(first["by_apply"].astype(bool).all())
    n, napp = int(pages["gfn"].nunique()), int(len(per))
    sends = ""
    if (per["sent_after"] >= 0).all():
        never = int((pages.groupby("gfn")["sent_after"].max() == 0).sum())
        sends = (f" {never} of them were never sent after their apply ({f.send_source}), so any such write "
                 f"would be missing on the destination.")
    ev = [(float(first["harvest_ns"].min()), "kvm", "KVM_GET_DIRTY_LOG harvests the pages dirty; they stay writable "
                                                    "and unrecorded until re-armed"),
          (float(p0["window_lo_ns"]), "qemu", f"cmd id {_hex(p0['epoch_id'])} issued: the guest may hint and reuse"
           if p0["epoch_id"] else "window opens"),
          (int(p0["apply_ns"]), "qemu", f"hint_apply gfn {_hex(first['gfn'].min())} ({int(p0['hinted_pages'])} pages)"),
          (int(p0["clear_ns"]), "kvm", f"KVM_CLEAR_DIRTY_LOG {'inside a hint apply' if by_apply else 'of the migration thread'}"
                                       f" re-arms {int(p0['exposed_pages'])} pages of this hint and drops their "
                                       f"dirty bits"),
          (int(p0["apply_end_ns"]), "qemu", "apply returns: migration-bitmap bits cleared")]
    ev.sort(key=lambda e: e[0])
    span = (per["window_hi_ns"] - per["window_lo_ns"]).to_numpy(np.int64)
    run.out.append(finding(
        "rearm-in-apply", "hazard", pages["gfn"].to_numpy(np.int64), ev,
        f"{napp} hint apply(s) dropped {n} page(s) from the migration bitmap that a KVM_CLEAR_DIRTY_LOG had re-armed "
        f"after their cmd id was issued (inside qemu_guest_free_page_hint: {int(pages['by_apply'].astype(bool).sum())} "
        f"pages), while they were harvested dirty and not re-armed before (manual dirty-log protect): a guest "
        f"write to them after the cmd id and before that CLEAR (windows up to {span.max() / 1e6:.3f} ms, median "
        f"{np.median(span) / 1e6:.3f} ms) is recorded nowhere and never sent, so VIRTIO 1.2 5.5.6.5 reuse writes "
        f"are lost (c').{sends}"))
