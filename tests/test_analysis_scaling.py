"""analyze must scale about linearly in the number of syncs (docs/performance.md, "analyze scaling").

A synthetic capture of N dirty-ring syncs (one KVM_RESET_DIRTY_RINGS each) with a hint apply every
few syncs is analysed at N and 8N rows.  The per-epoch accounting used to scan every hinted page
once per epoch (epochs x pages) and the per-sync notes did a pandas row lookup each, so 8x the rows
cost far more than 8x the time.  Only the ratio of the two runs is checked (shared, loaded machine).
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from hintscope import schema
from hintscope.bundle import BundleWriter, read_bundle

HVA = 0x7F00_0000_0000
SLOT_BYTES = 1 << 30


def _zeros(table: str, n: int) -> pd.DataFrame:
    return pd.DataFrame({c.name: (np.full(n, "", dtype=object) if c.dtype == "string" else np.zeros(n, c.dtype))
                         for c in schema.get(table).cols})


def write_ring_storm(path, n: int, hint_every: int = 4):
    """n RESET_DIRTY_RINGS ioctls 20 us apart; one 4-page hint_apply between every hint_every-th pair."""
    w = BundleWriter(path, producer="test analysis scaling")
    ms = _zeros("memslots", 1)
    ms["ts_ns"], ms["size"], ms["hva"], ms["flags"] = 1, SLOT_BYTES, HVA, 1
    w.append("memslots", ms)
    io = _zeros("ioctls", n)
    ts = 1_000_000_000 + np.arange(n, dtype=np.int64) * 20_000
    io["ts_ns"], io["enter_ns"], io["seq"] = ts, ts - 1_000, np.arange(n)
    io["name"], io["slot"], io["pages"], io["fd"] = "RESET_DIRTY_RINGS", -1, 3, 12
    w.append("ioctls", io)
    k = np.arange(0, n, hint_every)
    qe = _zeros("qemu_events", 2 * len(k))
    t = np.repeat(ts[k] + 5_000, 2) + np.tile([0, 1_000], len(k))
    qe["ts_ns"], qe["tid"] = t, 9
    qe["event"] = np.tile(["hint_apply", "hint_apply_ret"], len(k))
    page = (k * 7) % (SLOT_BYTES // 4096 - 4)
    qe["a0"] = np.repeat(HVA + page.astype(np.uint64) * 4096, 2) * np.tile(np.array([1, 0], np.uint64), len(k))
    qe["a1"] = np.repeat(np.uint64(4 * 4096), 2 * len(k)) * np.tile(np.array([1, 0], np.uint64), len(k))
    w.append("qemu_events", qe)
    w.close(end_reason="duration")
    return path


def _analyze_seconds(path) -> tuple[float, dict]:
    from hintscope.analysis.summary import analyze, to_json

    t = time.perf_counter()
    res = analyze(read_bundle(path))
    to_json(res)
    return time.perf_counter() - t, res


def test_analyze_time_grows_about_linearly_with_syncs(tmp_path):
    n = 1_000
    small = write_ring_storm(tmp_path / "small", n)
    big = write_ring_storm(tmp_path / "big", 8 * n)
    _analyze_seconds(small)                       # warm caches/imports before timing
    t_small, r_small = _analyze_seconds(small)
    t_big, r_big = _analyze_seconds(big)
    # The bundles are what they claim: one sync per reset, hinted pages in many epochs.
    assert len(r_small["syncs"]) == n and len(r_big["syncs"]) == 8 * n
    pe = r_big["accounting"]["per_epoch"]
    assert r_big["accounting"]["totals"]["applied_pages"] == 4 * len(range(0, 8 * n, 4))
    assert (pe["applied_pages"] > 0).sum() > 1_000
    ratio = t_big / max(t_small, 1e-3)
    assert ratio < 20, f"8x the syncs took {ratio:.1f}x the time ({t_small:.2f} s -> {t_big:.2f} s)"


def test_terminal_tables_are_capped_json_is_not(tmp_path, capsys):
    from hintscope.analysis import cli as acli
    from hintscope.cli import main

    n = acli.MAX_ROWS_SHOWN + 50
    b = write_ring_storm(tmp_path / "b", n)
    assert main(["analyze", str(b)]) == 0
    out = capsys.readouterr().out
    assert f"50 more syncs not shown (first {acli.MAX_ROWS_SHOWN} of {n}" in out
    assert main(["analyze", "--json", str(b)]) == 0
    import json
    assert len(json.loads(capsys.readouterr().out)["syncs"]) == n
