"""d6: the sender idles in the bulk round while the guest hints (a performance finding)."""

from __future__ import annotations

import numpy as np

from oracle_perpage.facts import BIG, STALL_FACTOR, STALL_MIN_NS, Facts, _uniq
from hintscope.analysis.findings import finding


def bulk_stall(f: Facts, run) -> None:
    """d6: the sender idles at the start of (or during) the bulk round while the guest hints."""
    s = f.syncs
    if not len(s) or not len(f.sends):
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
        if not napply:
            return      # an idle sender with no hint applied meanwhile is rate limiting, not hinting
        bulk = f"sync {int(s['sync'].iloc[0])} AFTER_BITMAP_SYNC: bulk round starts"
        run.out.append(finding("bulk-stall", "confirmed", [], [(t1, "qemu", bulk), (t0, "qemu", "sender idle from"),
                                                            (t0 + g, "qemu", "next page_send")],
                            f"the migration thread sent nothing for {g / 1e6:.1f} ms in the bulk round "
                            f"({napply} hint applies in that gap; median gap between sends {med / 1e3:.1f} us), "
                            f"so the bulk round waited on hinting instead of sending."))

