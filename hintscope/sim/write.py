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

from hintscope import schema
from hintscope.bundle import BundleWriter, to_arrow
from hintscope.sim.model import T0, SimConfig, Sim

GUEST_TID = 300


def _guest_ns(sim: Sim, host_ts) -> np.ndarray:
    """Guest clock for host times: offset, drift and a deterministic probe jitter per timestamp."""
    ts = np.asarray(host_ts, np.int64)
    j = sim.cfg.guest_jitter_ns
    jit = ((ts.astype(np.uint64) * np.uint64(2654435761) + np.uint64(sim.seed)) % np.uint64(2 * j + 1)).astype(np.int64) - j
    return ts - (sim.delta0 + ((ts - T0) * sim.drift).astype(np.int64)) + jit


def _df(rows, cols) -> pd.DataFrame:
    return pd.DataFrame.from_records(rows, columns=cols) if rows else pd.DataFrame({c: [] for c in cols})


def frames(sim: Sim, dest_compare: bool = True) -> dict[str, pd.DataFrame]:
    r = sim.rec
    out: dict[str, pd.DataFrame] = {}
    out["qemu_events"] = _df(r.qemu, ["ts_ns", "tid", "event", "a0", "a1", "a2", "ret"]).sort_values(
        "ts_ns", kind="stable", ignore_index=True)
    out["ioctls"] = pd.DataFrame(r.ioctls, columns=schema.get("ioctls").names)
    out["bitmap_words"] = _df(r.words, ["ts_ns", "seq", "op", "slot", "word", "mask"])
    out["memslots"] = pd.DataFrame(r.memslots, columns=schema.get("memslots").names)
    if sim.cfg.mode == "ring":
        out["ring_push"] = _df(r.ring_push, ["ts_ns", "tid", "vcpu", "dirty_index", "reset_index", "slot", "offset"])
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
    gt = sim.ground_truth()
    out["ground_truth"] = gt
    if dest_compare:
        st = gt[gt["stale"]]
        src_seq = sim.src_ver[st.index.to_numpy()]
        dst_seq = sim.dest_ver[st.index.to_numpy()]
        out["lost_pages"] = pd.DataFrame({
            "gfn": st["gfn"].to_numpy(np.uint64),
            "src_hash": (src_seq.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ st["gfn"].to_numpy(np.uint64),
            "dst_hash": (dst_seq.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ st["gfn"].to_numpy(np.uint64),
            "src_zero": False, "dst_zero": dst_seq < 0, "src_seq": src_seq, "dst_seq": dst_seq,
            "classification": "lost-write"})
    # conform every frame to the declared schema (dtypes, column order)
    return {name: to_arrow(name, df).to_pandas() for name, df in out.items()}


def meta_for(sim: Sim, dest_compare: bool) -> dict[str, Any]:
    k = sim.v.knobs
    sources = {
        "host_ioctl": {"status": "captured", "reason": None},
        "qemu_uprobes": {"status": "captured", "reason": None, "events": sorted({e[2] for e in sim.rec.qemu})},
        "guest_probe": {"status": "captured", "reason": None},
    }
    if sim.cfg.mode == "ring":
        sources["host_ring"] = {"status": "captured", "reason": None}
    if dest_compare:
        sources["memcheck"] = {"status": "captured", "reason": None}
    gt = sim.ground_truth()
    return {
        "vmm": {"name": "hintscope-sim", "dirty_log": sim.cfg.mode},
        "sources": sources,
        "lost": {},
        "sim": {
            "variant": sim.v.name, "seed": sim.seed, "mode": sim.cfg.mode, "safe_design": sim.v.safe,
            "config": asdict(sim.cfg), "knobs": asdict(k),
            "delta_ns": sim.delta0, "drift": sim.drift, "bulk_stall_ns": sim.stall_ns,
            "truth": {"stale": int(gt["stale"].sum()), "lost": int(gt["lost"].sum()),
                      "lost_hint": int((gt["lost"] & (gt["reason"] == "hint")).sum()),
                      "lost_not_hint": int((gt["lost"] & (gt["reason"] == "not-hint")).sum())},
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


def simulate(variant: str, seed: int, mode: str = "manual", dest_compare: bool = True,
             cfg: SimConfig | None = None) -> MemoryBundle:
    from dataclasses import replace
    from hintscope.sim import variants
    cfg = replace(cfg or SimConfig(), mode=mode)
    sim = Sim(variants.get(variant), seed, cfg).run()
    meta = meta_for(sim, dest_compare)
    meta["status"] = "complete"
    meta["end_reason"] = "target-exit"
    return MemoryBundle(meta, frames(sim, dest_compare))


def write_bundle(mb: MemoryBundle, path: str | Path) -> Path:
    w = BundleWriter(path, producer="simulate")
    for k in ("vmm", "sim"):
        w.meta[k] = mb.meta[k]
    for name, st in mb.meta["sources"].items():
        st = dict(st)
        w.set_source(name, st.pop("status"), st.pop("reason", None), **st)
    for name in mb.tables():
        w.append(name, mb.table(name))
    w.close(end_reason="target-exit")
    return Path(path)
