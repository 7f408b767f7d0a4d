"""Turn a finished :class:`~hintscope.sim.model.Sim` into the bundle tables real probes write.

``frames(sim)`` returns {table: DataFrame} with the declared schema columns; ``write_bundle``
stores them through :class:`~hintscope.bundle.BundleWriter`; ``MemoryBundle`` offers the
read side of :class:`~hintscope.bundle.Bundle` without touching the disk (the confusion
matrix runs hundreds of simulations).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from hintscope import schema
from hintscope.bundle import BundleWriter, to_arrow
from hintscope.sim.model import PHASES, RAM_BLOCK, T0, TID_MIG, SimConfig, Sim

GUEST_TID = 300


def _guest_ns(sim: Sim, host_ts) -> np.ndarray:
    """Guest clock for host times: offset, drift and a deterministic probe jitter per timestamp."""
    ts = np.asarray(host_ts, np.int64)
    j = sim.cfg.guest_jitter_ns
    jit = ((ts.astype(np.uint64) * np.uint64(2654435761) + np.uint64(sim.seed)) % np.uint64(2 * j + 1)).astype(np.int64) - j
    return ts - (sim.delta0 + ((ts - T0) * sim.drift).astype(np.int64)) + jit


def _df(rows, cols) -> pd.DataFrame:
    return pd.DataFrame.from_records(rows, columns=cols) if rows else pd.DataFrame({c: [] for c in cols})


def event_tables(sim: Sim) -> dict[str, Any]:
    """Every table but the ground truth and the destination check, as frames or dicts of columns."""
    r = sim.rec
    out: dict[str, Any] = {}
    qe = _df(r.qemu, ["ts_ns", "tid", "event", "a0", "a1", "a2", "ret"])
    if len(r.page_send):
        ps = r.page_send.columns()
        qe = pd.concat([qe, pd.DataFrame({"ts_ns": ps["ts_ns"], "tid": TID_MIG, "event": "page_send",
                                          "a0": ps["hva"], "a1": 4096, "a2": 0, "ret": 0})], ignore_index=True)
    out["qemu_events"] = qe.sort_values("ts_ns", kind="stable", ignore_index=True)
    out["ioctls"] = pd.DataFrame(r.ioctls, columns=schema.get("ioctls").names)
    w = r.words.columns({"ts_ns": np.int64, "seq": np.int64, "op": np.int8, "slot": np.int32, "word": np.int64,
                         "nwords": np.int64, "mask": np.uint64})
    w["op"] = pd.Categorical.from_codes(w["op"], ["get", "clear"])
    out["bitmap_words"] = w
    out["memslots"] = pd.DataFrame(r.memslots, columns=schema.get("memslots").names)
    out["page_sends"] = page_sends(sim)
    if sim.cfg.mode == "ring":
        out["ring_push"] = r.ring_push.columns({"ts_ns": np.int64, "tid": np.int32, "vcpu": np.int32,
                                                "dirty_index": np.uint32, "reset_index": np.uint32,
                                                "slot": np.int32, "offset": np.uint64})
        out["ring_reset"] = _df(r.ring_reset, ["ts_ns", "tid", "vcpu", "dirty_index", "reset_index"])
    ge = _df(r.guest, ["host_ts", "event", "a0", "a1", "a2", "tid"])
    ge = ge.sort_values("host_ts", kind="stable", ignore_index=True)
    out["guest_events"] = pd.DataFrame({
        "guest_ns": _guest_ns(sim, ge["host_ts"]), "seq": np.arange(len(ge), dtype=np.int64),
        "side": "src", "cpu": 0, "tid": ge["tid"].astype(np.int32), "event": ge["event"],
        "a0": ge["a0"].astype(np.uint64), "a1": ge["a1"].astype(np.uint64), "a2": ge["a2"].astype(np.uint64)})
    h = _df(r.hints, ["host_ts", "pfn", "order", "cmd_id", "run"])
    out["guest_hints"] = pd.DataFrame({"guest_ns": _guest_ns(sim, h["host_ts"]), "side": "src", "tid": GUEST_TID,
                                       "pfn": h["pfn"].astype(np.uint64), "order": h["order"],
                                       "cmd_id": h["cmd_id"].astype(np.uint32), "run": h["run"]})
    rt = _df(r.returns, ["host_ts", "pfn", "order", "reason"])
    out["guest_returns"] = pd.DataFrame({"guest_ns": _guest_ns(sim, rt["host_ts"]), "side": "src", "tid": GUEST_TID,
                                         "pfn": rt["pfn"].astype(np.uint64), "order": rt["order"],
                                         "reason": rt["reason"]})
    ru = _df(r.reuse, ["host_ts", "pfn", "order", "block_pfn", "returned_ts"])
    out["guest_reuse"] = pd.DataFrame({"guest_ns": _guest_ns(sim, ru["host_ts"]), "side": "src", "tid": GUEST_TID,
                                       "pfn": ru["pfn"].astype(np.uint64), "order": ru["order"], "gfp": np.uint64(0xCC0),
                                       "block_pfn": ru["block_pfn"].astype(np.uint64),
                                       "returned_ns": _guest_ns(sim, ru["returned_ts"])})
    return out


def page_sends(sim: Sim) -> dict[str, Any]:
    """The sends as the migration-stream tap records them: the block list's mem-size row, then runs."""
    s = sim.rec.sends.columns({"ts_ns": np.int64, "ts_end_ns": np.int64, "page": np.int64, "npages": np.int64,
                               "section": np.int64, "phase": np.int8, "scan_pass": np.int64})
    n = len(s["page"])
    rec = 4096 + 8                           # a page record: 8-byte header (offset | flags), 4 KiB of data
    hdr = 64                                 # the stream header and the setup section's block list
    end = hdr + np.cumsum(s["npages"] * rec, dtype=np.int64)
    return {
        "ts_ns": np.r_[sim.t_mig, s["ts_ns"]], "ts_end_ns": np.r_[sim.t_mig, s["ts_end_ns"]],
        "block": pd.Categorical.from_codes(np.zeros(n + 1, np.int8), [RAM_BLOCK]),
        "offset": (np.r_[0, s["page"]] * 4096).astype(np.uint64),
        "npages": np.r_[sim.n, s["npages"]],
        "kind": pd.Categorical.from_codes(np.r_[1, np.zeros(n, np.int8)].astype(np.int8), ["page", "mem-size"]),
        "sent": np.r_[False, np.ones(n, bool)],
        "stream_pos": np.r_[0, end - s["npages"] * rec].astype(np.uint64),
        "stream_end": np.r_[hdr, end].astype(np.uint64),
        "section": np.r_[0, s["section"]],
        "phase": pd.Categorical.from_codes(np.r_[0, s["phase"]].astype(np.int8), list(PHASES)),
        "scan_pass": np.r_[0, s["scan_pass"]],
    }


