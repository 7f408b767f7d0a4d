"""The protocol simulator: determinism, bundle round trip, and the ground truth it produces."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hintscope.bundle import read_bundle
from hintscope.sim import variants as V
from hintscope.sim.model import MODES, SimConfig, Sim, pack_words, word_runs
from hintscope.sim.write import simulate, write_bundle


def test_same_seed_same_run():
    a = simulate("shrinker-reuse", 7, "manual")
    b = simulate("shrinker-reuse", 7, "manual")
    for t in ("qemu_events", "bitmap_words", "guest_hints", "ground_truth"):
        pd.testing.assert_frame_equal(a.table(t), b.table(t))
    c = simulate("shrinker-reuse", 8, "manual")
    assert not a.table("qemu_events").equals(c.table("qemu_events"))


@pytest.mark.parametrize("mode", MODES)
def test_qemu_loses_nothing_and_deferred_filter_does(mode):
    ok = simulate("qemu", 1, mode).table("ground_truth")
    assert not ok["lost"].any()
    # hinting skipped free pages: they are stale on the destination, which is allowed
    assert ok["stale"].sum() > 100
    bad = simulate("filter-after-sync", 1, mode).table("ground_truth")
    assert bad["lost"].sum() > 0
    assert set(bad.loc[bad["lost"], "reason"]) == {"hint"}


def test_clear_on_apply_loses_only_under_manual_protect():
    lost = {m: int(sum(simulate("clear-on-apply", s, m).table("ground_truth")["lost"].sum() for s in range(3)))
            for m in MODES}
    assert lost["manual"] > 0 and lost["get"] == 0 and lost["ring"] == 0
    gt = simulate("clear-on-apply", 0, "manual").table("ground_truth")
    assert (gt.loc[gt["lost"], "cause"] == "rearm-wipe").any()


def test_resend_bug_is_not_a_hint_loss():
    gt = pd.concat([simulate("resend-bug", s, "get").table("ground_truth") for s in range(3)])
    assert gt["lost"].sum() > 0
    assert set(gt.loc[gt["lost"], "reason"]) == {"not-hint"}


def test_tables_match_the_probe_schema_and_clock_domains():
    b = simulate("qemu", 2, "ring")
    qe = b.table("qemu_events")
    assert {"hint_apply", "hint_apply_ret", "precopy_notify", "sync_fetch_begin", "sync_fetch_end",
            "migrate_state", "notify_config"} <= set(qe["event"])
    # sends are the tap's runs, not one uprobe row per page
    assert "page_send" not in set(qe["event"]) and b.meta["sources"]["tap"]["status"] == "captured"
    assert qe["ts_ns"].is_monotonic_increasing
    assert len(b.table("ring_push")) and len(b.table("ring_reset"))
    assert not b.has("lost_pages") or len(b.table("lost_pages")) == int(b.table("ground_truth")["stale"].sum())
    # guest times are on a different clock (offset by about an hour in the model)
    g = b.table("guest_hints")["guest_ns"].to_numpy()
    assert np.all(np.abs(g - qe["ts_ns"].iloc[0]) > 10**12)


def test_bundle_round_trip_and_cli(tmp_path, capsys):
    from hintscope.analysis import detector
    from hintscope.cli import main
    out = tmp_path / "b"
    assert main(["simulate", "--variant", "filter-after-sync", "--mode", "get", "--seed", "3", "-o", str(out)]) == 0
    assert "lost pages" in capsys.readouterr().out
    disk = read_bundle(out)
    assert disk.complete and disk.meta["sim"]["variant"] == "filter-after-sync"
    mem = simulate("filter-after-sync", 3, "get")
    fd, fm = detector.detect(disk), detector.detect(mem)
    assert fd[["kind", "confidence", "gfn_count"]].equals(fm[["kind", "confidence", "gfn_count"]])


def test_cli_rejects_bad_pages(tmp_path):
    from hintscope.cli import main
    assert main(["simulate", "--pages", "1000", "-o", str(tmp_path / "x")]) == 2
    # the scale preset's hint blocks are 1024 pages
    assert main(["simulate", "--preset", "scale", "--pages", "1536", "-o", str(tmp_path / "x")]) == 2
    assert main(["simulate", "--pages", "4096", "--gib", "1", "-o", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_cli_scale_preset_bundle(tmp_path, capsys):
    from hintscope.cli import main
    out = tmp_path / "b"
    assert main(["simulate", "--variant", "qemu", "--mode", "ring", "--preset", "scale", "--pages", "65536",
                 "-o", str(out)]) == 0
    assert "pages 65536" in capsys.readouterr().out
    b = read_bundle(out)
    cfg, truth = b.meta["sim"]["config"], b.meta["sim"]["truth"]
    assert (cfg["block_order"], cfg["clear_chunk_pages"], cfg["pages"]) == (10, 1 << 18, 65536)
    assert truth["pages"] == 65536 and 0 < truth["in_use"] < 65536 and truth["lost"] == 0
    gt = b.table("ground_truth")
    assert len(gt) == truth["stale"] > 0 and gt["stale"].all()
    assert b.meta["rows"]["ring_push"] == len(b.table("ring_push")) > 0
    assert len(b.table("lost_pages")) == truth["stale"]


def test_blocking_bulk_records_a_stall():
    b = simulate("blocking-bulk", 0, "get")
    assert b.meta["sim"]["bulk_stall_ns"] > 2_000_000
    assert simulate("qemu", 0, "get").meta["sim"]["bulk_stall_ns"] == 0


def test_every_variant_documented():
    for v in V.VARIANTS.values():
        assert v.doc and v.name


def _sent_pages(b) -> tuple[np.ndarray, np.ndarray]:
    """(ts_ns, page) of every page in the page_sends runs, pages interpolated as the analysis does."""
    ps = b.table("page_sends")
    assert (ps["block"] == "pc.ram").all()
    ms = ps[ps["kind"] == "mem-size"]
    assert len(ms) == 1 and int(ms["npages"].iloc[0]) == b.meta["sim"]["truth"]["pages"]
    r = ps[ps["sent"]]
    n = r["npages"].to_numpy(np.int64)
    rep = np.repeat(np.arange(len(r)), n)
    i = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    p0 = r["offset"].to_numpy(np.int64)[rep] // 4096
    t0, t1 = r["ts_ns"].to_numpy(np.int64)[rep], r["ts_end_ns"].to_numpy(np.int64)[rep]
    return t0 + (t1 - t0) * i // np.maximum(n[rep] - 1, 1), p0 + i


@pytest.mark.parametrize("variant,mode", [("resend-bug", "manual"), ("shrinker-reuse", "ring"),
                                          ("filter-after-sync", "get")])
def test_page_sends_runs_cover_exactly_the_pages_sent(variant, mode):
    # the per-page uprobe rows (kept as an option for small sims) are the reference
    from hintscope.sim.write import MemoryBundle, frames, meta_for
    sim = Sim(V.get(variant), 4, SimConfig(mode=mode, page_send_events=True)).run()
    b = MemoryBundle(meta_for(sim, False), frames(sim, False))
    qe = b.table("qemu_events")
    ref = qe[qe["event"] == "page_send"]
    ts, page = _sent_pages(b)
    assert len(ref) == len(page) > 2000
    # each page's last send in the runs is the one the model's state (and ground truth) holds
    last = pd.Series(ts).groupby(page).max()
    assert np.array_equal(last.index.to_numpy(), np.flatnonzero(sim.last_send >= 0))
    assert np.array_equal(last.to_numpy(), sim.stamp_ns(sim.last_send, np.arange(sim.n))[last.index])
    o = np.lexsort((page, ts))
    r = np.lexsort((ref["a0"].to_numpy(), ref["ts_ns"].to_numpy()))
    assert np.array_equal(ts[o], ref["ts_ns"].to_numpy(np.int64)[r])
    assert np.array_equal(0x7F00_0000_0000 + page[o] * 4096, ref["a0"].to_numpy().astype(np.int64)[r])
    # runs are contiguous ascending pages within a pass, and the passes are rounds then the final copy
    ps = b.table("page_sends")
    s = ps[ps["sent"]]
    assert (s["npages"] > 0).all() and set(s["phase"]) == {"iterate", "complete"}
    assert (s.groupby("scan_pass")["offset"].apply(lambda x: x.is_monotonic_increasing)).all()


def test_page_sends_place_through_the_memslots():
    """The analysis maps (pc.ram, offset) to gfns via the memslot at GPA 0 (CONTRACT: HVA layout)."""
    from hintscope.analysis.context import Context
    b = simulate("qemu", 0, "manual")
    c = Context(b)
    assert c.send_source == "tap"
    ts, page = _sent_pages(b)
    gfn = np.where(page < 2048, page, 0x1_0000_0000 // 4096 + page - 2048)
    got = c.sends.sort_values(["ts_ns", "gfn"])
    assert np.array_equal(got["gfn"].to_numpy(np.int64), gfn[np.lexsort((gfn, ts))])


def test_words_are_runs_of_the_kvm_bitmap():
    rng = np.random.default_rng(0)
    bits = np.zeros(64 * 40 + 17, bool)
    bits[64 * 3: 64 * 9] = True                  # 6 full words: one run
    bits[64 * 20 + 5] = True
    bits[64 * 21 + 5] = True                     # two equal words, adjacent: one run of 2
    bits[-3:] = rng.random(3) < 2                # the partial last word
    words = pack_words(bits)
    ref = np.array([sum(1 << i for i in range(64) if 64 * w + i < len(bits) and bits[64 * w + i])
                    for w in range(len(words))], dtype=np.uint64)
    assert np.array_equal(words, ref)
    first, n, mask = word_runs(words)
    assert first.tolist() == [3, 20, 40] and n.tolist() == [6, 2, 1]
    assert mask.tolist() == [2**64 - 1, 1 << 5, 0b111 << 14]


def test_ground_truth_holds_the_stale_pages_only():
    sim = Sim(V.get("clear-on-apply"), 1, SimConfig(mode="manual")).run()
    gt = sim.ground_truth()
    stale = np.flatnonzero(sim.dest_ver != sim.src_ver)
    assert gt["stale"].all() and np.array_equal(gt["gfn"].to_numpy(np.int64), sim.gfn_of(stale))
    t = sim.truth_totals()
    assert t["stale"] == len(gt) and t["lost"] == int(gt["lost"].sum()) and t["pages"] == 4096
    assert t["in_use"] == int(np.count_nonzero(sim.block == 0)) * 16
    # a page is stale exactly when written after its last send or never sent
    ls, lw = sim.last_send[stale], sim.last_write[stale]
    assert ((ls < 0) | (lw > ls)).all()
    fresh = np.setdiff1d(np.arange(4096), stale)
    assert ((sim.last_send[fresh] >= 0) & (sim.last_write[fresh] < sim.last_send[fresh])).all()


@pytest.mark.parametrize("mode", MODES)
def test_scale_preset_keeps_the_variant_properties(mode):
    """The preset (order-10 blocks, 1 GiB clear chunks) at 512 MiB: the designs lose what they should."""
    cfg = SimConfig.for_guest(1 << 17)
    assert cfg.block_order == 10 and cfg.clear_chunk_pages == 1 << 18
    truth = {v: simulate(v, 0, mode, dest_compare=False, cfg=cfg).meta["sim"]["truth"]
             for v in ("qemu", "filter-after-sync", "resend-bug")}
    q = truth["qemu"]
    assert q["lost"] == 0 and q["stale"] > q["pages"] // 4     # hinted free pages are skipped
    assert truth["filter-after-sync"]["lost"] == truth["filter-after-sync"]["lost_hint"] > 0
    assert truth["resend-bug"]["lost"] == truth["resend-bug"]["lost_not_hint"] > 0


def test_scale_preset_work_per_gib_is_constant():
    """Rows per GiB of the page-level tables stay put when the guest grows 4x (the benchmark's premise)."""
    rows = {}
    for pages in (1 << 16, 1 << 18):
        sim = Sim(V.get("qemu"), 0, SimConfig.for_guest(pages, mode="ring")).run()
        gib = pages / (1 << 18)
        rows[pages] = (len(sim.rec.sends) / gib, len(sim.rec.ring_push) / gib,
                       sim.truth_totals()["stale"] / gib)
    for a, b in zip(rows[1 << 16], rows[1 << 18]):
        assert 0.5 < b / a < 2, rows
