"""Per-sync table: one row per migration bitmap sync.

Sync boundaries, best source first (column ``source``):

* ``notify``: the precopy notifier uprobe (BEFORE = reason 1, AFTER = reason 2); the fetch window is
  the first ``sync_fetch_begin`` / ``sync_fetch_end`` after BEFORE;
* ``fetch``: ``sync_fetch_begin`` / ``_end`` only;
* ``qemu_trace``: QEMU's ``migration_bitmap_sync_start`` / ``_end`` (the window then also covers
  the OR into the migration bitmap);
* ``get_groups``: KVM_GET_DIRTY_LOG ioctls grouped into rounds (the first repeat of a slot, or a gap
  > ``GET_GAP_NS``, starts the next sync), or one sync per RESET_DIRTY_RINGS in dirty-ring mode.

Harvest: pages GET returned inside the window (``bitmap_words`` op=get popcount, else the
ioctl's ``pages``), per slot and in total; in ring mode the distinct pages pushed since the
previous window (``ring_pages`` counts the pushes).  Re-armed (manual protect): pages
CLEAR_DIRTY_LOG re-armed after this window and before the next one, split into those issued
by hint-applying threads (``qemu_guest_free_page_hint`` runs on the balloon iothread) and the
rest (the migration thread's lazy clear before sending); legacy GET and ring resets re-arm
what they harvest.

QEMU cross-check: ``qemu_dirty_pages`` is the ``migration_bitmap_sync_end`` argument.  In QEMU 7.2
(migration/ram.c ``migration_bitmap_sync``) that is ``rs->num_dirty_pages_period``: the pages
``ramblock_sync_dirty_bitmap`` newly set in the migration bitmap (bits already set are not
counted), summed over syncs until the rate period (>= 1 s since the last reset) ends.
``qemu_new_pages`` undoes the summing; ``est_new_pages`` is the comparable quantity computed
from the capture: harvested pages whose migration-bitmap bit was clear (sent, or hinted, since
their previous harvest; the bitmap starts all ones).  ``note`` explains known mismatches.

``incomplete``: the window from the previous sync's end to this sync's end overlaps a probe poll
interval in which the BPF side dropped events (meta ``lost_series``): this sync's counts may miss
records.  Losses recorded only as totals (no series) mark nothing here; the detector's verdict
looks at the totals.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hintscope.analysis import harvest
from hintscope.analysis.context import Context
from hintscope.bundle import Bundle
from hintscope.protocol import FINAL_STATES

GET_GAP_NS = 20_000_000
# Clock mapping of the QEMU log (microsecond stamps, anchor interpolation) is good to well under this.
TRACE_TOL_NS = 2_000_000
PERIOD_NS = 1_000_000_000

COLUMNS = [
    "sync", "source", "before_ns", "after_ns", "fetch_start_ns", "fetch_end_ns", "final", "epoch",
    "get_calls", "harvested", "harvested_by_slot", "ring_pages", "rearmed", "rearmed_by_hint", "clear_calls",
    "trace_start_ns", "trace_end_ns", "qemu_dirty_pages", "qemu_new_pages", "est_new_pages", "incomplete", "note",
]


# A real ioctl never covers more pages than this (2**40 pages = 4 PiB); hostile counts are clipped so
# sums stay exact in int64.
_MAX_PAGES = 1 << 40


def _sum_by(idx: np.ndarray, weights: np.ndarray, n: int) -> np.ndarray:
    """Exact integer per-sync sums (bincount would go through float64)."""
    out = np.zeros(n, np.int64)
    np.add.at(out, idx, np.clip(np.asarray(weights, dtype=np.int64), 0, _MAX_PAGES))
    return out


def _first_in(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """For each [lo, hi): the first value of sorted ``x`` inside, or -1."""
    i = np.searchsorted(x, lo, side="left")
    v = np.r_[x, np.iinfo(np.int64).max][i]
    return np.where(v < hi, v, -1).astype(np.int64)


# Syncs are numbered from 1 in capture order, here and in every other view of them (the detector's
# epochs, the report's timeline): "sync N" names the same sync everywhere.
FIRST_SYNC = 1


def sync_numbers(n: int) -> np.ndarray:
    return np.arange(FIRST_SYNC, FIRST_SYNC + n, dtype=np.int64)


def probe_boundary_events(qe: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sorted times of BEFORE_BITMAP_SYNC, AFTER_BITMAP_SYNC, fetch begin and fetch end uprobe rows.

    ``qe`` must be ``Context.qe`` (precopy rows of other notifier lists already dropped).  One sync
    per BEFORE, else one per fetch begin: the detector's epochs (analysis/epochs.py) use the same rows.
    """
    ev = qe["event"].to_numpy(dtype=object)
    ts = qe["ts_ns"].to_numpy(np.int64)
    a1 = qe["a1"].to_numpy().astype(np.int64)
    before = np.sort(ts[(ev == "precopy_notify") & (a1 == 1)])
    after = np.sort(ts[(ev == "precopy_notify") & (a1 == 2)])
    fb = np.sort(ts[ev == "sync_fetch_begin"])
    fe = np.sort(ts[ev == "sync_fetch_end"])
    return before, after, fb, fe