def truth_tables(sim: Sim, dest_compare: bool):
    """(table, columns) chunks of ``ground_truth`` and, with dest_compare, ``lost_pages`` (stale pages only)."""
    gt_names = schema.get("ground_truth").names
    for ch in sim.truth_chunks():
        yield "ground_truth", {k: ch[k] for k in gt_names}
        if dest_compare:
            gfn = ch["gfn"]
            src_seq, dst_seq = ch["_src_seq"], ch["_dst_seq"]
            yield "lost_pages", {
                "gfn": gfn,
                "src_hash": (src_seq.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ gfn,
                "dst_hash": (dst_seq.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ gfn,
                "src_zero": np.zeros(len(gfn), bool), "dst_zero": dst_seq < 0, "src_seq": src_seq,
                "dst_seq": dst_seq,
                "classification": pd.Categorical.from_codes(np.zeros(len(gfn), np.int8), ["lost-write"])}


def frames(sim: Sim, dest_compare: bool = True) -> dict[str, pd.DataFrame]:
    """Every table as a DataFrame conformed to the declared schema (dtypes, column order)."""
    out = {name: to_arrow(name, cols) for name, cols in event_tables(sim).items()}
    parts: dict[str, list] = {}
    for name, cols in truth_tables(sim, dest_compare):
        parts.setdefault(name, []).append(to_arrow(name, cols))
    for name, ts in parts.items():
        out[name] = pa.concat_tables(ts)
    return {name: t.to_pandas() for name, t in out.items()}


def meta_for(sim: Sim, dest_compare: bool, truth: bool = True) -> dict[str, Any]:
    k = sim.v.knobs
    events = {e[2] for e in sim.rec.qemu} | ({"page_send"} if sim.cfg.page_send_events else set())
    sources = {
        "host_ioctl": {"status": "captured", "reason": None},
        "qemu_uprobes": {"status": "captured", "reason": None, "events": sorted(events)},
        "guest_probe": {"status": "captured", "reason": None},
        "tap": {"status": "captured", "reason": None,
                "clock": "host CLOCK_MONOTONIC of the simulated page reads (the simulator has no socket delay)"},
    }
    if sim.cfg.mode == "ring":
        sources["host_ring"] = {"status": "captured", "reason": None}
    if dest_compare:
        sources["memcheck"] = {"status": "captured", "reason": None}
    return {
        "vmm": {"name": "hintscope-sim", "dirty_log": sim.cfg.mode},
        "sources": sources,
        "lost": {},
        "sim": {
            "variant": sim.v.name, "seed": sim.seed, "mode": sim.cfg.mode, "safe_design": sim.v.safe,
            "config": asdict(sim.cfg), "knobs": asdict(k),
            "delta_ns": sim.delta0, "drift": sim.drift, "bulk_stall_ns": sim.stall_ns,
            "truth": sim.truth_totals() if truth else {},
        },
    }


@dataclass
class MemoryBundle:
    """The read API of :class:`hintscope.bundle.Bundle`, held in memory."""

    meta: dict[str, Any]
    _tables: dict[str, pd.DataFrame]
    problems: list[str] = field(default_factory=list)
    path: Path = Path("<memory>")
    damaged: dict[str, list[str]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.meta.get("status") == "complete"

    def file(self, name: str):
        return None

    def has(self, name: str) -> bool:
        return name in self._tables and len(self._tables[name]) > 0

    def tables(self) -> list[str]:
        return sorted(self._tables)

    def table(self, name: str) -> pd.DataFrame:
        if name in self._tables:
            return self._tables[name]
        return schema.get(name).arrow_schema.empty_table().to_pandas()

    def without(self, *names: str) -> "MemoryBundle":
        """A copy lacking some tables (to test what the detector says when a family is missing)."""
        return MemoryBundle(dict(self.meta), {k: v for k, v in self._tables.items() if k not in names},
                            list(self.problems))


def run_sim(variant: str, seed: int, mode: str = "manual", cfg: SimConfig | None = None) -> Sim:
    from dataclasses import replace
    from hintscope.sim import variants
    cfg = replace(cfg or SimConfig(), mode=mode)
    return Sim(variants.get(variant), seed, cfg).run()


def simulate(variant: str, seed: int, mode: str = "manual", dest_compare: bool = True,
             cfg: SimConfig | None = None) -> MemoryBundle:
    sim = run_sim(variant, seed, mode, cfg)
    meta = meta_for(sim, dest_compare)
    meta["status"] = "complete"
    meta["end_reason"] = "target-exit"
    return MemoryBundle(meta, frames(sim, dest_compare))


def _start(path, meta: dict[str, Any]) -> BundleWriter:
    w = BundleWriter(path, producer="simulate")
    for k in ("vmm", "sim"):
        w.meta[k] = meta[k]
    for name, st in meta["sources"].items():
        st = dict(st)
        w.set_source(name, st.pop("status"), st.pop("reason", None), **st)
    return w


def write_sim(sim: Sim, path: str | Path, dest_compare: bool = True) -> dict[str, Any]:
    """Write a finished simulation as a bundle without building DataFrames of its page tables.

    The ground truth and the destination check are written a window of pages at a time, each a
    part of its own, so memory stays at the simulator's arrays plus one window.
    """
    meta = meta_for(sim, dest_compare, truth=False)
    w = _start(path, meta)
    for name, cols in event_tables(sim).items():
        w.append(name, cols)
    w.flush()
    for name, cols in truth_tables(sim, dest_compare):
        w.append(name, cols)
        w.flush()
    meta["sim"]["truth"] = w.meta["sim"]["truth"] = sim.truth_totals()    # counted by the pass above
    w.close(end_reason="target-exit")
    return meta


def write_bundle(mb: MemoryBundle, path: str | Path) -> Path:
    w = _start(path, mb.meta)
    for name in mb.tables():
        w.append(name, mb.table(name))
    w.close(end_reason="target-exit")
    return Path(path)
