"""Guest -> host clock: an offset band for delta = host_ns - guest_ns from causal pairs (protocol §4 Clocks).

Pairs used (each gives one side of the band, never a point):

* host AFTER_BITMAP_SYNC k publishes id N_k; a guest read of N_k (guest_events ``cmd_id``) comes after
  it: delta > h_after_k - g.  The id stays published at most until the next BEFORE: delta <
  h_before_{k+1} - g.
* (not used) host ``notify_config`` -> guest ``config_changed``: the pairing is not unique (BEFORE and
  AFTER notify tens of microseconds apart), and a wrong pairing gives a bound beyond the truth.
* guest hint add -> host apply of that block: g_add + delta < h_apply, so delta < h_apply - g.

A linear drift term is fitted only when a constant offset contradicts the pairs.  The band's
width says how finely guest events can be ordered against host events; orderings it cannot
settle are reported as ambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from hintscope.protocol import CMD_ID_MIN



@dataclass
class ClockBand:
    lo: float = -np.inf          # delta lower bound at t = 0 (ns)
    hi: float = np.inf           # delta upper bound at t = 0 (ns)
    slope: float = 0.0           # d(delta)/d(host t)
    n_lower: int = 0
    n_upper: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def known(self) -> bool:
        return np.isfinite(self.lo) and np.isfinite(self.hi)

    @property
    def width_ns(self) -> float:
        return float(self.hi - self.lo) if self.known else np.inf

    def to_host(self, guest_ns) -> tuple[np.ndarray, np.ndarray]:
        """Earliest and latest host time each guest time can be (float ns; inf when the band is unknown)."""
        g = np.asarray(guest_ns, dtype=np.float64)
        if not self.known:
            return np.full(g.shape, -np.inf), np.full(g.shape, np.inf)
        mid = (self.lo + self.hi) / 2
        t = g + mid                                   # drift is tiny: host time to first order
        return g + self.lo + self.slope * t, g + self.hi + self.slope * t

    def summary(self) -> dict:
        return {"delta_lo_ns": None if not np.isfinite(self.lo) else int(self.lo),
                "delta_hi_ns": None if not np.isfinite(self.hi) else int(self.hi),
                "width_ns": None if not self.known else int(self.width_ns), "slope": self.slope,
                "lower_pairs": self.n_lower, "upper_pairs": self.n_upper, "notes": list(self.notes)}


def _pairs(qe: pd.DataFrame, ge: pd.DataFrame, applies: pd.DataFrame, hints: pd.DataFrame,
           hint_gfn0: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(t_lower, lower bounds, t_upper, upper bounds) of delta, all float64."""
    lt, lv, ut, uv = [], [], [], []
    ev = qe["event"].to_numpy()
    ts = qe["ts_ns"].to_numpy(np.int64)
    reason = qe["a1"].to_numpy().astype(np.int64)
    after = np.sort(ts[(ev == "precopy_notify") & (reason == 2)])
    before = np.sort(ts[(ev == "precopy_notify") & (reason == 1)])
    # 1. id reads: the k-th distinct running id belongs to the k-th AFTER
    rd = ge[ge["event"] == "cmd_id"]
    g = rd["guest_ns"].to_numpy(np.int64)
    val = rd["a0"].to_numpy().astype(np.int64)
    new = val >= CMD_ID_MIN
    if new.any() and len(after):
        k = val[new] - (CMD_ID_MIN + 1)
        ok = (k >= 0) & (k < len(after))
        gk, kk = g[new][ok], k[ok]
        lt.append(after[kk] + 0.0); lv.append(after[kk] - gk + 0.0)
        nxt = np.searchsorted(before, after[kk], side="right")
        has = nxt < len(before)
        ut.append(before[nxt[has]] + 0.0); uv.append(before[nxt[has]] - gk[has] + 0.0)
    # 3. hint add -> apply of the same block. A block can be hinted, returned and hinted again,
    # and a wrong pairing gives a bound below the truth, so only blocks added once and applied
    # once are used: their pairing cannot be wrong.
    if len(applies) and len(hints):
        ag = pd.Series(np.asarray(hint_gfn0, np.int64))
        hg = pd.Series(hints["pfn"].to_numpy().astype(np.int64))
        once = np.intersect1d(ag.value_counts().loc[lambda c: c == 1].index.to_numpy(),
                              hg.value_counts().loc[lambda c: c == 1].index.to_numpy())
        a = pd.DataFrame({"gfn": ag, "ts": applies["ts_ns"].to_numpy(np.int64)})
        h = pd.DataFrame({"gfn": hg, "g": hints["guest_ns"].to_numpy(np.int64)})
        m = a[a["gfn"].isin(once)].merge(h, on="gfn")
        if len(m):
            ut.append(m["ts"].to_numpy(np.float64)); uv.append((m["ts"] - m["g"]).to_numpy(np.float64))
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)
    return cat(lt), cat(lv), cat(ut), cat(uv)


def estimate(qe: pd.DataFrame, ge: pd.DataFrame, applies: pd.DataFrame, hints: pd.DataFrame,
             hint_gfn0: np.ndarray) -> ClockBand:
    """Band for delta from the host QEMU events, guest events, applies and guest hints.

    ``hint_gfn0``: first gfn of each apply (aligned with ``applies``), -1 when unmapped.
    """
    band = ClockBand()
    if not len(ge) and not len(hints):
        band.notes.append("no guest events: guest times cannot be placed on the host clock")
        return band
    lt, lv, ut, uv = _pairs(qe, ge, applies, hints, hint_gfn0)
    # hint add -> apply bounds are only upper bounds if the match is right: an apply of the same
    # block from an earlier hint gives a smaller (wrong) bound. Drop upper bounds far below the lower ones.
    if len(lv) and len(uv):
        floor = np.max(lv)
        keep = uv >= floor
        if (~keep).any():
            band.notes.append(f"{int((~keep).sum())} add->apply pairs contradict the id-read bounds and were ignored")
        ut, uv = ut[keep], uv[keep]
    band.n_lower, band.n_upper = len(lv), len(uv)
    if not len(lv) or not len(uv):
        band.notes.append("not enough causal pairs for a two-sided band "
                          f"({len(lv)} lower, {len(uv)} upper)")
        if len(lv):
            band.lo = float(np.max(lv))
        if len(uv):
            band.hi = float(np.min(uv))
        return band
    lo, hi = float(np.max(lv)), float(np.min(uv))
    if lo > hi:
        # drift: fit delta(t) = c + s t through the middle of the bounds, then recompute
        t = np.r_[lt, ut]
        y = np.r_[lv, uv]
        s = float(np.polyfit(t, y, 1)[0]) if len(np.unique(t)) > 1 else 0.0
        lo2, hi2 = float(np.max(lv - s * lt)), float(np.min(uv - s * ut))
        if lo2 <= hi2:
            band.slope, lo, hi = s, lo2, hi2
            band.notes.append(f"drift fitted: {s * 1e6:.2f} ppm")
        else:
            band.notes.append(f"causal pairs contradict each other by {lo2 - hi2:.0f} ns; band widened")
            band.slope, lo, hi = s, hi2, lo2
    band.lo, band.hi = lo, hi
    return band
