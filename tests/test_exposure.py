"""analysis/exposure.py on a recorded Linux-guest run, and the reuse-before-apply levels per dirty mode.

samples/linux-exposure-anon: `hintscope lab migrate --guest linux --smp 2 --qemu <10.0.2> --burst anon
--burst-at bulk --init-on-alloc 1` (Debian 6.1 under TCG), compacted.  The real driver returned 79 blocks
through the shrinker before DONE, every one after the host had applied it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hintscope.analysis import detector, exposure
from hintscope.analysis.checks.guest import reuse_level
from hintscope.analysis.context import Context
from hintscope.bundle import read_bundle
from hintscope.sim.write import MemoryBundle

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "linux-exposure-anon"


@pytest.fixture(scope="module")
def sample():
    return read_bundle(SAMPLE)


def _memory(b) -> MemoryBundle:
    return MemoryBundle(dict(b.meta), {n: b.table(n) for n in b.tables()}, list(b.problems))


def test_sample_counts_match_the_raw_guest_tables(sample):
    r = exposure.run_exposure(sample)
    hints, rets, reuse = sample.table("guest_hints"), sample.table("guest_returns"), sample.table("guest_reuse")
    assert r["hinted_blocks"] == len(hints) and r["hinted_pages"] == int((1 << hints["order"].to_numpy(np.int64)).sum())
    sh = rets[rets["reason"] == "shrinker"]
    ge = sample.table("guest_events")
    done_g = ge.loc[(ge["event"] == "cmd_id") & (ge["a0"].astype(np.int64) == 1), "guest_ns"].min()
    assert r["returned_early"] == len(sh) == 79
    assert r["returned_before_done"] == int((sh["guest_ns"] < done_g).sum())
    assert r["shrinker_calls"] == int((ge["event"] == "shrinker_enter").sum())
    # every page an allocation covered after a shrinker return, once per return (the parser's own
    # returned_ns join, guest_stream._last_before, is the independent path)
    o = reuse["order"].to_numpy(np.int64)
    pages = np.concatenate([np.arange(p, p + (1 << k)) for p, k in zip(reuse["pfn"].astype(np.int64), o)])
    ret = np.repeat(reuse["returned_ns"].to_numpy(np.int64), 1 << o)
    in_sh = np.isin(ret, sh["guest_ns"].to_numpy(np.int64))
    assert r["reused_pages"] == len(set(zip(pages[in_sh].tolist(), ret[in_sh].tolist())))
    # the measured result: no return and no write landed before its block's apply
    assert r["returned_before_apply"] == r["written_before_apply"] == r["exposed"] == 0
    assert r["min_return_after_apply_ms"] > 0 and r["mode"] == "tcg"
    b = exposure.block_exposure(sample)
    assert (b.loc[b["return_reason"] == "shrinker", "returned_before_apply"] == "no").all()
    assert b["applied"].all() and (b["hint_to_apply_ns"] > 0).all()


def _with_early_write(sample, in_round: int = 1, block_pfn: int | None = None):
    """The sample plus one shrinker return and one order-0 allocation after a hint, before its apply
    (at a third and at half of the block's hint-to-apply window: clear of the 1 ms clock band)."""
    blocks = exposure.block_exposure(Context(sample))
    cand = blocks[(blocks["round"] == in_round) & (blocks["return_reason"] != "shrinker")]
    if block_pfn is not None:
        cand = cand[cand["block_pfn"] == block_pfn]
    blk = cand.loc[cand["hint_to_apply_ns"].idxmax()]
    w = int(blk["hint_to_apply_ns"])
    assert w > 4_000_000, "the sample needs an apply that came > 4 ms after its hint"
    g_ret, g_write = int(blk["hint_g"]) + w // 3, int(blk["hint_g"]) + w // 2
    m = _memory(sample)
    t = m._tables
    t["guest_returns"] = pd.concat([t["guest_returns"], pd.DataFrame({
        "guest_ns": [g_ret], "side": ["src"], "tid": [45], "pfn": np.array([blk["block_pfn"]], np.uint64),
        "order": [10], "reason": ["shrinker"]})], ignore_index=True)
    t["guest_reuse"] = pd.concat([t["guest_reuse"], pd.DataFrame({
        "guest_ns": [g_write], "side": ["src"], "tid": [459], "pfn": np.array([blk["block_pfn"] + 7], np.uint64),
        "order": [0], "gfp": np.array([0], np.uint64), "block_pfn": np.array([blk["block_pfn"]], np.uint64),
        "returned_ns": [g_ret]})], ignore_index=True)
    return m, blk


def test_a_write_before_the_apply_in_the_bulk_round_is_exposed(sample):
    m, blk = _with_early_write(sample)
    p = exposure.page_exposure(m)
    row = p[(p["gfn"] == int(blk["block_pfn"]) + 7) & (p["hint_g"] == blk["hint_g"])].iloc[0]
    assert row["before_apply"] == "sure" and bool(row["bulk"]) and bool(row["exposed"])
    assert row["hint_to_write_ns"] == int(blk["hint_to_apply_ns"]) // 2 and row["write_to_apply_ns"] > 0
    # QEMU's default 1 GiB clear chunk is the whole guest: the migration thread's first send re-armed it
    # before this write, so at the default chunk it is recorded (exposed_chunk False)
    assert row["chunk_rearm_ns"] < row["apply_ns"] and not row["exposed_chunk"]
    r = exposure.run_exposure(m)
    assert (r["returned_before_apply"], r["written_before_apply"], r["exposed"]) == (1, 1, 1)


def test_detector_reports_tcg_reuse_before_apply_as_a_note(sample):
    m, blk = _with_early_write(sample)
    res = detector.run(m)
    f = res.frame[res.frame["kind"] == "reuse-before-apply"]
    assert list(f["confidence"]) == ["note"]
    assert f["gfns"].iloc[0] == [int(blk["block_pfn"]) + 7]
    assert "TCG" in f["sentence"].iloc[0] and "wrote) 1 of their pages" in f["sentence"].iloc[0]
    assert res.verdict != "unsafe ordering found"
    # the unmodified run has no early return before an apply: no such finding at all
    base = detector.run(sample).frame
    assert "reuse-before-apply" not in set(base["kind"])


def test_later_round_write_is_not_guessed():
    """Outside the bulk round only a harvest can say the page was unarmed: TCG has none, so NA."""
    b = read_bundle(SAMPLE)
    blocks = exposure.block_exposure(b)
    ok = (blocks["round"] > 1) & (blocks["hint_to_apply_ns"] > 4e6) & (blocks["return_reason"] != "shrinker")
    if not ok.any():
        pytest.skip("the sample has no slow later-round apply to place a write before")
    m, blk = _with_early_write(b, in_round=int(blocks.loc[ok, "round"].iloc[0]))
    p = exposure.page_exposure(m)
    row = p[(p["gfn"] == int(blk["block_pfn"]) + 7) & (p["hint_g"] == blk["hint_g"])].iloc[0]
    assert row["before_apply"] == "sure" and pd.isna(row["exposed"])


def test_later_round_write_is_exposed_when_the_round_before_wrote_the_page():
    """Block 0x1e800 was hinted in round 2 and again in round 3: with init_on_alloc=1 the driver's own
    allocation zeroed it in round 2, so sync 3 harvested it dirty and a write before its round-3 apply
    is exposed (the round-2 reuse of the block shows it too); with init_on_alloc=0 and without that reuse,
    nothing shows the page dirty and the answer is NA."""
    b = read_bundle(SAMPLE)
    blocks = exposure.block_exposure(b)
    assert set(blocks.loc[blocks["block_pfn"] == 0x1e800, "round"]) >= {2, 3}
    m, blk = _with_early_write(b, in_round=3, block_pfn=0x1e800)
    p = exposure.page_exposure(m)
    row = p[(p["gfn"] == 0x1e800 + 7) & (p["hint_g"] == blk["hint_g"])].iloc[0]
    assert row["before_apply"] == "sure" and row["dirty_at_sync"] and bool(row["exposed"])
    m.meta["lab"] = {**m.meta["lab"], "init_on_alloc": 0}
    u = m._tables["guest_reuse"]
    m._tables["guest_reuse"] = u[~((u["block_pfn"].astype(np.int64) == 0x1e800) & (u["guest_ns"] < blk["hint_g"]))]
    p0 = exposure.page_exposure(m)
    row0 = p0[(p0["gfn"] == 0x1e800 + 7) & (p0["hint_g"] == blk["hint_g"])].iloc[0]
    assert not row0["dirty_at_sync"] and pd.isna(row0["exposed"])


@pytest.mark.parametrize("mode,exposed,settled,level", [
    ("tcg", True, True, "note"), ("get", True, True, "note"), ("ring", True, True, "note"),
    ("unknown", True, True, "note"), ("manual", False, True, "note"),
    ("manual", True, True, "hazard"), ("manual", True, False, "ambiguous"),
])
def test_reuse_level_per_dirty_mode(mode, exposed, settled, level):
    assert reuse_level(mode, exposed, settled) == level
