"""One place that loads what several analyses share from a bundle, once.

``Context(bundle)`` holds the host tables, the QEMU trace (table or parsed log), the memslot
intervals, page sends (with the source they came from) and hint applies expanded to pages.
Everything is computed lazily and cached; ``problems`` collects one-line notes for the user.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd

from hintscope.analysis import harvest, memslots as ms, pagestate as ps, qemu_states
from hintscope.bundle import Bundle
from hintscope.probes import kvm_abi
from hintscope.parse import qemu_trace

# Page-level expansion of hint applies (4 KiB rows) stops here: 2**26 pages = 256 GiB of hints,
# beyond any guest this runs on; a hostile length cannot make the analysis allocate without bound.
MAX_EXPANDED_PAGES = 1 << 26
MAX_SLOT_WORDS = 1 << 34      # KVM slots hold under 2^40 pages: 2^34 64-bit words

# send sources that see every page QEMU sent (zero pages included): a page they never show was skipped
EVERY_PAGE_SOURCES = ("page_send", "tap")
SEND_SOURCES = {
    "tap": "migration-stream tap (hintscope tap): every RAM page record QEMU wrote to the stream, zero pages "
           "included, stamped when the tap read it (an upper bound on QEMU's read of the page)",
    "page_send": "uprobe buffer_is_zero on the migration thread: every page QEMU sent, zero pages included "
                 "(not the compression or RDMA paths)",
    "ram_save_page": "QEMU trace ram_save_page: non-zero pages only (zero pages are sent by save_zero_page "
                     "without this event), so a hinted page later sent as a zero page looks skipped",
    "none": "no page sends captured: skipped pages are estimated as applied pages no later sync harvested; "
            "pages sent before the apply (late hints) and pages sent in the bulk round after the apply "
            "cannot be told apart",
}


@dataclass
class Context:
    bundle: Bundle
    problems: list[str] = field(default_factory=list)
    input_errors: list[str] = field(default_factory=list)

    def __post_init__(self):
        # One list with the bundle: a part found damaged when a table is first read, after this
        # Context was made, must still reach the verdict.
        if self.problems:
            self.bundle.problems.extend(p for p in self.problems if p not in self.bundle.problems)
        self.problems = self.bundle.problems
        # Producers may leave one-line notes (e.g. malformed trace lines) in meta["problems"].
        extra = self.bundle.meta.get("problems")
        if isinstance(extra, list):
            for x in extra[:100]:
                line = " ".join(str(x).split())[:500]
                if line not in self.problems:
                    self.problems.append(line)

    def inconsistent(self, what: str) -> None:
        """Input that contradicts itself (returns before entries, clocks running backwards): no check
        may turn it into a safety finding, so the verdict becomes inconclusive naming it."""
        self.problems.append(what)
        self.input_errors.append(what)

    @property
    def damaged(self) -> dict[str, list[str]]:
        """Tables with parts or rows left out (unreadable part, missing column, nulls): their source is partial."""
        return getattr(self.bundle, "damaged", {}) or {}

    # -- raw tables --------------------------------------------------------------------
    @cached_property
    def qe(self) -> pd.DataFrame:
        """QEMU uprobe events by time; precopy_notify rows of other notifier lists dropped (qemu_states)."""
        qe = self.bundle.table("qemu_events").sort_values("ts_ns", kind="stable", ignore_index=True)
        return qemu_states.keep_precopy_rows(qe, self.bundle.meta, self.problems)

    @cached_property
    def state_names(self) -> qemu_states.StateNames:
        """MigrationStatus names by number for the traced QEMU (``basis`` says where they came from)."""
        names = qemu_states.state_names(self.bundle.meta)
        self.problems.extend(names.problems)
        if names.malformed:
            # a state table that is there but unusable is hostile input: the migration's end is unknown
            self.input_errors.append("meta sources.qemu_uprobes.migration_states is malformed")
        return names

    @cached_property
    def ioctls(self) -> pd.DataFrame:
        return self.bundle.table("ioctls").sort_values("ts_ns", kind="stable", ignore_index=True)

    @cached_property
    def words(self) -> pd.DataFrame:
        """``bitmap_words`` with impossible runs dropped (hostile ``nwords`` must not explode an expansion)."""
        w = self.bundle.table("bitmap_words")
        if not len(w):
            return w
        n, word = w["nwords"].to_numpy(np.int64), w["word"].to_numpy(np.int64)
        bad = (n < 1) | (word < 0) | (word > MAX_SLOT_WORDS) | (n > MAX_SLOT_WORDS - np.clip(word, 0, MAX_SLOT_WORDS))
        if bad.any():
            self.inconsistent(f"bitmap_words: {int(bad.sum())} rows with an impossible word index or run length "
                              f"(nwords < 1 or past {MAX_SLOT_WORDS} words) ignored")
            w, n = w[~bad].reset_index(drop=True), n[~bad]
        keep = np.cumsum(n) <= MAX_EXPANDED_PAGES // 8
        if not keep.all():
            self.problems.append(f"bitmap_words: runs cover more than {MAX_EXPANDED_PAGES // 8} words; the last "
                                 f"{int((~keep).sum())} rows are ignored")
            w = w[keep].reset_index(drop=True)
        return w

    @cached_property
    def trace(self) -> pd.DataFrame:
        t = qemu_trace.load(self.bundle, self.problems)
        if len(t) and (t["ts_ns"] < 0).all():
            self.problems.append("QEMU trace log has no clock anchors to map it onto the host clock; trace "
                                 "times not comparable with probe times")
        return t.sort_values(["ts_ns", "line"], kind="stable", ignore_index=True)

    @cached_property
    def qmp(self) -> pd.DataFrame:
        try:
            return self.bundle.table("qmp").sort_values("ts_ns", kind="stable", ignore_index=True)
        except KeyError:  # lab schema not installed
            return pd.DataFrame()

    # -- memslots ----------------------------------------------------------------------
    @cached_property
    def _slots(self) -> tuple[pd.DataFrame, str]:
        ev, src = ms.slot_events(self.bundle.table("memslots"), self.trace, self.bundle.table("ram_map"))
        iv = ms.intervals(ev)
        if p := ms.intervals_problem(iv):
            self.problems.append(p)
        return iv, src

    @property
    def iv(self) -> pd.DataFrame:
        return self._slots[0]

    @property
    def memslot_source(self) -> str:
        return self._slots[1]

    # -- pages ---------------------------------------------------------------------------
    @cached_property
    def get_pages(self) -> pd.DataFrame:
        return harvest.bitmap_pages(self.words, "get", self.iv)

    @cached_property
    def ring_push(self) -> pd.DataFrame:
        """The raw dirty-ring pushes (empty without a ring): one row per page already."""
        return self.bundle.table("ring_push") if self.bundle.has("ring_push") else pd.DataFrame(
            {c: pd.Series(dtype="int64") for c in ("ts_ns", "slot", "offset")})

    @cached_property
    def ring_pages(self) -> pd.DataFrame:
        return harvest.ring_pages(self.bundle.table("ring_push"), self.iv)

    @cached_property
    def hint_applies(self) -> pd.DataFrame:
        """hint_apply events: ts_ns, tid, hva, len, end_ns (matching hint_apply_ret on the tid, -1 if none)."""
        qe = self.qe
        a = qe[qe["event"] == "hint_apply"]
        out = pd.DataFrame({"ts_ns": a["ts_ns"].to_numpy(np.int64), "tid": a["tid"].to_numpy(np.int64),
                            "hva": a["a0"].to_numpy().astype(np.int64), "len": a["a1"].to_numpy().astype(np.int64)})
        r = qe[qe["event"] == "hint_apply_ret"]
        out["end_ns"] = np.int64(-1)
        if len(out) and len(r):
            # A return closes the latest entry on its thread only: with one return lost, the entry
            # before it stays open instead of borrowing the next apply's return.
            # ties on the clock keep the order the probe recorded (qemu_events row order)
            ev = pd.DataFrame({"ts_ns": np.r_[out["ts_ns"].to_numpy(np.int64), r["ts_ns"].to_numpy(np.int64)],
                               "tid": np.r_[out["tid"].to_numpy(np.int64), r["tid"].to_numpy(np.int64)],
                               "entry": np.r_[np.arange(len(out)), np.full(len(r), -1)],
                               "row": np.r_[a.index.to_numpy(), r.index.to_numpy()]})
            ev = ev.sort_values(["tid", "ts_ns", "row"], kind="stable", ignore_index=True)
            tid, ent, ts = ev["tid"].to_numpy(), ev["entry"].to_numpy(), ev["ts_ns"].to_numpy(np.int64)
            nxt = np.r_[np.arange(1, len(ev)), 0]
            pair = (ent >= 0) & (np.r_[ent[1:], 0] < 0) & (np.r_[tid[1:], -1] == tid) & (np.arange(len(ev)) < len(ev) - 1)
            end = np.full(len(out), -1, np.int64)
            end[ent[pair]] = ts[nxt[pair]]
            out["end_ns"] = end
            orphans = int((ent < 0).sum() - pair.sum())
            if orphans > 0:
                self.inconsistent(f"qemu_events: {orphans} hint_apply_ret with no open hint_apply on its thread "
                                  "(a lost entry event or a return stamped before its entry)")
        open_ = int((out["end_ns"] < 0).sum()) if len(out) else 0
        if open_ and len(r):
            self.problems.append(f"qemu_events: {open_} hint_apply without a return (lost event?); their "
                                 "end time is unknown")
        # A hostile or corrupt length must not explode the page expansion.
        bad = (out["len"] < 0) | (out["len"] > (1 << 34))
        if bad.any():
            self.problems.append(f"{int(bad.sum())} hint_apply events with impossible lengths ignored")
            out = out[~bad].reset_index(drop=True)
        return out

    @cached_property
    def hint_pages(self) -> pd.DataFrame:
        """One row per 4 KiB page of each apply: apply (row of hint_applies), ts_ns, tid, hva, gpa, gfn."""
        a = self.hint_applies
        npages = (a["len"].to_numpy(np.int64) + 2 * ms.PAGE - 1) // ms.PAGE
        keep = np.cumsum(npages) <= MAX_EXPANDED_PAGES
        if not keep.all():
            self.problems.append(f"hint applies cover more than {MAX_EXPANDED_PAGES} pages in all; only the first "
                                 f"{int(keep.sum())} of {len(a)} applies are expanded to pages")
            a = a[keep]
        idx, hva = ms.expand_ranges(a["hva"].to_numpy(), a["len"].to_numpy())
        ts = a["ts_ns"].to_numpy(np.int64)[idx]
        gpa, _ = ms.hva_to_gpa(hva, ts, self.iv)
        unmapped = int((gpa < 0).sum())
        if unmapped:
            self.problems.append(f"{unmapped} hinted pages have an HVA no memslot maps ({self.memslot_source}); "
                                 "they are left out of page-level accounting")
        return pd.DataFrame({"apply": idx, "ts_ns": ts, "tid": a["tid"].to_numpy(np.int64)[idx], "hva": hva,
                             "gpa": gpa, "gfn": np.where(gpa >= 0, gpa >> ms.PAGE_SHIFT, -1)})

    @cached_property
    def _sends(self) -> tuple[pd.DataFrame, str]:
        tap = self._tap_sends()
        if tap is not None:
            return tap, "tap"
        qe = self.qe
        s = qe[qe["event"] == "page_send"]
        if len(s):
            src = "page_send"
            ts, hva = s["ts_ns"].to_numpy(np.int64), s["a0"].to_numpy().astype(np.int64)
            ln = s["a1"].to_numpy().astype(np.int64)
            ln = np.where((ln > 0) & (ln <= (1 << 21)), ln, ms.PAGE)
            keep = np.cumsum((ln + ms.PAGE - 1) // ms.PAGE) <= 4 * MAX_EXPANDED_PAGES
            if not keep.all():
                self._note(f"page sends cover more than {4 * MAX_EXPANDED_PAGES} pages; later sends ignored")
                ts, hva, ln = ts[keep], hva[keep], ln[keep]
            idx, hva = ms.expand_ranges(hva, ln)
            ts = ts[idx]
        else:
            t = self.trace
            s = t[t["event"] == "ram_save_page"]
            if not len(s) or (s["ts_ns"] < 0).all():
                return pd.DataFrame({"ts_ns": pd.Series(dtype="int64"), "gfn": pd.Series(dtype="int64")}), "none"
            src = "ram_save_page"
            ts, hva = s["ts_ns"].to_numpy(np.int64), s["hva"].to_numpy(np.int64)
        gpa, _ = ms.hva_to_gpa(hva, ts, self.iv)
        return pd.DataFrame({"ts_ns": ts, "gfn": np.where(gpa >= 0, gpa >> ms.PAGE_SHIFT, -1)}), src

    def _tap_sends(self) -> pd.DataFrame | None:
        """Page sends from the migration-stream tap (``page_sends`` runs), as (ts_ns, gfn), or None.

        The stream names a RAMBlock and an offset, not a GPA.  Guest RAM is the largest block of the
        stream's block list; its host mapping starts at the HVA of the memslot at GPA 0, so
        offset -> HVA -> GPA goes through the memslot history like every other address.
        """
        t = self.bundle.table("page_sends") if self.bundle.has("page_sends") else pd.DataFrame()
        if not len(t):
            return None
        ram = self._ram_runs(t)
        if ram is None:
            return None
        r, n, b0, sizes = ram
        iv = self.iv
        # the guest pages the tap can see at all: other blocks (ROMs, firmware) are not mapped
        every = b0 + np.arange(int(sizes.max()), dtype=np.int64) * ms.PAGE
        g, _ = ms.hva_to_gpa(every, np.full(len(every), self.end_ns), iv)
        self._send_gfns = np.unique(g[g >= 0] >> ms.PAGE_SHIFT)
        idx, off = ms.expand_ranges(r["offset"].to_numpy().astype(np.int64), n * ms.PAGE)
        i = off // ms.PAGE - (r["offset"].to_numpy().astype(np.int64) // ms.PAGE)[idx]
        t0, t1 = r["ts_ns"].to_numpy(np.int64)[idx], r["ts_end_ns"].to_numpy(np.int64)[idx]
        # pages of one run arrive in order between its first and last record
        ts = t0 + ((t1 - t0) * (i / np.maximum(n[idx] - 1, 1))).astype(np.int64)
        hva = b0 + off
        gpa, _ = ms.hva_to_gpa(hva, ts, iv)
        return pd.DataFrame({"ts_ns": ts, "gfn": np.where(gpa >= 0, gpa >> ms.PAGE_SHIFT, -1)})

    @property
    def send_gfns(self) -> np.ndarray | None:
        """The gfns the send source can see (sorted), None when it sees every page of guest RAM."""
        self._sends
        return getattr(self, "_send_gfns", None)

    @property
    def sends(self) -> pd.DataFrame:
        return self._sends[0]

    @property
    def send_source(self) -> str:
        return self._send_ops[1]

    @cached_property
    def dirty_mode(self) -> str:
        """manual (GET + CLEAR, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2), get (legacy: GET re-arms), ring, or unknown."""
        io = self.ioctls
        names = set(io["name"].unique()) if len(io) else set()
        caps = set(io.loc[io["name"] == "ENABLE_CAP", "cap"].tolist()) if len(io) else set()
        if self.bundle.has("ring_push") or "RESET_DIRTY_RINGS" in names or kvm_abi.CAP_DIRTY_LOG_RING in caps:
            return "ring"
        if "CLEAR_DIRTY_LOG" in names or kvm_abi.CAP_MANUAL_DIRTY_LOG_PROTECT2 in caps:
            return "manual"
        if "GET_DIRTY_LOG" in names:
            return "get"
        lab = self.bundle.meta.get("lab")
        if isinstance(lab, dict) and lab.get("accel") == "tcg":
            return "tcg"  # QEMU's own dirty bitmap; no KVM dirty log
        t = self.trace
        if len(t):
            ev = set(t["event"].unique())
            if any(e.startswith("kvm_dirty_ring") for e in ev):
                return "ring"
            if "kvm_clear_dirty_log" in ev:
                return "manual"
        return "unknown"

    # -- migration -------------------------------------------------------------------------
    @cached_property
    def states(self) -> pd.DataFrame:
        """Migration state changes: ts_ns, state (name), from the probe if it saw any, else the QEMU trace."""
        st = qemu_states.state_rows(self.qe, self.state_names)
        if len(st):
            return st
        t = self.trace
        m = t[t["event"] == "migrate_set_state"]
        return pd.DataFrame({"ts_ns": m["ts_ns"].to_numpy(np.int64), "state": m["state"].astype(str).to_numpy()})

    @cached_property
    def outcome(self) -> str:
        if len(self.qmp) and "status" in self.qmp:
            return str(self.qmp["status"].iloc[-1])
        if len(self.states):
            return str(self.states["state"].iloc[-1])
        return "unknown"

    @cached_property
    def end_ns(self) -> int:
        """Last host time seen in any event table (end of capture)."""
        ends = [int(t["ts_ns"].max()) for t in (self.qe, self.ioctls, self.trace) if len(t)]
        return max(ends) if ends else 0

    # -- compact page ops (pagestate): what the detector and the accounting sweep over ----------
    @cached_property
    def gindex(self) -> ps.GfnIndex:
        """Dense page index over every memslot's GPA range (the per-page arrays' coordinates)."""
        gi = ps.GfnIndex.from_intervals(self.iv)
        if gi.capped:
            self.problems.append(f"memslots map more than {ps.MAX_DENSE_PAGES} pages; {gi.capped} pages of the "
                                 "highest ranges get no page-level analysis")
        return gi

    @cached_property
    def get_ops(self) -> ps.Ops:
        """KVM_GET_DIRTY_LOG harvests as ops (x = ioctl seq)."""
        return harvest.word_ops(self.words, "get", self.iv, self.gindex)

    @cached_property
    def clear_ops(self) -> ps.Ops:
        """KVM_CLEAR_DIRTY_LOG re-arms as ops (x = ioctl seq)."""
        return harvest.word_ops(self.words, "clear", self.iv, self.gindex, self.ioctls)

    @cached_property
    def apply_ops(self) -> ps.Ops:
        """Hint applies as page ranges at their entry time (x = row of ``hint_applies``)."""
        a = self.hint_applies
        if not len(a):
            return ps.Ops.empty()
        npages = (a["len"].to_numpy(np.int64) + 2 * ms.PAGE - 1) // ms.PAGE
        keep = np.cumsum(npages) <= MAX_EXPANDED_PAGES
        if not keep.all():
            self.problems.append(f"hint applies cover more than {MAX_EXPANDED_PAGES} pages in all; only the first "
                                 f"{int(keep.sum())} of {len(a)} applies are used")
        rows = np.flatnonzero(keep)
        hva, ln = a["hva"].to_numpy(np.int64)[rows], a["len"].to_numpy(np.int64)[rows]
        ts = a["ts_ns"].to_numpy(np.int64)[rows]
        first = hva // ms.PAGE
        n = np.where(ln > 0, (hva + ln - 1) // ms.PAGE - first + 1, 0)
        ops, unmapped = self._hva_ranges(first * ms.PAGE, n, ts, ts, rows)
        if unmapped:
            self.problems.append(f"{unmapped} hinted pages have an HVA no memslot maps ({self.memslot_source}); "
                                 "they are left out of page-level accounting")
        return ops

    def _hva_ranges(self, hva: np.ndarray, n: np.ndarray, t0: np.ndarray, t1: np.ndarray,
                    x: np.ndarray, runs: bool = False) -> tuple[ps.Ops, int]:
        """Page runs (first page's HVA, pages, time of first and last page) -> dense-page ops, and the
        number of pages no memslot maps.  A run inside one slot is one op; a run across slots one op per
        slot it crosses.  (Pages whose slot changed between the run's first and last page are counted
        unmapped: QEMU does not remap RAM during a migration.)"""
        iv, gi = self.iv, self.gindex
        keep = n > 0
        hva, n, t0, t1, x = hva[keep], n[keep], t0[keep], t1[keep], x[keep]
        ga, sa = ms.hva_to_gpa(hva, t0, iv)
        gb, sb = ms.hva_to_gpa(hva + (n - 1) * ms.PAGE, t1, iv)
        da = gi.to_idx(np.where(ga >= 0, ga >> ms.PAGE_SHIFT, -1))
        db = gi.to_idx(np.where(gb >= 0, gb >> ms.PAGE_SHIFT, -1))
        ok = (ga >= 0) & (gb - ga == (n - 1) * ms.PAGE) & (sa == sb) & (da >= 0) & (db - da == n - 1)
        parts = [ps.Ops(t0[ok], da[ok], n[ok], np.full(int(ok.sum()), ps.ALL, np.uint64), x[ok])]
        if runs:
            p = parts[0]
            parts[0] = ps.Ops(p.t, p.g0, p.n, p.mask, p.x, t1[ok], np.zeros(len(p), np.int64), p.n.copy(), p.t.copy())
        unmapped = 0
        if not ok.all():
            # runs crossing a slot boundary (pc.ram split around the PCI hole): one op per slot piece
            bad = np.flatnonzero(~ok)
            bh, bn, bt0, bt1, bx = hva[bad], n[bad], t0[bad], t1[bad], x[bad]
            covered = np.zeros(len(bad), np.int64)

            def when(k):
                return bt0 + ((bt1 - bt0) * (k / np.maximum(bn - 1, 1))).astype(np.int64)
            iv0 = ms._capped(iv[iv["as_id"] == 0])
            for r in iv0.itertuples(index=False):
                lo = np.maximum(bh, r.hva)
                hi = np.minimum(bh + bn * ms.PAGE, r.hva + r.size)
                k0 = (lo - bh) // ms.PAGE
                cnt = (hi - lo + ms.PAGE - 1) // ms.PAGE
                ta, tb = when(k0), when(k0 + cnt - 1)
                m = (cnt > 0) & (ta >= r.start_ns) & (ta < r.end_ns) & (tb >= r.start_ns) & (tb < r.end_ns)
                if not m.any():
                    continue
                d = gi.to_idx((lo[m] - r.hva + r.gpa) >> ms.PAGE_SHIFT)
                de = gi.to_idx((lo[m] - r.hva + r.gpa + (cnt[m] - 1) * ms.PAGE) >> ms.PAGE_SHIFT)
                good = (d >= 0) & (de == d + cnt[m] - 1)
                mi = np.flatnonzero(m)[good]
                covered[mi] += cnt[mi]
                k = len(mi)
                if runs:
                    parts.append(ps.Ops(ta[mi], d[good], cnt[mi], np.full(k, ps.ALL, np.uint64), bx[mi], bt1[mi],
                                        k0[mi], bn[mi], bt0[mi]))
                else:
                    parts.append(ps.Ops(ta[mi], d[good], cnt[mi], np.full(k, ps.ALL, np.uint64), bx[mi]))
            unmapped = int((bn - np.minimum(covered, bn)).sum())
        return ps.concat(parts), unmapped

    @cached_property
    def _send_ops(self) -> tuple[ps.Ops, str, np.ndarray | None]:
        """(page sends as ops, source, dense mask of the pages the source can see or None for all)."""
        t = self.bundle.table("page_sends") if self.bundle.has("page_sends") else pd.DataFrame()
        if len(t):
            r = self._tap_runs(t)
            if r is not None:
                return r
        qe = self.qe
        s = qe[qe["event"] == "page_send"]
        if len(s):
            ts, hva = s["ts_ns"].to_numpy(np.int64), s["a0"].to_numpy().astype(np.int64)
            ln = s["a1"].to_numpy().astype(np.int64)
            ln = np.where((ln > 0) & (ln <= (1 << 21)), ln, ms.PAGE)
            first = hva // ms.PAGE
            n = (hva + ln - 1) // ms.PAGE - first + 1
            keep = np.cumsum(n) <= 4 * MAX_EXPANDED_PAGES
            if not keep.all():
                self._note(f"page sends cover more than {4 * MAX_EXPANDED_PAGES} pages; later sends ignored")
                ts, first, n = ts[keep], first[keep], n[keep]
            ops, _ = self._hva_ranges(first * ms.PAGE, n, ts, ts, np.zeros(len(ts), np.int64))
            return ops, "page_send", None
        tr = self.trace
        s = tr[tr["event"] == "ram_save_page"]
        if not len(s) or (s["ts_ns"] < 0).all():
            return ps.Ops.empty(), "none", None
        ts, hva = s["ts_ns"].to_numpy(np.int64), s["hva"].to_numpy(np.int64)
        ops, _ = self._hva_ranges(hva // ms.PAGE * ms.PAGE, np.ones(len(ts), np.int64), ts, ts,
                                  np.zeros(len(ts), np.int64))
        return ops, "ram_save_page", None

    def _ram_runs(self, t: pd.DataFrame):
        """The tap's page-send runs of guest RAM: (runs, pages per run, HVA of RAM, block sizes), or None
        with the reason noted.  Guest RAM is the largest block of the stream's block list, mapped at
        the HVA of the memslot at GPA 0."""
        sizes = t[t["kind"] == "mem-size"].groupby("block")["npages"].max()
        sent = t[t["sent"]]
        if not len(sizes) or not len(sent):
            self._note("page_sends: no block list (mem-size) or no page sends; tap sends not used")
            return None
        ram = str(sizes.idxmax())
        iv = self.iv
        base = iv.loc[(iv["as_id"] == 0) & (iv["gpa"] == 0), "hva"] if len(iv) else pd.Series(dtype="int64")
        if not len(base):
            self._note("page_sends: no memslot at GPA 0 to place the RAM block; tap sends not used")
            return None
        other = sent[sent["block"] != ram]
        if len(other):
            self._note(f"page_sends: {int(other['npages'].sum())} sends of blocks other than {ram} "
                       "(firmware, ROMs) are not guest RAM and are left out")
        r = sent[sent["block"] == ram]
        n = r["npages"].to_numpy(np.int64)
        keep = np.cumsum(n) <= 4 * MAX_EXPANDED_PAGES
        if not keep.all():
            self._note(f"page sends cover more than {4 * MAX_EXPANDED_PAGES} pages; later sends ignored")
        return r[keep], n[keep], int(base.iloc[0]), sizes

    def _tap_runs(self, t: pd.DataFrame):
        ram = self._ram_runs(t)
        if ram is None:
            return None
        r, n, b0, sizes = ram
        hva = b0 + r["offset"].to_numpy().astype(np.int64) // ms.PAGE * ms.PAGE
        t0, t1 = r["ts_ns"].to_numpy(np.int64), r["ts_end_ns"].to_numpy(np.int64)
        # page times inside a run are interpolated from the run's first and last record (as _tap_sends)
        ok_run, _ = self._hva_ranges(hva, n, t0, t1, np.zeros(len(r), np.int64), runs=True)
        seen_ops, _ = self._hva_ranges(np.array([b0]), np.array([int(sizes.max())]),
                                       np.array([self.end_ns]), np.array([self.end_ns]), np.zeros(1, np.int64))
        seen = np.zeros(self.gindex.size, bool)
        for sel, _, _ in ps.pieces(seen_ops, np.arange(len(seen_ops))):
            seen[sel] = True
        return ok_run, "tap", seen

    def _note(self, what: str) -> None:
        if what not in self.problems:      # the per-page path (_tap_sends) may have said it already
            self.problems.append(what)

    @property
    def send_ops(self) -> ps.Ops:
        return self._send_ops[0]

    @property
    def send_ops_source(self) -> str:
        return self._send_ops[1]

    @property
    def send_seen(self) -> np.ndarray | None:
        """Dense mask of the pages the send source can see, None when it sees every page of guest RAM."""
        return self._send_ops[2]
