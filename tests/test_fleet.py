"""Fleet index: 20 simulated runs through a real Dask LocalCluster and the embedded engine, the
incremental skip, error rows, the query against the simulator's ground truth, labels on the samples."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from hintscope.bundle import read_bundle
from hintscope.cli import main
from hintscope.fleet import simfleet
from hintscope.fleet.engines import Engine
from hintscope.fleet.index import build
from hintscope.fleet.labels import run_labels
from hintscope.fleet.query import query, runs
from hintscope.report import compare

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
KEY_COLS = ["bundle", "hash", "status", "qemu", "dirty_mode", "hint", "variant", "guest_mb", "vcpus", "verdict",
            "hazards", "lost_write_findings", "lost_pages_found", "bytes_saved_upper_bound", "syncs", "date"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    recs = simfleet.generate(20, root / "bundles", jobs=2, seed=3)
    return root, recs


@pytest.fixture(scope="module")
def dask_index(fleet):
    pytest.importorskip("dask.distributed")
    root, recs = fleet
    st = build([str(root / "bundles")], root / "idx-dask", Engine("dask", jobs=2), progress=False)
    return root / "idx-dask", st


def _rows(idx: Path) -> list[dict]:
    df = runs(idx).sort("bundle")
    return [{k: r[k] for k in KEY_COLS} for r in df.to_dicts()]


def test_dask_local_cluster_and_embedded_agree(fleet, dask_index):
    root, recs = fleet
    idx, st = dask_index
    assert (st.given, st.indexed, st.errors, st.skipped) == (20, 20, 0, 0)
    assert "LocalCluster, 2 worker processes" in st.engine
    st2 = build([str(root / "bundles")], root / "idx-emb", Engine("processes", jobs=2), progress=False)
    assert (st2.indexed, st2.errors) == (20, 0)
    a, b = _rows(idx), _rows(root / "idx-emb")
    assert a == b
    assert sorted(r["bundle"] for r in a) == sorted(r["bundle"] for r in recs)
    # partitioned by the run's date (meta created_realtime_ns), hive style
    dates = {p.name for p in idx.iterdir()}
    assert dates == {f"date={r['date']}" for r in a} and all(d.startswith("date=2026-12-") for d in dates)
    # labels and truth straight from meta
    byb = {r["bundle"]: r for r in recs}
    for r in runs(idx).to_dicts():
        g = byb[r["bundle"]]
        assert (r["qemu"], r["variant"], r["dirty_mode"], r["hint"]) == (g["qemu"], g["variant"], g["mode"], "on")
        assert (r["guest_mb"], r["vcpus"]) == (str(g["pages"] * 4096 >> 20), str(g["vcpus"]))
        assert r["sim_truth_lost"] == g["truth"]["lost"]


def test_query_matches_ground_truth(fleet, dask_index):
    root, recs = fleet
    idx, _ = dask_index
    q = query(idx, ["qemu", "dirty_mode", "hint"], ["lost_write_findings", "hazards", "bytes_saved_upper_bound"])
    truth = simfleet.truth_rates(recs, ("qemu", "mode"))
    assert sum(r["runs"] for r in q.to_dicts()) == 20
    assert {(r["qemu"], r["dirty_mode"]) for r in q.to_dicts()} == set(truth)
    for r in q.to_dicts():
        t = truth[(r["qemu"], r["dirty_mode"])]
        assert r["runs"] == t["runs"]
        assert r["lost_write_findings.rate"] == pytest.approx(t["lost_runs"] / t["runs"])
    # the fixture's seed gives at least one group with lost writes, so the check is not all zeros
    assert any(t["lost_runs"] for t in truth.values())


def test_incremental_skip_and_changed_bundle(fleet, tmp_path):
    root, recs = fleet
    bundles = tmp_path / "b"
    shutil.copytree(root / "bundles", bundles, symlinks=True)
    idx = tmp_path / "idx"
    st = build([str(bundles)], idx, Engine("serial"), progress=False)
    assert (st.indexed, st.skipped) == (20, 0)
    st = build([str(bundles)], idx, Engine("processes", jobs=2), progress=False)
    assert (st.indexed, st.skipped) == (0, 20)
    # one bundle changes (relabelled), one is new: only those two are analysed
    first = sorted(bundles.iterdir())[0]
    m = json.loads((first / "meta.json").read_text())
    m["labels"]["qemu"] = "11.0.0"
    (first / "meta.json").write_text(json.dumps(m))
    new = simfleet.write_run({**simfleet.plan(21, seed=3)[20]}, bundles)
    st = build([str(bundles)], idx, Engine("serial"), progress=False)
    assert (st.given, st.indexed, st.skipped) == (21, 2, 19)
    df = runs(idx)
    assert len(df) == 21                                   # the latest row per bundle
    assert df.filter(df["bundle"] == str(first.resolve()))["qemu"].to_list() == ["11.0.0"]
    assert new["bundle"] in df["bundle"].to_list()
    assert ds.dataset(idx, format="parquet", partitioning="hive").count_rows() == 22   # old row kept, superseded


def test_damaged_bundle_is_an_error_row(fleet, tmp_path, capsys):
    root, recs = fleet
    good = Path(recs[0]["bundle"])
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    (bad / "meta.json").write_text("{not json")
    notdir = tmp_path / "file"
    notdir.write_text("x")
    idx = tmp_path / "idx"
    rc = main(["fleet", "index", str(good), str(bad), str(notdir), str(tmp_path / "missing"), "-o", str(idx),
               "-j", "2", "-q"])
    out = capsys.readouterr().out
    assert rc == 0 and "4 bundles: 4 indexed (3 errors)" in out
    df = runs(idx)
    err = {r["bundle"]: r["error"] for r in df.to_dicts() if r["status"] == "error"}
    assert set(err) == {str(bad), str(notdir), str(tmp_path / "missing")}
    assert str(bad / "meta.json") in err[str(bad)] and "\n" not in err[str(bad)]
    assert "not a bundle directory" in err[str(notdir)]
    assert df.filter(df["status"] == "ok")["bundle"].to_list() == [str(good)]
    # a damaged bundle with an unchanged hash is not retried; an unreadable path is
    st = build([str(bad), str(tmp_path / "missing")], idx, Engine("serial"), progress=False)
    assert (st.skipped, st.indexed) == (1, 1)
    q = query(idx, [], ["hazards"])
    assert q.to_dicts()[0]["errors"] == 3 and q.to_dicts()[0]["runs"] == 1


def test_cli_query_and_plot(fleet, dask_index, tmp_path, capsys):
    idx, _ = dask_index
    assert main(["fleet", "query", str(idx), "--group", "qemu,dirty_mode,hint",
                 "--metric", "lost_writes,bytes_saved_upper_bound,hazards", "--csv", str(tmp_path / "q.csv")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:5] == ["qemu", "dirty_mode", "hint", "runs", "errors"]
    assert len(out) - 1 == len((tmp_path / "q.csv").read_text().splitlines()) - 1
    assert main(["fleet", "query", str(idx), "--group", "nope"]) == 2
    assert "not an index column" in capsys.readouterr().err
    assert main(["fleet", "plot", str(idx), "--metric", "bytes_saved_upper_bound", "--x", "qemu", "--group",
                 "dirty_mode", "-o", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 5000
    assert main(["fleet", "plot", str(idx), "--metric", "hazards", "--x", "date", "-o", str(tmp_path / "d.svg")]) == 0
    assert (tmp_path / "d.svg").stat().st_size > 5000


def test_sample_labels():
    labels = {p.name: compare.meta_labels(read_bundle(p).meta) for p in sorted(SAMPLES.iterdir()) if p.is_dir()}
    for name, lab in labels.items():
        assert "?" not in lab.values(), name
        for k in ("qemu", "guest", "guest_kernel", "vcpus", "accel", "hint", "host_kernel", "guest_mb"):
            assert k in lab, (name, k)
    # the dirtier has no balloon driver: a free-page-hint device alone is no hinting
    for name in ("lab-bitmap", "lab-ring4096-lost", "lab-ring65536"):
        assert (labels[name]["hint"], labels[name]["balloon"], labels[name]["guest"]) == \
            ("off", "free-page-hint=on", "dirtier")
    assert labels["lab-ring4096-lost"]["dirty_ring"] == "4096" and labels["lab-bitmap"]["dirty_ring"] == "off"
    assert labels["linux-hint-off"]["hint"] == "off" and labels["linux-hint-on"]["hint"] == "on"
    assert labels["linux-hint-on"]["guest_kernel"].startswith("6.1.")
    assert (labels["hintguest-polite"]["hint"], labels["hintguest-polite"]["vcpus"],
            labels["hintguest-polite"]["accel"]) == ("on", "1", "kvm")


def test_labels_new_guest_meta_and_hostile_values():
    meta = {"guest": {"kind": "linux", "kernel": {"release": "6.12.57+deb12-amd64", "series": "6.12"}},
            "lab": {"hint": True, "accel": "tcg", "src_argv": ["qemu", "-m", "2G", "-smp", "2,sockets=1",
                                                               "-device", "virtio-balloon-pci,free-page-hint=on"]}}
    lab = run_labels(meta)
    assert (lab["guest_kernel"], lab["guest_mb"], lab["vcpus"], lab["hint"]) == ("6.12.57+deb12-amd64", "2048", "2", "on")
    # lab says hint on, but the command line has no balloon device: no hint=on
    meta["lab"]["src_argv"] = ["qemu", "-m", "512"]
    assert (run_labels(meta)["hint"], run_labels(meta)["balloon"]) == ("off", "none")
    # a probe attached by pid: only the command line
    pid = run_labels({"vmm": {"cmdline": "qemu -accel tcg -m 1024 -kernel /boot/vmlinuz-6.12.57+deb12-amd64 "
                                         "-device virtio-balloon-pci,free-page-hint=on"}})
    assert (pid["guest"], pid["guest_kernel"], pid["hint"], pid["dirty_ring"]) == \
        ("linux", "6.12.57+deb12-amd64", "on", "none")
    for junk in ({"lab": []}, {"lab": {"smp": "x" * 10_000, "src_argv": [1, None]}, "guest": {"kernel": 5}},
                 {"vmm": {"cmdline": "qemu -smp 'unterminated"}, "labels": {"a": {"b": 1}}}, {"sim": {"config": 7}}):
        assert isinstance(run_labels(junk), dict)


def test_scheduler_address_mode(fleet, tmp_path, capsys):
    """--scheduler tcp://HOST:PORT: the client path for a remote cluster, here against a LocalCluster's scheduler."""
    distributed = pytest.importorskip("dask.distributed")
    root, recs = fleet
    picks = [r["bundle"] for r in recs[:4]]
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as cluster:
        addr = cluster.scheduler_address
        assert addr.startswith("tcp://")
        assert main(["fleet", "index", *picks, "-o", str(tmp_path / "idx"), "--scheduler", addr, "-q"]) == 0
    assert "4 indexed (0 errors)" in capsys.readouterr().out
    assert sorted(runs(tmp_path / "idx")["bundle"].to_list()) == sorted(picks)
    from hintscope.errors import HintscopeError
    with pytest.raises(HintscopeError, match="cannot reach the scheduler tcp://127.0.0.1:9"):
        build([picks[0]], tmp_path / "i2", Engine("dask", scheduler="tcp://127.0.0.1:9", connect_timeout_s=2),
              progress=False)
