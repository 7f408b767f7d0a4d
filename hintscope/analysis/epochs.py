"""Host epochs for the detector: syncs from the precopy notifier and fetch uprobes, with the cmd id of each epoch.

Sync d = BEFORE_d (precopy_notify reason 1) -> fetch window [d_s, d_e] (sync_fetch_begin/_end)
-> AFTER_d (reason 2).  Epoch k = [AFTER_k, BEFORE_{k+1}); its id is 0x80000001 + k for every
AFTER while the VM runs.  The final sync is the last one before migration reaches a final state
(its AFTER sets DONE, not a new id).  Missing fetch events fall back to BEFORE/AFTER.

The rows and their ``sync`` numbers are those of ``analysis/syncs.py`` (same boundary events, same
numbering), so a finding's "sync N" is row N of the analysis' sync table.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hintscope.analysis.qemu_states import FINAL_STATES
from hintscope.analysis.syncs import probe_boundary_events, sync_numbers
from hintscope.protocol import CMD_ID_MIN  # noqa: F401 (re-exported)

SYNC_COLS = ["sync", "before", "fetch_begin", "fetch_end", "after", "final", "epoch_id"]


def sync_table(qe: pd.DataFrame, states: pd.DataFrame) -> pd.DataFrame:
    """``qe``: ``Context.qe``; ``states``: ``Context.states`` (ts_ns, state name)."""
    before, after, fb, fe = probe_boundary_events(qe)
    if not len(before):
        # fetch-only capture: one sync per fetch window
        before = fb.copy()
    if not len(before):
        return pd.DataFrame({c: pd.Series(dtype="int64") for c in SYNC_COLS})
    big = np.iinfo(np.int64).max

    def first_after(x, t):
        i = np.searchsorted(x, t, side="left")
        return np.where(i < len(x), x[np.minimum(i, max(len(x) - 1, 0))] if len(x) else big, big)

    nxt_before = np.r_[before[1:], big]
    s_fb = first_after(fb, before)
    s_fb = np.where(s_fb < nxt_before, s_fb, before)
    s_fe = first_after(fe, s_fb)
    s_af = first_after(after, before)
    s_af = np.where(s_af < nxt_before, s_af, big)
    s_fe = np.where(s_fe <= np.minimum(s_af, nxt_before), s_fe, np.where(s_af < big, s_af, s_fb))
    st_ts = states["ts_ns"].to_numpy(np.int64)
    end_states = st_ts[states["state"].isin(FINAL_STATES).to_numpy() & (st_ts >= 0)]
    final = np.zeros(len(before), bool)
    if len(end_states):
        k = np.searchsorted(before, end_states.min(), side="left") - 1
        if k >= 0:
            final[k] = True
    running_after = ~final & (s_af < big)
    epoch_id = np.where(running_after, CMD_ID_MIN + np.cumsum(running_after), 0)
    return pd.DataFrame({"sync": sync_numbers(len(before)), "before": before, "fetch_begin": s_fb,
                         "fetch_end": s_fe, "after": s_af, "final": final, "epoch_id": epoch_id.astype(np.int64)})


def epoch_id_at(syncs: pd.DataFrame, t: np.ndarray) -> np.ndarray:
    """The id the host held at time t (the last AFTER before t while running), 0 before the first."""
    after = syncs["after"].to_numpy(np.int64)
    ids = syncs["epoch_id"].to_numpy(np.int64)
    ok = ids > 0
    a, i = after[ok], ids[ok]
    k = np.searchsorted(a, np.asarray(t, np.int64), side="right") - 1
    return np.where(k >= 0, i[np.maximum(k, 0)] if len(i) else 0, 0)
