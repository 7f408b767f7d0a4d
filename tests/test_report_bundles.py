"""Small bundles written with the real BundleWriter, for the report, compare and Perfetto tests.

``write_host_bundle`` lays down the host event sequence of a short QEMU 7.2 precopy migration
with free page hinting (see shared protocol notes §1): bulk sync + epoch 1 with applies (each
with its hint-side CLEAR_DIRTY_LOG), a second sync and epoch, then the final sync with the VM
stopped (DONE).  The counts it returns are what the bundle holds, so tests can compare.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hintscope.bundle import BundleWriter, read_bundle

MS = 1_000_000
MIG_TID, IO_TID = 1001, 1002
HVA0 = 0x7F0000000000
PAGE = 4096
SLOT_BYTES = 256 << 20


def _qe(ts, tid, event, a0=0, a1=0, a2=0, ret=0):
    return {"ts_ns": ts, "tid": tid, "event": event, "a0": a0, "a1": a1, "a2": a2, "ret": ret}


def _io(ts, enter, tid, seq, name, slot=0, pages=-1, first_page=0, num_pages=0):
    cmd = {"GET_DIRTY_LOG": 0x4010AE42, "CLEAR_DIRTY_LOG": 0xC018AEC0, "SET_USER_MEMORY_REGION": 0x4020AE46}[name]
    return {"ts_ns": ts, "enter_ns": enter, "tid": tid, "seq": seq, "fd": 12, "cmd": cmd, "name": name,
            "slot": slot, "ret": 0, "first_page": first_page, "num_pages": num_pages, "pages": pages,
            "cap": -1, "arg0": 0}


def write_host_bundle(path: Path, applies_per_epoch=(6, 3), t0: int = 10_000 * MS, sends: int = 40,
                      dirty=(65536, 900, 120), meta_extra: dict | None = None) -> dict:
    w = BundleWriter(path, producer="test host")
    if meta_extra:
        w.meta.update(meta_extra)
    w.set_source("host_ioctl", "captured")
    w.set_source("qemu_uprobes", "captured")
    qe, io = [], []
    seq = 0
    t = t0
    # Two memslots of 256 MiB each, both dirty-logged, mapping HVA0.. to GPA 0..
    ms = []
    for slot in (0, 1):
        seq += 1
        ts = t0 - 5 * MS + slot * MS
        io.append(_io(ts, ts - MS // 10, MIG_TID, seq, "SET_USER_MEMORY_REGION", slot=slot))
        ms.append({"ts_ns": ts, "tid": MIG_TID, "seq": seq, "slot": slot, "as_id": 0, "flags": 1,
                   "gpa": slot * SLOT_BYTES, "size": SLOT_BYTES, "hva": HVA0 + slot * SLOT_BYTES, "ret": 0})
    qe.append(_qe(t, MIG_TID, "migrate_state", a1=0, a2=1))               # none -> setup
    sync_starts = [t0 + 1 * MS, t0 + 40 * MS, t0 + 70 * MS]
    n_get = n_clear = 0
    applies = 0
    for d, ts in enumerate(sync_starts):
        final = d == len(sync_starts) - 1
        if final:
            qe.append(_qe(ts - MS // 2, MIG_TID, "migrate_state", a1=4, a2=12))   # active -> device (VM stopped)
        qe.append(_qe(ts, MIG_TID, "precopy_notify", a1=1))
        qe.append(_qe(ts + MS // 10, MIG_TID, "sync_fetch_begin"))
        for slot in (0, 1):
            enter = ts + MS // 5 + slot * MS // 5
            seq += 1
            io.append(_io(enter + MS // 10, enter, MIG_TID, seq, "GET_DIRTY_LOG", slot=slot, pages=dirty[d] // 2))
            n_get += 1
        qe.append(_qe(ts + MS, MIG_TID, "sync_fetch_end"))
        qe.append(_qe(ts + MS + MS // 5, MIG_TID, "precopy_notify", a1=2))
        if d == 0:
            qe.append(_qe(ts + 2 * MS, MIG_TID, "migrate_state", a1=1, a2=4))   # setup -> active
        if not final:
            for i in range(applies_per_epoch[d]):
                a = ts + 5 * MS + i * 2 * MS
                hva = HVA0 + (d * 64 + i) * (4 << 20)
                qe.append(_qe(a, IO_TID, "hint_apply", a0=hva, a1=4 << 20))
                seq += 1
                io.append(_io(a + MS // 4, a + MS // 10, IO_TID, seq, "CLEAR_DIRTY_LOG", slot=0, pages=8,
                              first_page=0, num_pages=1 << 18))
                n_clear += 1
                qe.append(_qe(a + MS // 2, IO_TID, "hint_apply_ret"))
                applies += 1
    for i in range(sends):
        qe.append(_qe(t0 + 3 * MS + i * (60 * MS // sends), MIG_TID, "page_send", a0=HVA0 + i * PAGE, a1=PAGE))
    qe.append(_qe(sync_starts[-1] + 3 * MS, MIG_TID, "precopy_notify", a1=4))   # CLEANUP
    qe.append(_qe(sync_starts[-1] + 3 * MS, MIG_TID, "migrate_state", a1=12, a2=8))  # device -> completed
    qdf = pd.DataFrame(qe).sort_values("ts_ns", kind="stable")
    for c in ("a0", "a1", "a2"):
        qdf[c] = qdf[c].astype(np.uint64)
    w.append("qemu_events", qdf)
    w.append("ioctls", pd.DataFrame(io))
    mdf = pd.DataFrame(ms)
    w.append("memslots", mdf.astype({"flags": np.uint32, "gpa": np.uint64, "size": np.uint64, "hva": np.uint64}))
    w.close("target-exit")
    return {"syncs": len(sync_starts), "epochs": len(sync_starts) - 1, "applies": applies,
            "get": n_get, "clear": n_clear, "sends": sends}


def test_host_bundle_reads_back(tmp_path):
    counts = write_host_bundle(tmp_path / "b")
    b = read_bundle(tmp_path / "b")
    qe = b.table("qemu_events")
    assert (qe["event"] == "hint_apply").sum() == counts["applies"] == 9
    assert (b.table("ioctls")["name"] == "GET_DIRTY_LOG").sum() == counts["get"]
    assert len(b.table("memslots")) == 2
    assert b.problems == []
