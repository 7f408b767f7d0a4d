"""Checks on guest balloon events (protocol notes §4 d3, d5): reuse before apply and the cmd id sequence."""

from __future__ import annotations

import numpy as np
import pandas as pd

from hintscope.analysis import epochs
from hintscope.analysis.facts import Facts, _expand, _hex, _pages_of
from hintscope.analysis.findings import finding


# Why a write into a hinted page taken back before its apply cannot be lost, per dirty-log mode.
SAFE_MODES = {
    "tcg": "under TCG QEMU's own dirty bitmap records the write and the next sync sends the page",
    "get": "legacy KVM_GET_DIRTY_LOG re-arms every page it harvests, so the write is recorded and sent",
    "ring": "the dirty ring records the write and the next sync sends the page",
}


def reuse_level(mode: str, exposed: bool, settled: bool) -> str:
    """Level of a reuse-before-apply finding: ``hazard`` (a write can be lost) only under manual protect
    where the apply re-arms pages such a write leaves unrecorded; ``ambiguous`` when that case is not
    settled by the clocks; ``note`` (an exposure, not unsafe) under TCG, legacy GET, the dirty ring,
    or manual protect with the page armed."""
    if mode != "manual" or not exposed:
        return "note"
    return "hazard" if settled else "ambiguous"


def reuse_before_apply(f: Facts, run) -> None:
    """d3: the guest took a hinted block back before the host applied its hint.

    Legal per VIRTIO 1.2 §5.5.6.5 and lossless wherever the next sync harvests the write: legacy
    GET, dirty ring, TCG, and manual protect when the page was re-armed before the write.  Only a
    block whose apply re-armed pages the write left unrecorded (the c' exposure of that apply) is
    a hazard; every other one is a ``note`` (reuse_level).  The sentence counts the pages the guest
    allocated (wrote) in those blocks before the apply (analysis/exposure.py).
    """
    m, out = run.m, run.out
    R = f.returns
    if not len(R) or not len(m):
        return
    R = R[R["reason"] != "done"]
    mm = m[m["matched"]]
    if not len(R) or not len(mm):
        return
    Rr = pd.DataFrame({"gfn0": R["pfn"].to_numpy().astype(np.int64), "r_g": R["guest_ns"].to_numpy(np.int64),
                       "r_lo": R["lo"].to_numpy(float), "r_hi": R["hi"].to_numpy(float)}).sort_values("r_g")
    x = pd.merge_asof(mm.sort_values("h_g"), Rr, left_on="h_g", right_on="r_g", by="gfn0",
                      direction="forward", allow_exact_matches=False)
    x = x[x["r_g"].notna()]
    a = x["a"].to_numpy(float)
    sure = x["r_hi"].to_numpy(float) < a
    maybe = ~sure & (x["r_lo"].to_numpy(float) < a)
    exposed = np.zeros(len(x), bool)
    ex = run.exposure
    if f.mode == "manual" and ex is not None and len(ex):
        exposed = np.isin(x["apply"].to_numpy(), ex.loc[ex["exposed_pages"] > 0, "apply"].to_numpy())
    writes = _writes_before_apply(f)
    levels = np.array([reuse_level(f.mode, bool(e), bool(s)) for e, s in zip(exposed, sure)], object)
    for conf in ("hazard", "ambiguous", "note"):
        sel = (sure | maybe) & (levels == conf)
        if not sel.any():
            continue
        r = x[sel]
        r0 = r.iloc[0]
        w = writes[writes["block_pfn"].isin(r["gfn0"].to_numpy())] if len(writes) else writes
        wsent = (f"; the guest allocated (wrote) {len(w)} of their pages before the apply "
                 f"({int((w['before_apply'] == 'sure').sum())} surely by the clock band)" if len(w) else
                 "; no allocation in them before the apply was seen")
        if len(w) and f.mode != "manual":
            wsent += (f"; under KVM manual protect {int(w['exposed'].fillna(False).sum())} of those writes would hit "
                      f"a dirty, unarmed page ({int(w['exposed'].isna().sum())} undecided) and "
                      f"{int(w['exposed_chunk'].fillna(False).sum())} would come before the first re-arm of the "
                      f"page's 1 GiB clear chunk, i.e. be lost (inferred from the guest timeline)")
        tail = {"hazard": "", "ambiguous": " (order not settled by the clock band)",
                "note": "; " + SAFE_MODES.get(f.mode, f"under {f.mode} dirty logging the next sync harvests such a "
                                                        f"write") + ", so none is lost (exposure only)"}[conf]
        gfns = (w["gfn"].to_numpy(np.int64) if len(w) and conf == "note"
                else _pages_of(r["apply"].to_numpy(), f))
        out.append(finding("reuse-before-apply", conf, gfns,
                            [(r0["h_lo"], "guest", f"hint add pfn {_hex(r0['gfn0'])}"),
                             (r0["r_lo"], "guest", "block returned by the shrinker (earliest host time)"),
                             (r0["a"], "qemu", "hint_apply of that block")],
                            f"the guest returned {len(r)} hinted block(s) to its allocator before the host applied "
                            f"their hints" + (", and that apply re-armed pages such a write leaves unrecorded (c')"
                                              if conf != "note" else "") + wsent + tail + "."))