def final_syncs(start: np.ndarray, c: Context) -> np.ndarray:
    """Which syncs (by start time) are the final one: the sync ram_save_complete runs with the VM stopped.

    QEMU notifies PRECOPY_NOTIFY_COMPLETE (reason 3) right before it, so the final sync is the first
    that starts after that notify.  Without the notifier rows: the last sync that started before the
    migration reached a final state.
    """
    final = np.zeros(len(start), bool)
    if not len(start):
        return final
    qe = c.qe
    done = qe.loc[(qe["event"] == "precopy_notify") & (qe["a1"].to_numpy().astype(np.int64) == 3), "ts_ns"] \
        if len(qe) else pd.Series(dtype="int64")
    if len(done):
        k = int(np.searchsorted(start, int(done.min()), side="right"))
        if k < len(start):
            final[k] = True
        return final
    st = c.states
    end = st.loc[st["state"].isin(FINAL_STATES) & (st["ts_ns"] >= 0), "ts_ns"]
    if len(end):
        k = int(np.searchsorted(start, int(end.min()), side="left")) - 1
        if k >= 0:
            final[k] = True
    return final


def _boundaries(c: Context) -> tuple[pd.DataFrame, str]:
    tr, io = c.trace, c.ioctls
    before, after, fb, fe = probe_boundary_events(c.qe)
    big = np.iinfo(np.int64).max
    if len(before):
        nxt = np.r_[before[1:], big]
        fs = _first_in(fb, before, nxt)
        fend = np.where(fs >= 0, _first_in(fe, np.maximum(fs, 0), nxt), -1)
        return pd.DataFrame({"before_ns": before, "after_ns": _first_in(after, before, nxt),
                             "fetch_start_ns": fs, "fetch_end_ns": fend}), "notify"
    if len(fb):
        nxt = np.r_[fb[1:], big]
        return pd.DataFrame({"before_ns": -1, "after_ns": -1, "fetch_start_ns": fb,
                             "fetch_end_ns": _first_in(fe, fb, nxt)}), "fetch"
    t_ev = tr["event"].to_numpy(dtype=object)
    t_ts = tr["ts_ns"].to_numpy(np.int64)
    ts_start = np.sort(t_ts[t_ev == "migration_bitmap_sync_start"])
    if len(ts_start) and (ts_start >= 0).all():
        ts_end = np.sort(t_ts[t_ev == "migration_bitmap_sync_end"])
        nxt = np.r_[ts_start[1:], big]
        return pd.DataFrame({"before_ns": -1, "after_ns": -1, "fetch_start_ns": ts_start,
                             "fetch_end_ns": _first_in(ts_end, ts_start, nxt)}), "qemu_trace"
    get = io[io["name"] == "GET_DIRTY_LOG"]
    if not len(get):
        get = io[io["name"] == "RESET_DIRTY_RINGS"]
    if len(get):
        g = get.sort_values("enter_ns", kind="stable")
        s = g["enter_ns"].to_numpy(np.int64)
        e = g["ts_ns"].to_numpy(np.int64)
        # A sync GETs every logging slot once: the first repeat of a slot starts the next sync
        # (RESET_DIRTY_RINGS has no slot: every call is its own sync); so does a long gap.
        occ = g.groupby("slot").cumcount().to_numpy()
        runmax = np.maximum.accumulate(occ)
        new = np.r_[True, (runmax[1:] > runmax[:-1]) | (np.diff(s) > GET_GAP_NS)]
        start = s[new]
        end = np.maximum.reduceat(e, np.flatnonzero(new))
        return pd.DataFrame({"before_ns": -1, "after_ns": -1, "fetch_start_ns": start, "fetch_end_ns": end}), \
            "get_groups"
    return pd.DataFrame({c: pd.Series(dtype="int64") for c in
                         ["before_ns", "after_ns", "fetch_start_ns", "fetch_end_ns"]}), "none"


