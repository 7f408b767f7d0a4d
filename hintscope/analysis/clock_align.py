"""Guest -> host clock: an offset band for delta = host_ns - guest_ns from causal pairs (protocol §4 Clocks).

Pairs used (each gives one side of the band, never a point):

* host AFTER_BITMAP_SYNC k publishes id N_k; a guest read of N_k (guest_events ``cmd_id``) comes after
  it: delta > h_after_k - g.  The id stays published at most until the next BEFORE: delta <
  h_before_{k+1} - g.
* host ``notify_config`` -> guest ``config_changed``: delta > h - g, using the latest notify the
  upper bound allows (pairs that contradict the band are dropped, not trusted).
* guest hint add -> host apply of that block: g_add + delta < h_apply, so delta < h_apply - g.

A linear drift term is fitted only when a constant offset contradicts the pairs.  The band's
width says how finely guest events can be ordered against host events; orderings it cannot
settle are reported as ambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

CMD_ID_MIN = 0x80000000


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
    # 3. hint add -> apply of the same block (first apply after the add is a bound even if later)
    if len(applies) and len(hints):
        a = pd.DataFrame({"gfn": hint_gfn0, "ts": applies["ts_ns"].to_numpy(np.int64)})
        h = pd.DataFrame({"gfn": hints["pfn"].to_numpy().astype(np.int64),
                          "g": hints["guest_ns"].to_numpy(np.int64)})
        m = a.merge(h, on="gfn")
        # the matching hint is the latest one before the apply; any earlier add also bounds delta
        # from above only if it precedes that apply causally, which holds for every add of the block
        # queued before it. Keep the tightest: per apply, the latest add.
        if len(m):
            m["u"] = m["ts"] - m["g"]
            m = m[m["u"] > 0] if np.isfinite(np.nanmedian(m["u"])) else m
            best = m.groupby(["gfn", "ts"], sort=False)["u"].min()
            ut.append(best.index.get_level_values("ts").to_numpy(np.float64)); uv.append(best.to_numpy(np.float64))
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
    # 2. notify -> config_changed lower bounds, using the current upper bound to pick the notify
    if len(uv):
        hi0 = float(np.min(uv))
        qe_ts = qe["ts_ns"].to_numpy(np.int64)
        nt = np.sort(qe_ts[qe["event"].to_numpy() == "notify_config"])
        gc = ge.loc[ge["event"] == "config_changed", "guest_ns"].to_numpy(np.int64)
        if len(nt) and len(gc):
            i = np.searchsorted(nt, gc + hi0, side="right") - 1
            ok = i >= 0
            cand = nt[i[ok]] - gc[ok] + 0.0
            lt = np.r_[lt, nt[i[ok]] + 0.0]
            lv = np.r_[lv, cand]
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
