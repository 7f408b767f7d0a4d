"""Analysis: address translation, bitmap expansion, per-sync table, hint accounting, analyze CLI."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hintscope.analysis import harvest, memslots as ms
from hintscope.analysis.context import Context
from hintscope.analysis.hints import accounting
from hintscope.analysis.summary import analyze, counter_checks, cross_checks, summarize
from hintscope.analysis.syncs import sync_table
from hintscope.bundle import BundleWriter, read_bundle, write_json_atomic
from hintscope.cli import main

DATA = Path(__file__).parent / "data"


# -- bitmaps ---------------------------------------------------------------------------------
def test_expand_words_known_bitmap():
    # word 0 = pages 0,1,3; word 2 bit 63 = page 191; word 5 all ones = pages 320..383
    words = np.array([0, 2, 5])
    masks = np.array([0b1011, 1 << 63, 2**64 - 1], dtype=np.uint64)
    row, page = harvest.expand_words(words, masks)
    assert page.tolist() == [0, 1, 3, 191] + list(range(320, 384))
    assert row.tolist() == [0, 0, 0, 1] + [2] * 64
    assert harvest.popcount(masks).tolist() == [3, 1, 64]


def _slots():
    # Two RAM slots like QEMU's pc.ram split below 1 MiB, plus a slot deleted at t=500.
    ev = pd.DataFrame({
        "ts_ns": [100, 110, 120, 500],
        "as_id": [0, 0, 0, 0],
        "slot": [0, 4, 7, 7],
        "flags": [1, 1, 0, 0],
        "gpa": [0x0, 0x100000, 0x200000000, 0x200000000],
        "size": [0xC0000, 0x7F00000, 0x10000, 0],
        "hva": [0x7F0000000000, 0x7F0000100000, 0x7F1000000000, 0x7F1000000000],
    })
    return ms.intervals(ev)


def test_hva_to_gpa_two_slots_and_time():
    iv = _slots()
    hva = np.array([0x7F0000000000, 0x7F00000BF000, 0x7F00000C0000, 0x7F0000100000, 0x7F0000123456,
                    0x7F1000001000, 0x7F1000001000, 0x1234])
    ts = np.array([200, 200, 200, 200, 200, 200, 600, 200])
    gpa, slot = ms.hva_to_gpa(hva, ts, iv)
    # 0xC0000..0x100000 is not mapped by any slot (ROM/VGA hole); slot 7 is gone at t=600.
    assert gpa.tolist() == [0x0, 0xBF000, -1, 0x100000, 0x123456, 0x200001000, -1, -1]
    assert slot.tolist() == [0, 0, -1, 4, 4, 7, -1, -1]
    # Before the first event the first mapping of a slot is assumed (probe attached late).
    assert ms.hva_to_gpa(np.array([0x7F0000100000]), np.array([0]), iv)[0].tolist() == [0x100000]


def test_slot_page_to_gfn():
    iv = _slots()
    gfn = ms.slot_page_to_gfn(np.array([0, 4, 4, 4, (1 << 16) | 4, 9]), np.array([5, 0, 0x7EFF, 0x7F00, 0, 0]),
                              np.array([200] * 6), iv)
    assert gfn.tolist() == [5, 0x100, 0x100 + 0x7EFF, -1, -1, -1]


def test_expand_ranges():
    idx, addr = ms.expand_ranges(np.array([0x1000, 0x2FFF, 0x5000]), np.array([0x2000, 2, 0]))
    assert idx.tolist() == [0, 0, 1, 1]
    assert addr.tolist() == [0x1000, 0x2000, 0x2000, 0x3000]


# -- a real lab run (QEMU 7.2, KVM, no probe): trace log + QMP ---------------------------------
@pytest.fixture(scope="module")
def lab_bundle(tmp_path_factory) -> Path:
    info = json.loads((DATA / "lab-dirtier-7.2.json").read_text())
    p = tmp_path_factory.mktemp("lab") / "b"
    w = BundleWriter(p, producer="test lab replay")
    w.attach_file("qemu-trace.log").write_bytes(gzip.decompress((DATA / "qemu-trace-7.2-kvm-dirtier.log.gz").read_bytes()))
    w.meta["qemu_trace"] = info["qemu_trace"]
    w.append("qmp", pd.DataFrame(info["qmp"]))
    w.set_source("lab_qmp", "captured")
    w.close(end_reason="target-exit")
    meta = json.loads((p / "meta.json").read_text())
    meta["clock_anchors"] = info["clock_anchors"]  # the run's own anchors, not this test's
    write_json_atomic(p / "meta.json", meta)
    return p


def test_real_trace_hva_to_gpa_matches_ramblock_offsets(lab_bundle):
    """pc.ram offset == GPA below 4 GiB: every page QEMU sent must map back to its own offset."""
    c = Context(read_bundle(lab_bundle))
    assert c.memslot_source == "qemu_trace"
    rsp = c.trace[(c.trace["event"] == "ram_save_page") & (c.trace["block"] == "pc.ram")]
    assert len(rsp) > 1000
    gpa, slot = ms.hva_to_gpa(rsp["hva"].to_numpy(), rsp["ts_ns"].to_numpy(), c.iv)
    assert (gpa == rsp["offset"].to_numpy()).all()
    assert len(set(slot.tolist())) >= 2  # the run's RAM is split over several slots


def test_real_trace_sync_table(lab_bundle):
    c = Context(read_bundle(lab_bundle))
    s = sync_table(c)
    assert s["source"].tolist() == ["qemu_trace"] * 3
    assert s["qemu_dirty_pages"].tolist() == [0, 161, 161]
    # 7.2 sums num_dirty_pages_period until 1 s has passed: syncs 2 and 3 are 9 ms apart.
    assert s["qemu_new_pages"].tolist() == [0, 161, 0]
    assert s["epoch"].tolist() == [1, 2, -1]  # the final sync runs with the VM stopped
    assert s["clear_calls"].tolist() == [6, 0, 6]
    assert (s["fetch_start_ns"] > 0).all() and (s["fetch_end_ns"] >= s["fetch_start_ns"]).all()
    assert cross_checks(c, s) == []  # QMP dirty-sync-count 3 == 3 syncs == 3 trace syncs
    k = {x["check"]: (x["capture"], x["qemu"], x["agree"]) for x in counter_checks(c, s)}
    assert k["QEMU trace ram_save_page vs QMP normal pages"] == (1747, 1747, True)
    assert k["syncs (qemu_trace) vs QMP dirty-sync-count"] == (3, 3, True)
    summ = summarize(c, s)
    m = summ["migration"]
    assert (m["outcome"], m["normal"], m["dirty_sync_count"], m["total_time_ms"], m["downtime_ms"]) == \
        ("completed", 1747, 3, 133, 15)
    # No uprobe: "no applies seen" must not read as "hinting skipped nothing".
    assert summ["hints"]["applies"] is None and summ["hints"]["send_source"] == "ram_save_page"


def test_analyze_cli_json_on_real_bundle(lab_bundle, capsys):
    assert main(["analyze", str(lab_bundle), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) >= {"summary", "syncs", "accounting", "cross_checks", "verdict", "coverage", "checks",
                        "findings"}
    assert [r["qemu_dirty_pages"] for r in doc["syncs"]] == [0, 161, 161]
    assert doc["summary"]["syncs"] == 3
    assert doc["verdict"] == doc["summary"]["findings"]["verdict"] and isinstance(doc["findings"], list)


def test_analyze_cli_tables_and_baseline(lab_bundle, capsys):
    assert main(["analyze", str(lab_bundle), "--baseline", str(lab_bundle)]) == 0
    out = capsys.readouterr().out
    assert "migration bitmap syncs" in out and "A/B against baseline" in out and "completed" in out


def test_analyze_bad_input_is_one_line(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such bundle" in err


# -- simulator bundle (same schema as the probes) ---------------------------------------------
@pytest.fixture(scope="module")
def sim_bundle(tmp_path_factory):
    sim = pytest.importorskip("hintscope.sim.write")
    p = tmp_path_factory.mktemp("sim") / "b"
    sim.write_bundle(sim.simulate("qemu", 1, mode="manual"), p)
    return read_bundle(p)


def test_sync_table_on_simulator_bundle(sim_bundle):
    b = sim_bundle
    c = Context(b)
    s = sync_table(c)
    qe, io, w = b.table("qemu_events"), b.table("ioctls"), b.table("bitmap_words")
    n_before = int(((qe["event"] == "precopy_notify") & (qe["a1"] == 1)).sum())
    assert len(s) == n_before and (s["source"] == "notify").all()
    # Every GET falls inside a fetch window and every harvested bit is counted once.
    get = io[io["name"] == "GET_DIRTY_LOG"]
    assert s["get_calls"].sum() == len(get)
    assert s["harvested"].sum() == int(harvest.run_popcount(w[w["op"] == "get"]).sum())
    # Per-slot text adds up to the total.
    for r in s.itertuples():
        assert sum(int(x.split(":")[1]) for x in r.harvested_by_slot.split(", ")) == r.harvested
    # CLEARs after the first sync are all accounted to some inter-sync gap.
    clr = io[(io["name"] == "CLEAR_DIRTY_LOG") & (io["ts_ns"] > s["fetch_end_ns"].iloc[0])]
    assert s["clear_calls"].sum() == len(clr)
    assert s["epoch"].tolist() == list(range(1, len(s))) + [-1]
    assert (s["after_ns"] > s["fetch_end_ns"]).all() and (s["fetch_start_ns"] > s["before_ns"]).all()


def test_hint_accounting_on_simulator_bundle(sim_bundle):
    c = Context(sim_bundle)
    a = accounting(c)
    t = a["totals"]
    applies = sim_bundle.table("qemu_events").query("event == 'hint_apply'")
    assert t["applies"] == len(applies) and a["source"] == "tap"   # the simulator writes the tap's page_sends
    assert t["applied_bytes"] == int(applies["a1"].astype("int64").sum())
    # QEMU 7.2 design: applies only inside epochs.
    assert t["applies_outside_epochs"] == 0
    # Each hinted page is either skipped (never sent after its last apply) or resent.
    assert t["skipped_pages"] + t["resent_pages"] >= t["applied_pages"]
    assert t["skipped_pages"] > 0 and t["bytes_saved_upper_bound"] == 4096 * t["skipped_pages"]
    # Independent check of "skipped": a hinted gfn with no page send after its apply.
    rows = c.hint_pages
    sends = c.sends
    last_send = sends.groupby("gfn")["ts_ns"].max()
    last_apply = rows.groupby("gfn")["ts_ns"].max()
    never = (last_send.reindex(last_apply.index).fillna(-1) < last_apply)
    assert int(never.sum()) == t["skipped_pages"]
    pe = a["per_epoch"]
    assert pe["applies"].sum() == t["applies"]
    g = a["guest"]
    assert g is not None and g["blocks"] == len(sim_bundle.table("guest_hints"))


def test_analyze_on_simulator_bundle_is_json_clean(sim_bundle):
    from hintscope.analysis.summary import to_json
    doc = to_json(analyze(sim_bundle))
    json.dumps(doc)
    assert doc["summary"]["epochs"] == doc["summary"]["syncs"] - 1


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_applies_outside_epochs_are_counted_apart(tmp_path):
    sim = pytest.importorskip("hintscope.sim.write")
    sim.write_bundle(sim.simulate("sync-in-io-handler", 3, mode="manual"), tmp_path / "b")
    a = accounting(read_bundle(tmp_path / "b"))
    pe = a["per_epoch"]
    assert a["totals"]["applies_outside_epochs"] > 0
    outside = pe[pe["epoch"] == -1].iloc[0]
    assert outside["applies"] == a["totals"]["applies_outside_epochs"]
    # "late" is relative to an epoch's start: an apply outside every epoch is never late.
    assert outside["late_pages"] == 0
    assert pe["applies"].sum() == a["totals"]["applies"]


# -- a real probed run (host probe + QEMU trace + QMP; QEMU 7.2, KVM, manual protect) -----------
@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    import shutil

    src = DATA / "bundle-lab-probed-7.2"
    p = tmp_path_factory.mktemp("probed") / "b"
    shutil.copytree(src, p)
    gz = p / "files" / "qemu-trace.log.gz"
    (p / "files" / "qemu-trace.log").write_bytes(gzip.decompress(gz.read_bytes()))
    gz.unlink()
    return read_bundle(p)


def test_real_probed_sync_table_matches_qemu_counters(probed):
    c = Context(probed)
    s = sync_table(c)
    assert s["source"].tolist() == ["notify"] * 3 and c.dirty_mode == "manual"
    # Manual protect + INITIALLY_SET: the first GET returns every page of every slot.
    slots = probed.table("memslots")
    assert s["harvested"].iloc[0] == int((slots.drop_duplicates("slot", keep="last")["size"] // 4096).sum())
    assert s["qemu_dirty_pages"].tolist() == [0, 209, 209]
    # The harvest-based estimate of "newly set in the migration bitmap" equals QEMU's own count.
    assert s["qemu_new_pages"].tolist() == s["est_new_pages"].tolist() == [0, 209, 0]
    assert (s["fetch_start_ns"] > s["before_ns"]).all() and (s["after_ns"] > s["fetch_end_ns"]).all()
    # The trace (wall clock, mapped through anchors) lands inside the probe's BEFORE..AFTER, up to the
    # anchors' own uncertainty plus the log's 1 us truncation.
    tol = max(a["uncertainty_ns"] for a in probed.meta["clock_anchors"]) + 1000
    assert ((s["trace_start_ns"] >= s["before_ns"] - tol) & (s["trace_end_ns"] <= s["after_ns"] + tol)).all()
    assert cross_checks(c, s) == ["sync 1: " + s["note"].iloc[0]]


def test_real_probed_hva_mapping_agrees_between_sources(probed):
    c = Context(probed)
    assert c.memslot_source == "memslots"
    tr = c.trace[(c.trace["event"] == "ram_save_page") & (c.trace["block"] == "pc.ram")]
    gpa, _ = ms.hva_to_gpa(tr["hva"].to_numpy(), tr["ts_ns"].to_numpy(), c.iv)
    assert len(tr) > 1000 and (gpa == tr["offset"].to_numpy()).all()
    ev, src = ms.slot_events(None, c.trace)
    gpa2, _ = ms.hva_to_gpa(tr["hva"].to_numpy(), tr["ts_ns"].to_numpy(), ms.intervals(ev))
    assert src == "qemu_trace" and (gpa2 == gpa).all()


def test_hostile_hint_lengths_and_slots_stay_bounded(tmp_path, monkeypatch):
    """Impossible lengths are dropped, the page expansion is capped, and a slot flood is cut short."""
    from hintscope.analysis import context as ctx_mod

    w = BundleWriter(tmp_path / "b", producer="test hostile")
    n = 50
    w.append("qemu_events", pd.DataFrame({
        "ts_ns": np.arange(n, dtype=np.int64) + 10, "tid": np.int32(7), "event": "hint_apply",
        "a0": np.full(n, 0x7F0000000000, dtype=np.uint64),
        "a1": np.r_[np.full(n - 2, 1 << 22), [2**63 + 5, 1 << 40]].astype(np.uint64),
        "a2": np.uint64(0), "ret": np.int64(0)}))
    monkeypatch.setattr(ms, "MAX_INTERVALS", 1000)
    k = ms.MAX_INTERVALS + 10
    w.append("memslots", pd.DataFrame({
        "ts_ns": np.arange(k, dtype=np.int64), "tid": np.int32(1), "seq": np.arange(k, dtype=np.int64),
        "slot": (np.arange(k) % 30000).astype(np.int32), "as_id": np.int32(0), "flags": np.uint32(1),
        "gpa": (np.arange(k, dtype=np.uint64) << np.uint64(22)), "size": np.uint64(1 << 22),
        "hva": np.uint64(0x7F0000000000) + (np.arange(k, dtype=np.uint64) << np.uint64(22)), "ret": np.int64(0)}))
    w.close(end_reason="duration")
    monkeypatch.setattr(ctx_mod, "MAX_EXPANDED_PAGES", 10 * 1024)
    c = Context(read_bundle(tmp_path / "b"))
    hp = c.hint_pages
    assert len(c.hint_applies) == n - 2            # 2**63+5 and 2**40 bytes are impossible
    assert len(hp) <= 10 * 1024 + 10               # capped expansion
    assert any("only the first" in p and "applies" in p for p in c.problems)
    assert any("memslot mappings" in p for p in c.problems)
    assert (hp["gfn"] >= 0).all()                  # slot 0's first version maps the HVA


def test_sync_fallbacks_without_uprobes(probed, tmp_path):
    """Same real run: without uprobes the QEMU trace gives the syncs; without that, grouped GET ioctls do."""
    import shutil

    full = sync_table(probed)
    p = tmp_path / "no-uprobes"
    shutil.copytree(probed.path, p)
    shutil.rmtree(p / "qemu_events")
    s = sync_table(read_bundle(p))
    assert s["source"].tolist() == ["qemu_trace"] * 3
    assert s["harvested"].tolist() == full["harvested"].tolist()
    assert s["est_new_pages"].tolist() == full["est_new_pages"].tolist()  # sends from ram_save_page either way
    shutil.rmtree(p / "files")
    s = sync_table(read_bundle(p))
    assert s["source"].tolist() == ["get_groups"] * 3
    assert s["harvested"].tolist() == full["harvested"].tolist()
    assert s["get_calls"].tolist() == full["get_calls"].tolist()
    assert (s["qemu_dirty_pages"] == -1).all() and (s["est_new_pages"] == -1).all()  # no trace, no sends


# -- a real run with hints (bare-metal hinting guest under KVM, host probe attached) ---------------
def test_real_hint_applies_map_to_the_gfns_the_guest_hinted():
    """Host uprobe HVAs -> GPAs through the probe's memslots == the guest's own log of hinted blocks."""
    b = read_bundle(DATA / "bundle-hintguest-probed-7.2")
    guest = pd.DataFrame(json.loads((DATA / "hintguest-hints.json").read_text())["hints"])
    c = Context(b)
    s = sync_table(c)
    a = accounting(c, s)
    hp = c.hint_pages
    want = np.concatenate([np.arange(g, g + n) for g, n in zip(guest["gfn"], guest["npages"])])
    assert sorted(hp["gfn"].tolist()) == sorted(want.tolist())
    # Each guest round (cmd id 0x80000000 + k) was applied inside host epoch k.
    rows = a["per_epoch"].set_index("epoch")
    for k, g in guest.groupby("round"):
        assert rows.loc[k, "applied_pages"] == int(g["npages"].sum())
    t = a["totals"]
    assert (t["applies"], t["applied_pages"], t["applies_outside_epochs"]) == (24, 24576, 0)
    # No page sends in this copy: the estimate from later harvests, and "late" cannot be known.
    assert a["source"] == "none" and t["late_pages"] is None
    assert t["skipped_pages"] == 24576  # the polite guest never touches a hinted block again
    # The apply's KVM_CLEAR_DIRTY_LOG re-arms whole 1 GiB clear_bmap chunks (x-clear-bitmap-shift 18).
    assert s["rearmed_by_hint"].iloc[0] == 1 << 18
    assert s["harvested"].iloc[0] == 524352 and c.dirty_mode == "manual"
    assert summarize(c, s, a)["migration"]["dirty_sync_count"] == len(s) == 7


@pytest.mark.parametrize("mode", ["ring", "get"])
def test_sync_table_other_dirty_modes(tmp_path, mode):
    sim = pytest.importorskip("hintscope.sim.write")
    sim.write_bundle(sim.simulate("qemu", 2, mode=mode), tmp_path / "b")
    b = read_bundle(tmp_path / "b")
    c = Context(b)
    s = sync_table(c)
    assert c.dirty_mode == mode
    if mode == "ring":
        rp = b.table("ring_push")
        assert s["ring_pages"].sum() == len(rp)           # every push lands in some sync's window
        assert (s["harvested"] <= s["ring_pages"]).all()  # distinct pages <= pushes
        assert s["harvested"].sum() >= rp.drop_duplicates(["slot", "offset"]).shape[0]
    else:
        assert (s["ring_pages"] == -1).all()
    # Legacy GET and ring reset re-arm exactly what they harvest.
    assert (s["rearmed"] == s["harvested"]).all()
    assert (s["est_new_pages"] >= 0).all() and (s["est_new_pages"] <= s["harvested"]).all()


# More seeds on demand: HS_FUZZ_SEEDS=40 pytest -k random
FUZZ_SEEDS = int(os.environ.get("HS_FUZZ_SEEDS", "4"))


@pytest.mark.parametrize("seed", range(FUZZ_SEEDS))
def test_analyze_survives_random_tables(tmp_path, seed):
    """Schema-valid but meaningless rows (any value in any column) never crash the analysis."""
    from hintscope import schema
    from hintscope.analysis.summary import to_json

    rng = np.random.default_rng(seed)
    words = {"qemu_events": ["hint_apply", "hint_apply_ret", "precopy_notify", "sync_fetch_begin", "sync_fetch_end",
                             "migrate_state", "page_send", "junk"],
             "ioctls": ["GET_DIRTY_LOG", "CLEAR_DIRTY_LOG", "SET_USER_MEMORY_REGION", "RESET_DIRTY_RINGS",
                        "ENABLE_CAP", "?"],
             "bitmap_words": ["get", "clear", "x"]}
    w = BundleWriter(tmp_path / "b", producer="test fuzz")
    n = 300
    for name in ["qemu_events", "ioctls", "memslots", "bitmap_words", "ring_push", "ring_reset"]:
        cols = {}
        for col in schema.get(name).cols:
            if col.dtype == "string":
                pool = words.get(name, ["a"])
                cols[col.name] = rng.choice(pool, n)
            elif col.dtype == "bool":
                cols[col.name] = rng.integers(0, 2, n).astype(bool)
            else:
                info = np.iinfo(col.dtype)
                small = rng.integers(-3, 40, n)
                big = rng.integers(info.min, info.max, n, dtype=col.dtype, endpoint=True)
                v = np.where(rng.random(n) < 0.5, np.clip(small, info.min, info.max), big).astype(col.dtype)
                cols[col.name] = v
        if "ts_ns" in cols:
            cols["ts_ns"] = rng.integers(-10**12, 10**12, n)
        w.append(name, pd.DataFrame(cols))
    w.attach_file("qemu-trace.log").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    w.close(end_reason="sigterm")
    res = analyze(read_bundle(tmp_path / "b"))
    json.dumps(to_json(res), default=str)
    assert isinstance(res["summary"]["data"]["problems"], list)


def test_fail_on_gates_through_the_detector(tmp_path, lab_bundle, capsys):
    det = pytest.importorskip("hintscope.analysis.detector")
    sim = pytest.importorskip("hintscope.sim.write")
    sim.write_bundle(sim.simulate("filter-after-sync", 3, mode="manual"), tmp_path / "bad")
    assert main(["analyze", str(tmp_path / "bad"), "--json", "--fail-on", "hazard"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"]["findings"]["verdict"] == "unsafe ordering found"
    assert sum(doc["summary"]["findings"]["by_kind"].values()) > 0
    # The no-probe lab run cannot decide (no uprobes): the gate says so instead of passing.
    rc = main(["analyze", str(lab_bundle), "--json", "--fail-on", "lost-write"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"]["findings"]["verdict"].startswith("inconclusive")
    assert rc == 3


def test_killed_capture_is_reported_incomplete(tmp_path, probed):
    """A producer that never closed (killed) leaves status running: analysis still runs and says so."""
    w = BundleWriter(tmp_path / "b", producer="test killed")
    for name in ("ioctls", "bitmap_words", "memslots", "qemu_events"):
        w.append(name, probed.table(name))
    w.flush()  # no close(): as if SIGKILLed after the first flush
    res = analyze(read_bundle(tmp_path / "b"))
    d = res["summary"]["data"]
    assert d["complete"] is False and d["status"] == "running"
    assert any("did not finish" in p for p in d["problems"])
    assert len(res["syncs"]) == 3  # everything flushed is still analysed
    assert res["summary"]["findings"]["verdict"] != "no unsafe ordering found"


def test_a_failing_check_makes_the_verdict_inconclusive(tmp_path, monkeypatch, capsys):
    from hintscope.analysis import checks
    from hintscope.sim import write as sim
    lab_bundle = sim.write_bundle(sim.simulate("qemu", 1, mode="get"), tmp_path / "b")
    assert analyze(read_bundle(lab_bundle))["findings"].verdict == "no unsafe ordering found"

    def boom(f, run):
        raise RuntimeError("synthetic check bug")

    monkeypatch.setattr(checks, "REGISTRY", [checks.Check(c.name, boom, c.requires, c.kinds, c.decides_ordering,
                                                          c.proves, c.needs_mode) if c.name == "apply-during-sync"
                                             else c for c in checks.REGISTRY])
    res = analyze(read_bundle(lab_bundle))
    v = res["findings"].verdict
    assert v.startswith("inconclusive") and "check apply-during-sync failed: RuntimeError: synthetic" in v
    assert [c.status for c in res["findings"].checks if c.name == "apply-during-sync"] == ["failed"]
    assert len(res["syncs"]) > 2
    # the gate cannot pass on it, and plain analyze says so in its status too
    assert main(["analyze", str(lab_bundle), "--json", "--fail-on", "any"]) == 3
    assert main(["analyze", str(lab_bundle)]) == 3
    capsys.readouterr()


def test_ram_map_translates_hvas_when_there_are_no_kvm_slots():
    # TCG runs have no KVM memslots; the lab's gpa2hva ranges stand in for them.
    from hintscope.analysis import memslots as ms
    base = 0x7F00_0000_0000
    rm = pd.DataFrame({"ts_ns": [5], "gpa": np.array([0], np.uint64), "size": np.array([1 << 30], np.uint64),
                       "hva": np.array([base], np.uint64)})
    ev, src = ms.slot_events(pd.DataFrame({"ret": pd.Series(dtype="int64")}), None, rm)
    assert src == "ram_map"
    gpa, slot = ms.hva_to_gpa(np.array([base + 0x5000, base + (1 << 30), base - 1]), np.array([1, 1, 1]),
                              ms.intervals(ev))
    assert list(gpa) == [0x5000, -1, -1] and list(slot) == [ms.RAM_MAP_SLOT, -1, -1]


def test_guest_ids_and_blocks_match_host_on_the_linux_sample():
    # Real run (samples/linux-hint-on): every block the guest hinted was applied by the host, and
    # the ids the guest read are the host's first epochs, in order.
    b = read_bundle(Path(__file__).resolve().parents[1] / "samples" / "linux-hint-on")
    mt = accounting(b)["matching"]
    assert mt["blocks_hinted"] == mt["blocks_applied"] == 150 and mt["blocks_not_applied"] == 0
    read = [int(x, 16) for x in mt["guest_ids_read"]]
    assert read == list(range(0x80000001, 0x80000001 + len(read))) and len(read) <= mt["host_ids"]
    assert mt["ids_not_issued"] == []
    assert [d["applied_blocks"] for d in mt["per_id"]] == [d["guest_blocks"] for d in mt["per_id"]]