def windows(s: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Each sync's fetch window [start, end], falling back to BEFORE/AFTER, then to the QEMU trace ± tolerance."""
    st = np.where(s["fetch_start_ns"] >= 0, s["fetch_start_ns"],
                  np.where(s["before_ns"] >= 0, s["before_ns"], s["trace_start_ns"] - TRACE_TOL_NS))
    en = np.where(s["fetch_end_ns"] >= 0, s["fetch_end_ns"],
                  np.where(s["after_ns"] >= 0, s["after_ns"],
                           np.where(s["trace_end_ns"] >= 0, s["trace_end_ns"] + TRACE_TOL_NS, st)))
    return st.astype(np.int64), en.astype(np.int64)


def loss_intervals(meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """(since_ns, ts_ns) of every poll interval with lost events, from meta["lost_series"] (hostile-safe).

    Entries are ``[ts_ns, lost, since_ns]``; a missing ``since_ns`` is taken as one second before.
    """
    series = meta.get("lost_series")
    lo: list[int] = []
    hi: list[int] = []
    if isinstance(series, dict):
        for entries in series.values():
            if not isinstance(entries, list):
                continue
            for e in entries:
                if not (isinstance(e, list) and len(e) >= 2 and all(type(x) is int for x in e[:3])):
                    continue
                if e[1] <= 0:
                    continue
                ts = min(max(e[0], -2**62), 2**62)   # hostile values: keep int64 arithmetic exact
                lo.append(min(max(e[2], -2**62), 2**62) if len(e) >= 3 else ts - PERIOD_NS)
                hi.append(ts)
    return np.array(lo, dtype=np.int64), np.array(hi, dtype=np.int64)


def incomplete_windows(end: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """True for sync d when some loss interval [lo, hi] meets [end[d-1], end[d]] (first: (-inf, end[0]])."""
    n = len(end)
    if not len(lo) or not n:
        return np.zeros(n, dtype=bool)
    order = np.argsort(lo, kind="stable")
    lo_s = lo[order]
    reach = np.maximum.accumulate(hi[order])          # latest end among intervals starting before x
    start = np.r_[np.iinfo(np.int64).min, end[:-1]]
    k = np.searchsorted(lo_s, end, side="right")      # intervals with lo <= end[d]
    return (k > 0) & (reach[np.maximum(k - 1, 0)] >= start)


def _assign(t: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Index of the window containing each time, or -1 (windows sorted, non-overlapping)."""
    if not len(start):
        return np.full(len(t), -1, np.int64)
    d = np.searchsorted(start, t, side="right") - 1
    ok = (d >= 0) & (t <= end[np.maximum(d, 0)])
    return np.where(ok, d, -1)


def _between(t: np.ndarray, start: np.ndarray, end: np.ndarray, t_end: int) -> np.ndarray:
    """Index d with end[d] < t <= start[d+1] (after sync d, before the next one), or -1."""
    if not len(start):
        return np.full(len(t), -1, np.int64)
    d = np.searchsorted(end, t, side="left") - 1
    # Clamped: a hostile ts_ns of 2**63-1 must not overflow the sentinel.
    nxt = np.r_[start[1:], min(int(t_end), np.iinfo(np.int64).max - 1) + 1]
    ok = (d >= 0) & (t < nxt[np.maximum(d, 0)])
    return np.where(ok, d, -1)


def _match_trace(s: pd.DataFrame, tr: pd.DataFrame, source: str) -> None:
    ev = tr["event"].to_numpy(dtype=object)
    starts = tr[ev == "migration_bitmap_sync_start"].sort_values("ts_ns")
    ends = tr[ev == "migration_bitmap_sync_end"].sort_values("ts_ns")
    n = len(s)
    s["trace_start_ns"] = np.int64(-1)
    s["trace_end_ns"] = np.int64(-1)
    s["qemu_dirty_pages"] = np.int64(-1)
    s["_trace_wall_end"] = np.int64(-1)
    if not n or not len(starts):
        return
    t_st = starts["ts_ns"].to_numpy(np.int64)
    nxt = np.r_[t_st[1:], np.iinfo(np.int64).max]
    e_ts = ends["ts_ns"].to_numpy(np.int64)
    j = np.searchsorted(e_ts, t_st, side="left")
    has_end = (j < len(e_ts)) & (np.r_[e_ts, 0][np.minimum(j, len(e_ts))] < nxt)
    jj = np.minimum(j, max(len(e_ts) - 1, 0))
    t_en = np.where(has_end, e_ts[jj] if len(e_ts) else -1, -1)
    dp = np.where(has_end, ends["dirty_pages"].to_numpy(np.int64)[jj] if len(e_ts) else -1, -1)
    we = np.where(has_end, ends["wall_ns"].to_numpy(np.int64)[jj] if len(e_ts) else -1, -1)
    if source == "qemu_trace" or len(t_st) == n:
        k = np.arange(min(n, len(t_st)))  # same syncs, same order
        sk = k
    else:
        # Different counts (capture started late or ended early): match on time.
        ref = np.where(s["fetch_start_ns"] >= 0, s["fetch_start_ns"], s["before_ns"]).astype(np.int64)
        left = pd.DataFrame({"t": ref, "i": np.arange(n)}).sort_values("t")
        right = pd.DataFrame({"t": t_st, "k": np.arange(len(t_st))})
        m = pd.merge_asof(left, right, on="t", direction="nearest", tolerance=50 * TRACE_TOL_NS).dropna()
        sk, k = m["i"].to_numpy(np.int64), m["k"].to_numpy(np.int64)
    s.loc[sk, "trace_start_ns"] = t_st[k]
    s.loc[sk, "trace_end_ns"] = t_en[k]
    s.loc[sk, "qemu_dirty_pages"] = dp[k]
    s.loc[sk, "_trace_wall_end"] = we[k]


def _qemu_new(s: pd.DataFrame, tr: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """Per-sync pages QEMU newly set, from its cumulative num_dirty_pages_period (see module docstring)."""
    dp = s["qemu_dirty_pages"].to_numpy(np.int64)
    we = s["_trace_wall_end"].to_numpy(np.int64)
    ev = tr["event"].to_numpy(dtype=object)
    st_wall = np.sort(tr.loc[ev == "migration_bitmap_sync_start", "wall_ns"].to_numpy(np.int64))
    out = np.full(len(dp), -1, np.int64)
    notes = [""] * len(dp)
    period_start = int(st_wall[0]) if len(st_wall) else None
    prev = 0
    for d in range(len(dp)):  # one step per sync, not per event
        if dp[d] < 0:
            prev, period_start = 0, None
            continue
        out[d] = dp[d] - prev
        if out[d] < 0:
            out[d] = dp[d]
            notes[d] = "QEMU's period counter went down without a modelled reset; taken as a reset"
        prev = dp[d]
        if period_start is None:
            period_start = int(we[d])
        elif we[d] > period_start + PERIOD_NS:
            if abs(int(we[d]) - (period_start + PERIOD_NS)) < TRACE_TOL_NS:
                notes[d] = "rate-period reset too close to call from log times"
            prev, period_start = 0, int(we[d])
    return out, notes


def _est_new(c: Context, s: pd.DataFrame, sync_of_get: np.ndarray) -> np.ndarray:
    """Harvested pages whose migration-bitmap bit was clear at the sync (vectorised state replay per gfn)."""
    if c.send_source == "none":
        return np.full(len(s), -1, np.int64)
    from hintscope.analysis import pagefacts, pagestate as ps
    if len(c.get_ops):
        seq2sync = pd.Series(sync_of_get[1], index=sync_of_get[0])
        seq2sync = seq2sync[~seq2sync.index.duplicated()]  # seq is unique in a real capture
        sets = c.get_ops
        d = seq2sync.reindex(sets.x).fillna(-1).to_numpy(np.int64)
    elif len(c.ring_push) and len(s):
        # A ring push reaches the migration bitmap at the sync that collects it (end of its window)
        ro = pagefacts.ring_ops(c)          # x = push time, g0 = dense page (mapped pushes only)
        _, end = windows(s)
        dd = np.searchsorted(end, ro.x, side="left")
        g = ro.g0
        keep = dd < len(s)
        # a page pushed twice in one window is one set: est_new counts distinct pages per batch
        sets = ps.Ops.ranges(end[dd[keep]], g[keep], np.ones(int(keep.sum()), np.int64), dd[keep])
        d = sets.x
    else:
        return np.full(len(s), -1, np.int64)
    # compact: one sweep over the sets, sends and applies (pagefacts), no per-page rows
    return pagefacts.est_new(c, sets, d, len(s))


def _distinct_per_sync(sync: np.ndarray, slot: np.ndarray, page: np.ndarray, n: int) -> pd.Series:
    """Distinct (slot, page) per sync < n, counted per (sync, slot): one sort of packed int64 keys
    (pandas drop_duplicates on 10 M pushes took seconds)."""
    keep = (sync < n) & (page >= 0)
    sync, slot, page = sync[keep], slot[keep], page[keep]
    code, slots = pd.factorize(slot, sort=True)
    bp = max(int(page.max()).bit_length(), 1) if len(page) else 1
    bs = max(len(slots) - 1, 1).bit_length()
    bn = max(n, 1).bit_length()
    if bp + bs + bn <= 62:
        from hintscope.analysis.pagestate import distinct
        u = distinct((sync << (bs + bp)) | (code.astype(np.int64) << bp) | page)
        us, uc = u >> (bs + bp), (u >> bp) & ((1 << bs) - 1)
    else:
        d = pd.DataFrame({"s": sync, "c": code, "p": page}).drop_duplicates()
        us, uc = d["s"].to_numpy(np.int64), d["c"].to_numpy(np.int64)
    ns = max(len(slots), 1)
    c = np.bincount(us * ns + uc, minlength=n * ns).reshape(n, ns)
    d, k = np.nonzero(c)
    return pd.Series(c[d, k], index=pd.MultiIndex.from_arrays([d, np.asarray(slots)[k]], names=["sync", "slot"]))


def _get_pages_per_call(c: Context, get: pd.DataFrame) -> np.ndarray:
    w = c.words
    pages = get["pages"].to_numpy(np.int64)
    if len(w):
        wg = w[w["op"] == "get"]
        per_seq = pd.Series(harvest.run_popcount(wg), index=wg["seq"].to_numpy()).groupby(level=0).sum()
        from_words = per_seq.reindex(get["seq"].to_numpy()).to_numpy()
        pages = np.where(np.isnan(from_words), pages, np.nan_to_num(from_words)).astype(np.int64)
    return pages


def sync_table(b: Bundle | Context) -> pd.DataFrame:
    """The per-sync table (``COLUMNS``); see the module docstring for each column's source.

    Computed once per Context (the summary, the accounting and the detector share it)."""
    c = b if isinstance(b, Context) else Context(b)
    done = c.__dict__.get("_sync_table")
    if done is not None:
        return done
    s = _sync_table(c)
    c.__dict__["_sync_table"] = s
    return s


def _sync_table(c: Context) -> pd.DataFrame:
    s, source = _boundaries(c)
    s = s.reset_index(drop=True)
    n = len(s)
    s.insert(0, "sync", sync_numbers(n))
    s.insert(1, "source", source)
    _match_trace(s, c.trace, source)
    start, end = windows(s)

    # Epochs: AFTER_k opens epoch k unless the VM is stopped (the final sync).
    # Without notifier probes, AFTER is inferred: QEMU runs it right after every sync.
    final = final_syncs(np.where(s["before_ns"] >= 0, s["before_ns"], s["fetch_start_ns"]).astype(np.int64), c)
    s["final"] = final
    opens = ((s["after_ns"].to_numpy() >= 0) | (source != "notify")) & ~final
    s["epoch"] = np.where(opens, s["sync"], -1).astype(np.int64)

    io = c.ioctls
    get = io[(io["name"] == "GET_DIRTY_LOG") & (io["ret"] >= 0)]
    gd = _assign(get["ts_ns"].to_numpy(np.int64), start, end)
    gpages = _get_pages_per_call(c, get)
    ok = gd >= 0
    s["get_calls"] = np.bincount(gd[ok], minlength=n)[:n].astype(np.int64)
    harvested = _sum_by(gd[ok], gpages[ok], n)
    s["harvested"] = np.where(s["get_calls"] > 0, harvested, -1).astype(np.int64)
    by = pd.DataFrame({"sync": gd[ok], "slot": get["slot"].to_numpy()[ok], "pages": np.clip(gpages[ok], 0, _MAX_PAGES)})
    by = by.groupby(["sync", "slot"])["pages"].sum()
    txt = {d: ", ".join(f"{sl}:{p}" for (_, sl), p in grp.items()) for d, grp in by.groupby(level=0)}
    s["harvested_by_slot"] = [txt.get(d, "") for d in range(n)]
    unattributed = int((~ok).sum())
    if unattributed and n:
        c.problems.append(f"{unattributed} KVM_GET_DIRTY_LOG calls fall outside every sync window "
                          "(another dirty-log user, e.g. VGA, or a sync the sync source missed)")

    rp = c.ring_push
    if len(rp):
        # A push belongs to the first sync whose window ends at or after it.
        rd = np.searchsorted(end, rp["ts_ns"].to_numpy(np.int64), side="left")
        s["ring_pages"] = np.bincount(rd[rd < n], minlength=n)[:n].astype(np.int64)
        if not len(get):
            # A page can be pushed again after an intermediate reap/reset; QEMU gets the distinct pages.
            by = _distinct_per_sync(rd, rp["slot"].to_numpy(np.int64), rp["offset"].to_numpy().astype(np.int64), n)
            s["harvested"] = by.groupby(level=0).sum().reindex(range(n), fill_value=0).to_numpy(np.int64)
            txt = {d: ", ".join(f"{sl}:{p}" for (_, sl), p in grp.items()) for d, grp in by.groupby(level=0)}
            s["harvested_by_slot"] = [txt.get(d, "") for d in range(n)]
    else:
        s["ring_pages"] = np.int64(-1)

    clr = io[(io["name"] == "CLEAR_DIRTY_LOG") & (io["ret"] >= 0)]
    if len(clr):
        cpages = clr["pages"].to_numpy(np.int64)
        w = c.words
        if len(w):
            wc = w[w["op"] == "clear"]
            per_seq = pd.Series(harvest.run_popcount(wc), index=wc["seq"].to_numpy())
            per_seq = per_seq.groupby(level=0).sum()
            fw = per_seq.reindex(clr["seq"].to_numpy()).to_numpy()
            cpages = np.where(np.isnan(fw), cpages, np.nan_to_num(fw)).astype(np.int64)
        cpages = np.where(cpages >= 0, cpages, clr["num_pages"].to_numpy(np.int64))
        cd = _between(clr["ts_ns"].to_numpy(np.int64), start, end, c.end_ns)
        hint_tids = set(c.hint_applies["tid"].tolist())
        by_hint = clr["tid"].isin(hint_tids).to_numpy()
        okc = cd >= 0
        s["clear_calls"] = np.bincount(cd[okc], minlength=n)[:n].astype(np.int64)
        s["rearmed"] = _sum_by(cd[okc], cpages[okc], n)
        s["rearmed_by_hint"] = _sum_by(cd[okc & by_hint], cpages[okc & by_hint], n)
    elif not len(io) and len(c.trace) and (c.trace["event"] == "kvm_clear_dirty_log").any():
        tc = c.trace[c.trace["event"] == "kvm_clear_dirty_log"]
        cd = _between(tc["ts_ns"].to_numpy(np.int64), start, end, c.end_ns)
        okc = cd >= 0
        s["clear_calls"] = np.bincount(cd[okc], minlength=n)[:n].astype(np.int64)
        s["rearmed"] = _sum_by(cd[okc], tc["num_pages"].to_numpy(np.int64)[okc], n)
        s["rearmed_by_hint"] = np.int64(-1)
        if okc.any():
            c.problems.append("re-armed pages come from QEMU's kvm_clear_dirty_log trace: range sizes, an upper "
                              "bound on the pages actually re-armed (no ioctl probe)")
    else:
        s["clear_calls"] = np.int64(0 if len(io) else -1)
        s["rearmed"] = np.int64(-1)
        s["rearmed_by_hint"] = np.int64(-1)

    mode = c.dirty_mode
    if mode == "get":
        # Legacy dirty logging: KVM_GET_DIRTY_LOG itself re-arms every page it returns.
        s["rearmed"] = s["harvested"]
    elif mode == "ring" and len(rp):
        # KVM_RESET_DIRTY_RINGS re-arms the pages collected from the rings.
        s["rearmed"] = s["harvested"]

    qn, notes = _qemu_new(s, c.trace)
    s["qemu_new_pages"] = qn
    s["est_new_pages"] = _est_new(c, s, (get["seq"].to_numpy(np.int64), gd))
    s["incomplete"] = incomplete_windows(end, *loss_intervals(c.bundle.meta))
    s["note"] = _explain_all(s, notes, c.send_source, mode)
    return s[COLUMNS]


def _explain_all(s: pd.DataFrame, base: list[str], send_source: str, mode: str = "") -> list[str]:
    """``note`` for every sync.  The cases are picked with array masks; strings are only built for the
    syncs that get one (a per-row ``s.iloc[d]`` here was most of analyze's time on 100k+ syncs)."""
    n = len(s)
    h = s["harvested"].to_numpy(np.int64)
    h = np.where(h < 0, s["ring_pages"].to_numpy(np.int64), h)
    qn = s["qemu_new_pages"].to_numpy(np.int64)
    est = s["est_new_pages"].to_numpy(np.int64)
    ok = (qn >= 0) & (h >= 0)
    first = ok & (np.arange(n) == 0) & (qn == 0) & (h > 0)
    vs_est = ok & ~first & (est >= 0) & (est != qn)
    vs_harv = ok & ~first & ~vs_est & (est < 0) & (qn != h)
    out = [b if b else "" for b in base]
    if first.any():
        msg = ("first sync: the migration bitmap starts all ones, so QEMU counts 0 new pages"
               + (" while KVM (manual protect + INITIALLY_SET) reports every page dirty" if mode == "manual"
                  else " whatever the harvest"))
        out[0] = "; ".join([x for x in (out[0], msg) if x])
    for d in np.flatnonzero(vs_est | vs_harv):
        q = int(qn[d])
        if vs_est[d]:
            diff = q - int(est[d])
            if diff > 0:
                why = ("pages sent as zero pages have no ram_save_page event, so they still look pending and are "
                       "not counted new; also " if send_source == "ram_save_page" else "") + \
                    "pages QEMU dirtied itself (device DMA into guest RAM, TCG, vhost) are in QEMU's count, " \
                    "not in KVM's harvest"
            else:
                why = ("harvested pages QEMU found already set: a send or hint apply recorded just before the "
                       "fetch whose bitmap clear came after it (clock mapping of the trace is good to a few us)")
            msg = f"QEMU new {q} vs estimated {int(est[d])} ({diff:+d}): {why}"
        else:
            msg = (f"QEMU new {q} vs harvested {int(h[d])}: QEMU counts only "
                   "pages not already dirty in the migration bitmap (no page sends captured to estimate that)")
        out[d] = "; ".join([x for x in (out[d], msg) if x])
    return out
