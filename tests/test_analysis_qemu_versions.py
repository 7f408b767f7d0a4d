"""QEMU-version-dependent numbers (migration states, precopy notifier list), verdicts on the committed
lab samples, and one sync numbering across the analysis, the detector and the report timeline."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hintscope.analysis import detector, epochs, qemu_states
from hintscope.analysis.context import Context
from hintscope.analysis.syncs import sync_table
from hintscope.bundle import read_bundle
from hintscope.probes import qemu_uprobes
from hintscope.sim.write import MemoryBundle, simulate

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
DATA = ROOT / "tests" / "data"
V72 = qemu_uprobes.MIGRATION_STATES_72
V10 = qemu_uprobes.migration_states("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)")
PRECOPY = 0x5555_0000_1000      # the precopy NotifierWithReturnList
OTHER = 0x5555_0000_2000        # QEMU >= 9: the migration-state notifier list


def _copy(b: MemoryBundle, meta: dict | None = None, qe: pd.DataFrame | None = None) -> MemoryBundle:
    t = dict(b._tables)
    if qe is not None:
        t["qemu_events"] = qe
    return MemoryBundle(json.loads(json.dumps(meta if meta is not None else b.meta, default=str)), t,
                        list(b.problems))


def _as_qemu10(b: MemoryBundle, with_table: bool = True) -> MemoryBundle:
    """The same run as a QEMU 10.0 capture: state numbers shifted by postcopy-recover-setup."""
    qe = b.table("qemu_events").copy()
    ms = qe["event"] == "migrate_state"
    for col in ("a1", "a2"):
        names = np.asarray(V72, dtype=object)[qe.loc[ms, col].to_numpy().astype(np.int64)]
        qe.loc[ms, col] = np.array([V10.index(n) for n in names], dtype=np.uint64)
    meta = json.loads(json.dumps(b.meta, default=str))
    if with_table:
        meta["sources"]["qemu_uprobes"]["migration_states"] = V10
    else:
        meta["vmm"] = {"version": "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"}
    return _copy(b, meta, qe)


@pytest.fixture(scope="module")
def sim():
    return simulate("filter-after-sync", 0, mode="manual")


# ------------------------------------------------------------------------------------- migration states
def test_state_names_basis_and_hostile_meta():
    assert qemu_states.state_names({}).names == tuple(V72)
    assert "assumed QEMU 7.2" in qemu_states.state_names({}).basis
    n = qemu_states.state_names({"sources": {"qemu_uprobes": {"migration_states": V10}}})
    assert n.names[9] == "completed" and "meta" in n.basis
    n = qemu_states.state_names({"vmm": {"version": "QEMU emulator version 10.0.2"}})
    assert n.names[9] == "completed" and "version" in n.basis
    bad = qemu_states.state_names({"sources": {"qemu_uprobes": {"migration_states": [1, {"x": 2}]}}})
    assert bad.names == tuple(V72) and bad.problems
    assert list(qemu_states.StateNames(("a", "b"), "t").name(np.array([1, 7, -1], np.int64))) == \
        ["b", "state 7", "state -1"]


@pytest.mark.parametrize("with_table", [True, False])
def test_qemu10_state_numbers_read_as_names_everywhere(sim, with_table):
    b10 = _as_qemu10(sim, with_table)
    c72, c10 = Context(sim), Context(b10)
    assert c10.states["state"].tolist() == c72.states["state"].tolist()
    assert c10.states["state"].iloc[-1] == "completed" and c10.outcome == "completed"
    # 9 is "failed" in the 7.2 table: reading 10.0 numbers with it would end the run as failed
    raw = b10.table("qemu_events")
    assert 9 in raw.loc[raw["event"] == "migrate_state", "a2"].tolist()
    # the detector's epochs (final sync, cmd ids), the analysis sync table and the timeline agree
    pd.testing.assert_frame_equal(epochs.sync_table(c10), epochs.sync_table(c72))
    pd.testing.assert_frame_equal(sync_table(c10), sync_table(c72))
    assert c10.states["state"].tolist() == c72.states["state"].tolist()
    r10, r72 = detector.run(b10), detector.run(sim)
    assert r10.frame["kind"].tolist() == r72.frame["kind"].tolist()
    assert r10.verdict == r72.verdict
    assert r10.coverage["state_names"] == c10.state_names.basis


def test_apply_after_failed_is_impossible_with_qemu10_numbers(sim):
    """d4 keys on state *names*: on 10.0 failed is 10, which the 7.2 table calls "colo"."""
    b10 = _as_qemu10(sim)
    qe = b10.table("qemu_events")
    c = Context(b10)
    s = epochs.sync_table(c)
    t_fail = int(s["after"].iloc[1]) + 1_000      # the migration fails in epoch 2, mid-run
    fail = qe[qe["event"] == "migrate_state"].iloc[[-1]].assign(ts_ns=t_fail, a1=V10.index("active"),
                                                                  a2=V10.index("failed"))
    apply = qe[qe["event"] == "hint_apply"].iloc[[0]].assign(ts_ns=t_fail + 1_000)
    bad = _copy(b10, qe=pd.concat([qe, fail, apply], ignore_index=True).sort_values("ts_ns", ignore_index=True))
    assert "apply-when-impossible" not in detector.detect(b10)["kind"].tolist()
    assert "apply-when-impossible" in detector.detect(bad)["kind"].tolist()
    assert Context(bad).states["state"].isin(["failed"]).any()
    # read with the 7.2 table (what the code assumed before), 10 is "colo" and the late apply is missed
    meta72 = json.loads(json.dumps(bad.meta))
    del meta72["sources"]["qemu_uprobes"]["migration_states"]
    assert "apply-when-impossible" not in detector.detect(_copy(bad, meta72))["kind"].tolist()


# ------------------------------------------------------------------------------------- precopy list
def _with_other_list(b: MemoryBundle, precopy_list: int | None) -> MemoryBundle:
    """Precopy rows on PRECOPY, plus QEMU-10-style migration-state notifications on OTHER (SETUP=0,
    DONE=1, FAILED=2 collide with precopy reasons) between the syncs."""
    qe = b.table("qemu_events").copy()
    pn = qe["event"] == "precopy_notify"
    qe.loc[pn, "a0"] = np.uint64(PRECOPY)
    fb = qe.loc[qe["event"] == "sync_fetch_begin", "ts_ns"].to_numpy(np.int64)
    extra = qe[pn].iloc[: 3].copy()
    extra["a0"] = np.uint64(OTHER)
    extra["a1"] = np.array([0, 1, 2], np.uint64)
    extra["ts_ns"] = fb[:3] - 1_500   # inside each sync, before its fetch: looks like a BEFORE
    meta = json.loads(json.dumps(b.meta, default=str))
    if precopy_list is not None:
        meta["sources"]["qemu_uprobes"]["precopy_list"] = precopy_list
    return _copy(b, meta, pd.concat([qe, extra], ignore_index=True))


def test_precopy_rows_of_other_lists_are_dropped(sim):
    ref = sync_table(Context(sim))
    kept = sync_table(Context(_with_other_list(sim, PRECOPY)))
    pd.testing.assert_frame_equal(kept, ref)
    # without the probe's precopy_list the collision is real: an extra BEFORE splits a sync (and it is noted)
    c = Context(_with_other_list(sim, None))
    assert len(sync_table(c)) != len(ref)
    assert any("2 notifier lists" in p for p in c.problems)
    b = _with_other_list(sim, PRECOPY)
    pd.testing.assert_frame_equal(sync_table(Context(b)), sync_table(Context(sim)))
    assert detector.detect(b)["kind"].tolist() == detector.detect(sim)["kind"].tolist()


def test_hostile_precopy_list_is_ignored_with_a_note(sim):
    b = _with_other_list(sim, None)
    b.meta["sources"]["qemu_uprobes"]["precopy_list"] = "0x1000"
    c = Context(b)
    assert len(c.qe) == len(b.table("qemu_events"))
    assert any("precopy_list" in p for p in c.problems)


@pytest.mark.parametrize("path", [SAMPLES / "lab-bitmap", SAMPLES / "lab-ring4096-lost", SAMPLES / "lab-ring65536",
                                  DATA / "bundle-lab-probed-7.2", DATA / "bundle-hintguest-probed-7.2"])
def test_real_72_bundles_same_syncs_with_precopy_list(path, tmp_path):
    """The real 7.2 captures predate precopy_list; naming their one list in meta changes nothing."""
    ref = read_bundle(path)
    qe = ref.table("qemu_events")
    lists = qe.loc[qe["event"] == "precopy_notify", "a0"].unique()
    assert len(lists) == 1          # QEMU 7.2: only the precopy list goes through the notifier function
    p = tmp_path / "b"
    shutil.copytree(path, p)
    meta = json.loads((p / "meta.json").read_text())
    meta["sources"]["qemu_uprobes"]["precopy_list"] = int(lists[0])
    (p / "meta.json").write_text(json.dumps(meta))
    b = read_bundle(p)
    cols = ["sync", "source", "before_ns", "after_ns", "fetch_start_ns", "fetch_end_ns", "epoch"]
    pd.testing.assert_frame_equal(sync_table(Context(b))[cols], sync_table(Context(ref))[cols])
    ca, cb = Context(ref), Context(b)
    pd.testing.assert_frame_equal(epochs.sync_table(cb), epochs.sync_table(ca))


# ------------------------------------------------------------------------------------- verdicts on samples
def _judge(path: Path):
    b = read_bundle(path)
    r = detector.run(b)
    return b, r, r.verdict


def test_lab_bitmap_no_hint_applied_is_no_unsafe_ordering():
    b, f, v = _judge(SAMPLES / "lab-bitmap")
    assert b.meta["sources"]["qemu_uprobes"]["symbols"]["qemu_guest_free_page_hint"] == "attached"
    assert v == "no unsafe ordering found" and f.frame.empty
    assert "no hint was applied" in f.basis and "qemu_guest_free_page_hint attached, 0 calls" in f.basis
    # the sends and guest events are still reported absent, they just cannot change this answer
    assert f.coverage["evidence"]["sends"].startswith("page sends")


def test_lab_ring4096_lost_pages_are_not_hint_findings():
    b, r, v = _judge(SAMPLES / "lab-ring4096-lost")
    f = r.frame
    lost = b.table("lost_pages")
    want = set(lost.loc[lost["classification"].astype(str) == "lost-write", "gfn"].astype(int))
    assert want, "the sample's memory check found lost pages"
    assert set(f["kind"]) == {"lost-write-not-hint"} and set(f["severity"]) == {"migration"}
    assert set(f["confidence"]) == {"confirmed"}
    assert {g for gs in f["gfns"] for g in gs} == want
    assert not f["kind"].isin(["lost-write", "rearm-wipe", "stale-epoch-apply"]).any()
    assert v == "no unsafe ordering found"       # a migration loss, not an unsafe hint ordering
    assert r.exit_code("lost-write") == 1


def test_lab_ring65536_is_clean():
    b, f, v = _judge(SAMPLES / "lab-ring65536")
    assert f.frame.empty
    # the hint-apply uprobe was attached for the whole migration and saw no call
    assert v == "no unsafe ordering found"
    assert "0 calls" in f.basis
    assert f.exit_code("hazard") == 0


@pytest.mark.parametrize("change", ["lost", "incomplete", "not-completed", "applied", "detached"])
def test_no_hint_applied_needs_every_condition(change, tmp_path):
    p = tmp_path / "b"
    shutil.copytree(SAMPLES / "lab-bitmap", p)
    meta = json.loads((p / "meta.json").read_text())
    b = read_bundle(p)
    qe = b.table("qemu_events")
    if change == "lost":
        meta["lost"] = {"qemu_uprobes": 3}
    elif change == "incomplete":
        meta["status"] = "running"
    elif change == "detached":
        meta["sources"]["qemu_uprobes"]["symbols"]["qemu_guest_free_page_hint"] = "missing"
    (p / "meta.json").write_text(json.dumps(meta))
    b = read_bundle(p)
    if change in ("not-completed", "applied"):
        if change == "not-completed":   # the probe stopped mid-migration: hints may come later
            qe = qe[~((qe["event"] == "migrate_state") & (qe["a2"] == V72.index("completed")))]
        else:
            row = qe[qe["event"] == "migrate_state"].iloc[[1]].assign(event="hint_apply", a0=0, a1=4096)
            qe = pd.concat([qe, row], ignore_index=True)
        b = MemoryBundle(b.meta, {t: b.table(t) for t in b.tables()} | {"qemu_events": qe}, list(b.problems))
    r = detector.run(b)
    assert r.verdict != "no unsafe ordering found", (change, r.verdict)
    assert r.coverage["no_hint_applied"] is None


def test_capture_stopped_before_the_migration_ended_is_inconclusive(tmp_path):
    # A probe stopped by a signal mid-migration closes its bundle cleanly ("complete"); the
    # verdict must still say the capture misses the end of the migration.
    b = read_bundle(SAMPLES / "lab-bitmap")
    qe = b.table("qemu_events")
    final = [V72.index(s) for s in ("completed", "failed", "cancelled")]
    qe = qe[~((qe["event"] == "migrate_state") & qe["a2"].isin(final))]
    b = MemoryBundle(b.meta, {t: b.table(t) for t in b.tables()} | {"qemu_events": qe}, list(b.problems))
    v = detector.run(b).verdict
    assert v.startswith("inconclusive") and "does not show the migration ending" in v


# ------------------------------------------------------------------------------------- sync numbering
@pytest.mark.parametrize("variant, mode, kind", [("filter-after-sync", "manual", "stale-epoch-apply"),
                                                 ("sync-in-io-handler", "get", "apply-during-sync")])
def test_detector_sync_numbers_are_the_analysis_sync_numbers(variant, mode, kind):
    b = simulate(variant, 0, mode=mode)
    f = detector.detect(b)
    s = sync_table(Context(b)).set_index("sync")
    steps = [e for ev in f.loc[f["kind"] == kind, "evidence"] for e in ev if re.match(r"sync \d+ ", e[2])]
    assert steps, f"{variant}: no {kind} evidence naming a sync"
    for t, _, text in steps:
        n = int(text.split()[1])
        col = "fetch_start_ns" if "fetch begins" in text else "fetch_end_ns" if "fetch ends" in text else "before_ns"
        assert s.loc[n, col] == t, (text, t, s.loc[n, col])
    assert (epochs.sync_table(Context(b))["sync"].to_numpy() == s.index.to_numpy()).all()


def test_verdict_basis_reaches_the_summary_and_report():
    from hintscope.analysis import summary
    from hintscope.report import model, sections

    b = read_bundle(SAMPLES / "lab-bitmap")
    s = summary.summarize(b)["findings"]
    assert s["verdict"] == "no unsafe ordering found" and "no hint was applied" in s["basis"]
    t = sections.summary_table(model.load(b))
    assert any("no hint was applied" in str(v) for v in t.to_numpy().ravel())