def _writes_before_apply(f: Facts) -> pd.DataFrame:
    """Pages allocated in early-returned blocks before their apply (exposure.page_exposure), or empty."""
    if not len(f.reuse):
        return pd.DataFrame({"gfn": pd.Series(dtype="int64"), "block_pfn": pd.Series(dtype="int64"),
                             "before_apply": pd.Series(dtype="object")})
    from hintscope.analysis import exposure  # exposure imports facts; imported late to keep checks light
    p = exposure.page_exposure(f)
    return p[p["before_apply"].isin(["sure", "maybe"])] if len(p) else p


def host_time(f: Facts, g) -> float:
    """Earliest host time of a guest time (the guest time itself when the band is unknown)."""
    lo = f.band.to_host(np.asarray([g]))[0][0]
    return float(lo) if np.isfinite(lo) else float(g)


def id_sequence(f: Facts, run) -> None:
    """d5: ids the guest read must rise by one; start messages must carry the id read; no run without one."""
    out = run.out
    ge = f.guest_events
    ev = []
    bad_g = []
    if len(ge):
        ge = ge.sort_values("guest_ns", kind="stable")
        rd = ge[ge["event"] == "cmd_id"]
        v = rd["a0"].to_numpy().astype(np.int64)
        g = rd["guest_ns"].to_numpy(np.int64)
        new = v >= epochs.CMD_ID_MIN
        v, g = v[new], g[new]
        if len(v) > 1:
            ch = np.r_[True, v[1:] != v[:-1]]
            vv, gg = v[ch], g[ch]
            step = (vv[1:] - vv[:-1]) % (1 << 31)
            badi = np.flatnonzero(step != 1)
            for i in badi[:3]:
                ev.append((host_time(f, gg[i + 1]), "guest", f"id read {_hex(vv[i + 1])} after {_hex(vv[i])}"))
            bad_g += [len(badi)]
        # a start message must carry the id the guest read last
        ob = ge[(ge["event"] == "outbuf") & (ge["a0"].to_numpy().astype(np.int64) >= epochs.CMD_ID_MIN)]
        if len(ob) and len(g):
            i = np.searchsorted(g, ob["guest_ns"].to_numpy(np.int64), side="right") - 1
            sent = ob["a0"].to_numpy().astype(np.int64)
            mism = (i < 0) | (v[np.maximum(i, 0)] != sent)
            for j in np.flatnonzero(mism)[:3]:
                ev.append((host_time(f, int(ob["guest_ns"].iloc[j])), "guest",
                           f"start message {_hex(sent[j])} but the id read last was "
                           f"{_hex(v[i[j]]) if i[j] >= 0 else 'none'}"))
    h = f.hints
    if len(h):
        noid = h["cmd_id"].to_numpy().astype(np.int64) < epochs.CMD_ID_MIN
        applied = np.isin(h["pfn"].to_numpy().astype(np.int64), f.applies["gfn0"].to_numpy())
        sel = noid & applied
        if sel.any():
            r = h[sel]
            ev.append((r["lo"].iloc[0] if np.isfinite(r["lo"].iloc[0]) else r["guest_ns"].iloc[0], "guest",
                       f"hint pfn {_hex(r['pfn'].iloc[0])} queued with no start id"))
            out.append(finding("bad-id-sequence", "hazard", _expand(r["pfn"].to_numpy(), r["order"].to_numpy())[1], ev,
                                f"{int(sel.sum())} applied hint(s) were queued with no start message carrying a cmd "
                                f"id, so the host reached START without a REQUESTED id it could check."))
            return
    if ev:
        out.append(finding("bad-id-sequence", "hazard", [], ev,
                            "the cmd ids the guest read do not rise by exactly one between hinting rounds, or a "
                            "start message carried an id other than the one the guest read (guest clock)."))

