"""The detector against simulator ground truth, its verdicts when evidence is missing, and exit codes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from hintscope.analysis import detector
from hintscope.sim import confusion
from hintscope.sim.model import MODES
from hintscope.sim.write import MemoryBundle, simulate


@pytest.fixture(scope="module")
def matrix():
    return confusion.run_matrix(seeds=range(2))


def test_reduced_matrix_properties(matrix):
    s = confusion.summarise(matrix)
    assert confusion.check(s) == []
    # the matrix exercises both kinds of loss, so recall 1.0 is not vacuous
    assert s["gt_lost_hint"].sum() > 100 and s["gt_lost_not_hint"].sum() > 5


EXPECTED_KINDS = {
    "filter-after-sync": {"stale-epoch-apply", "lost-write"},
    "sync-in-io-handler": {"apply-during-sync"},
    "blocking-bulk": {"bulk-stall"},
    "no-cmd-id": {"bad-id-sequence"},
    "shrinker-reuse": {"reuse-before-apply"},
    "clear-on-apply": {"reuse-before-apply"},
    "resend-bug": {"lost-write-not-hint"},
}


def test_each_variant_draws_its_kinds(matrix):
    for v, kinds in EXPECTED_KINDS.items():
        seen = set(",".join(matrix.loc[matrix["variant"] == v, "kinds"]).split(","))
        assert kinds <= seen, (v, seen)
    cm = matrix[(matrix["variant"] == "clear-on-apply") & (matrix["mode"] == "manual")]
    assert cm["kinds"].str.contains("rearm-wipe").all()


def test_safe_variants_are_clean(matrix):
    safe = matrix[matrix["variant"].isin(["qemu", "flush-before-sync", "blocking-bulk"])]
    # every variant keeps QEMU's hint-path CLEAR: under manual protect that is the latent c' hazard
    assert (safe.loc[safe["mode"] != "manual", "verdict"] == "no unsafe ordering found").all()
    man = safe[safe["mode"] == "manual"]
    assert (man["verdict"] == "unsafe ordering found").all() and (man["c_prime"] == 1).all()
    assert (man["kinds"].str.replace("bulk-stall", "").str.strip(",") == "rearm-in-apply").all()
    assert (matrix.loc[matrix["variant"] == "filter-after-sync", "verdict"] == "unsafe ordering found").all()


def _drop_events(b: MemoryBundle, *events: str) -> MemoryBundle:
    t = dict(b._tables)
    qe = t["qemu_events"]
    t["qemu_events"] = qe[~qe["event"].isin(events)].reset_index(drop=True)
    return MemoryBundle(dict(b.meta), t, list(b.problems))


def test_never_safe_without_evidence():
    b = simulate("qemu", 0, "get", dest_compare=False)
    assert detector.run(b).verdict == "no unsafe ordering found"
    no_guest = b.without("guest_events", "guest_hints", "guest_returns", "guest_reuse")
    must = {
        # the ordering checks need when each hint was made available and under which id: host pops or guest hints
        "when each applied hint was made available": _drop_events(no_guest, "vq_pop_hint", "vq_pop_cmd"),
        "sync boundaries": _drop_events(b, "precopy_notify", "sync_fetch_begin", "sync_fetch_end"),
        "memslots": b.without("memslots"),
    }
    for what, bb in must.items():
        v = detector.run(bb).verdict
        assert v.startswith("inconclusive") and what in v, (what, v)
    # evidence the ordering question does not need: host pops stand in for the guest probe
    for bb in (no_guest, _drop_events(b, "page_send"), b.without("bitmap_words")):
        assert detector.run(bb).verdict == "no unsafe ordering found"
    lost = MemoryBundle(dict(b.meta, lost={"host_ioctl": 12}), b._tables)
    assert "lost events" in detector.run(lost).verdict
    running = MemoryBundle(dict(b.meta, status="running"), b._tables)
    assert "did not finish" in detector.run(running).verdict


def test_unsafe_even_with_missing_guest():
    # (b)/(c) need the guest, but apply-during-sync is host-only
    b = simulate("sync-in-io-handler", 0, "get", dest_compare=False)
    bb = b.without("guest_events", "guest_hints", "guest_returns", "guest_reuse")
    r = detector.run(bb)
    assert "apply-during-sync" in set(r.frame["kind"])
    assert r.verdict == "unsafe ordering found"


def test_memcheck_pages_classified():
    b = simulate("resend-bug", 1, "manual", dest_compare=True)
    gt = b.table("ground_truth")
    f = detector.detect(b)
    nh = f[f["kind"] == "lost-write-not-hint"]
    assert set(gt.loc[gt["lost"], "gfn"].astype(int)) <= set(int(g) for gl in nh["gfns"] for g in gl)
    # pages skipped because the guest still held them are stale on the destination but expected
    q = simulate("qemu", 1, "manual", dest_compare=True)
    assert len(q.table("lost_pages")) > 100
    fq = detector.detect(q)
    assert not fq["kind"].isin(detector.LOST_KINDS).any()


def test_lost_write_evidence_on_one_clock():
    b = simulate("clear-on-apply", 0, "manual", dest_compare=False)
    f = detector.detect(b)
    rw = f[(f["kind"] == "rearm-wipe") & (f["confidence"] == "confirmed")]
    assert len(rw)
    ev = rw.iloc[0]["evidence"]
    ts = [t for t, _, _ in ev if t]
    assert ts == sorted(ts) and all(abs(t - ts[0]) < 10**10 for t in ts)
    assert {"guest", "kvm", "qemu"} <= {s for _, s, _ in ev}
    assert "KVM_CLEAR_DIRTY_LOG" in rw.iloc[0]["sentence"]


def test_exit_codes():
    empty = pd.DataFrame(columns=detector.FINDING_COLUMNS)
    assert detector.exit_code(empty, "no unsafe ordering found", None) == 0
    assert detector.exit_code(empty, "no unsafe ordering found", "hazard") == 0
    assert detector.exit_code(empty, "inconclusive: missing x", "hazard") == 3
    assert detector.exit_code(empty, "inconclusive: missing x", None) == 0
    haz = pd.DataFrame([detector._finding("reuse-before-apply", "hazard", [1], [], "s")])
    assert detector.exit_code(haz, "unsafe ordering found", "hazard") == 1
    assert detector.exit_code(haz, "unsafe ordering found", "lost-write") == 0
    assert detector.exit_code(haz, "unsafe ordering found", "any") == 1
    lw = pd.DataFrame([detector._finding("lost-write", "confirmed", [1], [], "s")])
    assert detector.exit_code(lw, "unsafe ordering found", "lost-write") == 1
    amb = pd.DataFrame([detector._finding("lost-write", "ambiguous", [1], [], "s")])
    assert detector.exit_code(amb, "inconclusive: 1 ordering", "lost-write") == 3
    perf = pd.DataFrame([detector._finding("bulk-stall", "confirmed", [], [], "s")])
    assert detector.exit_code(perf, "no unsafe ordering found", "hazard") == 0
    assert detector.exit_code(perf, "no unsafe ordering found", "any") == 1
    from hintscope.errors import HintscopeError
    with pytest.raises(HintscopeError):
        detector.exit_code(empty, "x", "everything")


def test_findings_json_round_trip():
    b = simulate("filter-after-sync", 0, "ring", dest_compare=False)
    d = detector.run(b).to_json()
    assert d["verdict"] == "unsafe ordering found"
    assert d["coverage"]["mode"] == "ring"
    assert all({"ts_ns", "source", "event"} == set(e) for x in d["findings"] for e in x["evidence"])


def test_clock_band_contains_true_offset():
    for mode in MODES:
        b = simulate("shrinker-reuse", 4, mode, dest_compare=False)
        clk = detector.run(b).coverage["clock"]
        true = b.meta["sim"]["delta_ns"]
        # drift of at most 30 ppm over the run moves delta by a few us
        assert clk["delta_lo_ns"] - 20_000 <= true <= clk["delta_hi_ns"] + 20_000
        assert clk["width_ns"] < detector.CLOCK_MAX_NS


def test_hostile_apply_lengths_do_not_explode():
    b = simulate("qemu", 0, "get", dest_compare=False)
    t = dict(b._tables)
    qe = t["qemu_events"].copy()
    i = qe.index[qe["event"] == "hint_apply"][0]
    qe.loc[i, "a1"] = np.uint64(1 << 62)
    t["qemu_events"] = qe
    bb = MemoryBundle(dict(b.meta), t)
    assert any("impossible lengths" in p for p in detector.run(bb).coverage["problems"])


def test_bench_quick_smoke(tmp_path):
    import importlib.util
    from pathlib import Path
    p = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_detector.py"
    spec = importlib.util.spec_from_file_location("bench_detector", p)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "b.json"
    assert mod.main(["--pushes", "20000", "--hint-pages", "2000", "-o", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["pushes"] == 20000 and res["detect_s"] > 0 and set(res["polars_join_asof_s"]) == {"plain", "by_gfn"}


def test_hostile_guest_blocks_are_dropped():
    b = simulate("shrinker-reuse", 0, "manual", dest_compare=False)
    t = dict(b._tables)
    h = t["guest_hints"].copy()
    h.loc[0, "order"] = 60
    h.loc[1, "pfn"] = np.uint64(2**63)
    t["guest_hints"] = h
    r = detector.run(MemoryBundle(dict(b.meta), t))
    assert any("guest_hints: 2 rows" in p for p in r.coverage["problems"])


def test_bad_id_sequence_from_guest_reads():
    b = simulate("qemu", 0, "get", dest_compare=False)
    assert "bad-id-sequence" not in set(detector.detect(b)["kind"])
    t = dict(b._tables)
    ge = t["guest_events"].copy()
    reads = ge.index[(ge["event"] == "cmd_id") & (ge["a0"] >= 0x80000002)]
    # the guest claims to have read id N+2 where N+1 was published: a skipped id
    ge.loc[reads, "a0"] = ge.loc[reads, "a0"] + np.uint64(1)
    t["guest_events"] = ge
    f = detector.detect(MemoryBundle(dict(b.meta), t))
    d5 = f[f["kind"] == "bad-id-sequence"]
    assert len(d5) == 1 and d5.iloc[0]["confidence"] == "hazard"
    assert any("start message" in e for _, _, e in d5.iloc[0]["evidence"])


def test_destination_reuse_after_done_is_not_a_loss():
    # after DONE the guest takes every block back and reuses it on the destination: those writes
    # were never the source's to send
    b = simulate("qemu", 3, "get", dest_compare=False)
    t = dict(b._tables)
    h = t["guest_hints"]
    late = int(t["guest_events"]["guest_ns"].max()) + 5_000_000
    n = len(h)
    t["guest_returns"] = pd.concat([t["guest_returns"], pd.DataFrame({
        "guest_ns": late + np.arange(n), "side": "dst", "tid": np.int32(300), "pfn": h["pfn"].to_numpy(),
        "order": h["order"].to_numpy(), "reason": "done"})], ignore_index=True)
    t["guest_reuse"] = pd.concat([t["guest_reuse"], pd.DataFrame({
        "guest_ns": late + 1000 + np.arange(n), "side": "dst", "tid": np.int32(300), "pfn": h["pfn"].to_numpy(),
        "order": h["order"].to_numpy(), "gfp": np.uint64(0xCC0), "block_pfn": h["pfn"].to_numpy(),
        "returned_ns": late + np.arange(n)})], ignore_index=True)
    bb = MemoryBundle(dict(b.meta), t)
    r = detector.run(bb)
    assert not r.frame["kind"].isin(detector.LOST_KINDS).any()
    assert r.verdict == "no unsafe ordering found"


def test_real_lab_bundle_kvmclock_page_is_not_a_loss():
    from pathlib import Path
    from hintscope.bundle import read_bundle
    p = Path(__file__).resolve().parent / "data" / "bundle-lab-probed-7.2"
    b = read_bundle(p)
    assert set(b.table("lost_pages")["classification"]) == {"kvmclock"}
    r = detector.run(b)
    assert not r.frame["kind"].isin(detector.LOST_KINDS).any()
    # no page-send uprobe and no guest probe, but the apply uprobe was attached for the whole
    # migration and QEMU applied no hint (bare-metal guest, no balloon driver): nothing was filtered
    assert r.verdict == "no unsafe ordering found"
    assert "no hint was applied" in r.basis
    ev = r.coverage["evidence"]
    assert ev["sends"].startswith("page sends") and ev["guest"].startswith("guest balloon")


def test_every_registered_check_is_documented():
    from pathlib import Path
    from hintscope.analysis import checks, facts
    from hintscope.analysis.findings import SEVERITY
    doc = (Path(__file__).resolve().parents[1] / "docs" / "detector.md").read_text()
    for c in checks.REGISTRY:
        assert f"| `{c.name}` |" in doc, c.name
        assert set(c.requires) <= set(facts.EVIDENCE), c.name
        assert set(c.kinds) <= set(SEVERITY), c.name
    for k in facts.EVIDENCE:
        assert f"| `{k}` |" in doc, k
    for k in SEVERITY:
        assert f"| `{k}` |" in doc, k
