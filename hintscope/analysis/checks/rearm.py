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

from hintscope.analysis import epochs, pagefacts
from hintscope.analysis import pagestate as ps
from hintscope.analysis.context import EVERY_PAGE_SOURCES
from hintscope.analysis.facts import BIG, Facts, _hex
from hintscope.analysis.findings import EXPOSURE_COLUMNS, finding


def exposure(f: Facts) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-exposed-page summary: apply, gfn_min, harvest_ns, by_apply, never_sent; per-apply EXPOSURE_COLUMNS).

    A hinted page p of apply A is exposed when the last re-arm of p before A dropped it from the
    migration bitmap came after the cmd id of A's epoch was issued, p had been harvested dirty
    and not re-armed before that re-arm, and nothing sent p in between: a guest write in
    [max(harvest, id issued), re-arm] is then wiped and never sent.  The re-arm is the hint path's
    own CLEAR (inside an apply) or the migration thread's lazy chunk clear; page sends, when
    captured, clear a page that was sent between the re-arm and the drop (that send carried the write).

    Read at each apply's return by the sweep (pagefacts.page_state): no per-page rows.
    """
    empty = pd.DataFrame(columns=EXPOSURE_COLUMNS)
    st = f.st
    ex = st.exposure if st is not None else {}
    if not len(f.applies) or not ex:
        return pd.DataFrame(), empty
    have_sends = f.send_source in EVERY_PAGE_SOURCES and len(f.sends) > 0
    a = f.applies.set_index("apply")
    bound = pagefacts.apply_bounds(f.ctx.hint_applies) if f.ctx is not None else a["a_end"].to_numpy(np.int64)
    rows = sorted(ex)
    sent_any = np.zeros(st.index.size, bool) if have_sends else None
    recs = []
    for r in rows:
        e = ex[r]
        g = np.unique(e["g"])
        q = min(int(bound[r]), BIG - 1)
        if have_sends:
            sa = st.S[e["g"]] > q
            sent_any[e["g"][sa]] = True
            sent_after = int(sa.sum())
        else:
            sent_after = -1
        recs.append((r, e["rearm_min"], int(e["wlo_min"]), e["rearm_max"], len(e["g"]), sent_after,
                     int(st.index.to_gfn(g[:1])[0]), e["h_min"], e["all_by_apply"], e["by_apply"]))
    per = pd.DataFrame(recs, columns=["apply", "clear_ns", "window_lo_ns", "window_hi_ns", "exposed_pages",
                                      "sent_after", "gfn_min", "harvest_ns", "all_by_apply", "by_apply"])
    per["epoch_id"] = epochs.epoch_id_at(f.syncs, a.loc[per["apply"], "a"].to_numpy(np.int64)) if len(f.syncs) else 0
    per = per.merge(f.applies[["apply", "tid", "a", "a_end", "npages"]].rename(
        columns={"a": "apply_ns", "a_end": "apply_end_ns", "npages": "hinted_pages"}), on="apply")
    never = int((st.exposed & ~sent_any).sum()) if have_sends else -1
    return per.assign(never_sent=never), per[EXPOSURE_COLUMNS]


def rearm_in_apply(f: Facts, run) -> None:
    if f.mode != "manual" or not len(f.applies):
        return
    pages, per = exposure(f)
    run.exposure = per
    if not len(per):
        return
    p0 = per.iloc[0]
    first = pages.iloc[0]
    by_apply = bool(first["all_by_apply"])
    marks = ps.PageMarks(f.st.index, f.st.exposed)
    n, napp = len(marks), int(len(per))
    sends = ""
    if (per["sent_after"] >= 0).all():
        never = int(first["never_sent"])
        sends = (f" {never} of them were never sent after their apply ({f.send_source}), so any such write "
                 f"would be missing on the destination.")
    ev = [(float(first["harvest_ns"]), "kvm", "KVM_GET_DIRTY_LOG harvests the pages dirty; they stay writable "
                                              "and unrecorded until re-armed"),
          (float(p0["window_lo_ns"]), "qemu", f"cmd id {_hex(p0['epoch_id'])} issued: the guest may hint and reuse"
           if p0["epoch_id"] else "window opens"),
          (int(p0["apply_ns"]), "qemu", f"hint_apply gfn {_hex(first['gfn_min'])} ({int(p0['hinted_pages'])} pages)"),
          (int(p0["clear_ns"]), "kvm", f"KVM_CLEAR_DIRTY_LOG {'inside a hint apply' if by_apply else 'of the migration thread'}"
                                       f" re-arms {int(p0['exposed_pages'])} pages of this hint and drops their "
                                       f"dirty bits"),
          (int(p0["apply_end_ns"]), "qemu", "apply returns: migration-bitmap bits cleared")]
    ev.sort(key=lambda e: e[0])
    span = (per["window_hi_ns"] - per["window_lo_ns"]).to_numpy(np.int64)
    run.out.append(finding(
        "rearm-in-apply", "hazard", marks, ev,
        f"{napp} hint apply(s) dropped {n} page(s) from the migration bitmap that a KVM_CLEAR_DIRTY_LOG had re-armed "
        f"after their cmd id was issued (inside qemu_guest_free_page_hint: {int(pages['by_apply'].sum())} "
        f"pages), while they were harvested dirty and not re-armed before (manual dirty-log protect): a guest "
        f"write to them after the cmd id and before that CLEAR (windows up to {span.max() / 1e6:.3f} ms, median "
        f"{np.median(span) / 1e6:.3f} ms) is recorded nowhere and never sent, so VIRTIO 1.2 5.5.6.5 reuse writes "
        f"are lost (c').{sends}"))
