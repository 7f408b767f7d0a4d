"""Host epochs for the detector: syncs from the precopy notifier and fetch uprobes, with the cmd id of each epoch.

Sync d = BEFORE_d (precopy_notify reason 1) -> fetch window [d_s, d_e] (sync_fetch_begin/_end)
-> AFTER_d (reason 2).  Epoch k = [AFTER_k, BEFORE_{k+1}); its id is 0x80000001 + k for every
AFTER while the VM runs.  The final sync (``syncs.final_syncs``: the first after QEMU's
PRECOPY_NOTIFY_COMPLETE) opens no epoch: its AFTER sets DONE.  Missing fetch events fall back to
BEFORE/AFTER.

The rows and their ``sync`` numbers are those of ``analysis/syncs.py`` (same boundary events, same
numbering), so a finding's "sync N" is row N of the analysis' sync table.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hintscope.analysis import syncs
from hintscope.protocol import CMD_ID_MIN  # noqa: F401 (re-exported)

SYNC_COLS = ["sync", "before", "fetch_begin", "fetch_end", "after", "final", "epoch_id"]


def sync_table(ctx) -> pd.DataFrame:
    """The detector's view of ``syncs.sync_table(ctx)`` (the same rows and numbers): ``SYNC_COLS``.

    Only syncs the host uprobes bound (source notify or fetch): the ordering checks need their
    windows on the probe's clock.  A missing fetch event falls back to BEFORE/AFTER; a missing AFTER
    is "never" (BIG).
    """
    s = syncs.sync_table(ctx)
    if not len(s) or s["source"].iloc[0] not in ("notify", "fetch"):
        return pd.DataFrame({c: pd.Series(dtype="int64") for c in SYNC_COLS})
    big = np.iinfo(np.int64).max
    fs, fe = s["fetch_start_ns"].to_numpy(np.int64), s["fetch_end_ns"].to_numpy(np.int64)
    before = np.where(s["before_ns"] >= 0, s["before_ns"], fs).astype(np.int64)
    after = np.where(s["after_ns"] >= 0, s["after_ns"], big).astype(np.int64)
    fb = np.where(fs >= 0, fs, before)
    fe = np.where((fe >= 0) & (fe <= after), fe, np.where(after < big, after, fb))
    final = s["final"].to_numpy(bool)
    running_after = ~final & (after < big)
    epoch_id = np.where(running_after, CMD_ID_MIN + np.cumsum(running_after), 0)
    return pd.DataFrame({"sync": s["sync"].to_numpy(np.int64), "before": before, "fetch_begin": fb,
                         "fetch_end": fe, "after": after, "final": final, "epoch_id": epoch_id.astype(np.int64)})


def epoch_id_at(syncs: pd.DataFrame, t: np.ndarray) -> np.ndarray:
    """The id the host held at time t (the last AFTER before t while running), 0 before the first."""
    after = syncs["after"].to_numpy(np.int64)
    ids = syncs["epoch_id"].to_numpy(np.int64)
    ok = ids > 0
    a, i = after[ok], ids[ok]
    k = np.searchsorted(a, np.asarray(t, np.int64), side="right") - 1
    return np.where(k >= 0, i[np.maximum(k, 0)] if len(i) else 0, 0)
