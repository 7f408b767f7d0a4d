"""Host probe under overload: lost events are counted per interval, warned about live, and add up.

The source is benchmarks/src/ioctl_loop.c (a /dev/kvm user issuing KVM_RESET_DIRTY_RINGS flat
out, as bench_capture.py drives it); with a 1 MB ring the probe cannot keep up on this machine,
so the kernel side drops records and counts them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from hintscope.bundle import read_bundle
from tests.test_probe_host import ENV, PY, ROOT, run_probe


def build_loop(tmp: Path) -> Path:
    if not shutil.which("gcc"):
        pytest.skip("needs gcc to build benchmarks/src/ioctl_loop.c")
    exe = tmp / "ioctl_loop"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(ROOT / "benchmarks" / "src" / "ioctl_loop.c")], check=True)
    return exe


@pytest.mark.needs_bpf
@pytest.mark.needs_kvm
def test_tiny_ring_loss_series_adds_up_and_is_warned_live(tmp_path):
    exe = build_loop(tmp_path)
    go = tmp_path / "go"
    src = subprocess.Popen([str(exe), "2", "0", str(go)], stdout=subprocess.PIPE, text=True)
    probe = None
    try:
        assert src.stdout.readline().startswith("READY")
        probe = subprocess.Popen([PY, "-m", "hintscope", "probe", "host", "--pid", str(src.pid), "-o",
                                  str(tmp_path / "b"), "--ring-mb", "1", "--qemu", "off"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        assert probe.stdout.readline().strip() == "ATTACHED"
        t0 = time.monotonic_ns()
        go.touch()
        out, _ = src.communicate(timeout=120)
        assert "DONE" in out
        _, err = probe.communicate(timeout=120)     # ends by itself: target-exit
        t1 = time.monotonic_ns()
    finally:
        for p in (probe, src):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate(timeout=30)
    assert probe.returncode == 0, err
    b = read_bundle(tmp_path / "b")
    assert b.meta["end_reason"] == "target-exit"
    lost = b.meta["lost"]
    if not lost.get("host_ioctl"):
        pytest.skip(f"the consumer kept up with a 1 MB ring this time (lost {lost}): nothing to check")
    series = b.meta["lost_series"]
    assert set(series) == set(lost)
    for source, entries in series.items():
        assert sum(n for _, n, _ in entries) == lost[source]
        assert all(n > 0 and t0 - 10**9 < since < ts <= t1 for ts, n, since in entries)
        # contiguous lossy polls merge into intervals of ~1 s: far fewer entries than 50 ms polls
        assert len(entries) <= 3 * ((t1 - t0) // 10**9 + 1)
        ts = [e[0] for e in entries]
        assert ts == sorted(ts)
    warnings = [l for l in err.splitlines() if "WARNING: lost" in l and "host_ioctl" in l]
    assert warnings, err
    # the warnings were live (one per second at most), and together they account for every loss
    assert sum(int(l.split("lost ")[1].split()[0]) for l in warnings) == lost["host_ioctl"]
    # records seen + lost = calls made (the loop's one KVM_CREATE_VM is not a traced command)
    calls = int(out.split("calls=")[1].split()[0])
    io = b.table("ioctls")
    assert int((io["name"] == "RESET_DIRTY_RINGS").sum()) + lost["host_ioctl"] == calls


@pytest.mark.parametrize("mb", ["65536", "2048", "3", "0", "-4"])
def test_ring_mb_out_of_range_is_a_one_line_error(tmp_path, mb):
    r = run_probe("--pid", "1", "--ring-mb", mb, "-o", str(tmp_path / "b"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hintscope: error: --ring-mb {mb}: must be a power of two")
    assert not (tmp_path / "b").exists()


def lossy_bundle(path: Path, series) -> Path:
    from hintscope.bundle import BundleWriter

    w = BundleWriter(path, producer="probe host")
    # four syncs: fetch windows [10, 12], [20, 22], [30, 32], [40, 42] ms
    begin = np.array([10, 20, 30, 40], dtype=np.int64) * 10**6
    ts = np.sort(np.r_[begin, begin + 2 * 10**6])
    ev = np.tile(["sync_fetch_begin", "sync_fetch_end"], 4)
    z = np.zeros(8, dtype=np.uint64)
    w.append("qemu_events", {"ts_ns": ts, "tid": np.full(8, 7, np.int32), "event": ev, "a0": z, "a1": z, "a2": z,
                             "ret": np.zeros(8, np.int64)})
    w.set_source("qemu_uprobes", "captured")
    w.meta["lost_series"] = series
    for source, entries in series.items():
        if isinstance(entries, list):
            w.add_lost(source, sum(e[1] for e in entries if isinstance(e, list) and isinstance(e[1], int)))
    w.close(end_reason="duration")
    return path


def test_sync_incomplete_marks_windows_that_meet_a_loss_interval(tmp_path, capsys):
    from hintscope.analysis.syncs import sync_table
    from hintscope.cli import main

    ms = 10**6
    series = {
        # (23, 25] ms: after sync 1 ended, before sync 2 ended -> sync 2 only
        "host_ioctl": [[25 * ms, 5, 23 * ms]],
        # (41.9, 50] ms: meets sync 3's window end (42 ms); nothing after the last sync is attributed
        "qemu_uprobes": [[50 * ms, 2, 41_900_000],
                         "junk", [True, 1, 0], [2**70, 1, 2**70], [60 * ms, 0, 0]],   # hostile / zero: ignored
    }
    b = read_bundle(lossy_bundle(tmp_path / "b", series))
    s = sync_table(b)
    assert s["incomplete"].tolist() == [False, False, True, True]
    assert s["incomplete"].dtype == bool

    # the window starts at the previous sync's end, inclusive: a loss interval ending exactly there counts
    b2 = read_bundle(lossy_bundle(tmp_path / "b2", {"host_ioctl": [[12 * ms, 1, 11 * ms]]}))
    assert sync_table(b2)["incomplete"].tolist() == [True, True, False, False]
    # no series (older bundles): nothing marked
    b3 = read_bundle(lossy_bundle(tmp_path / "b3", {}))
    assert not sync_table(b3)["incomplete"].any()

    assert main(["analyze", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "lost" in out and "2 of 4 syncs overlap probe intervals with lost events" in " ".join(out.split())
    assert main(["analyze", str(tmp_path / "b"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["incomplete"] for r in doc["syncs"]] == [False, False, True, True]
    assert doc["summary"]["findings"]["verdict"] != "pass"
