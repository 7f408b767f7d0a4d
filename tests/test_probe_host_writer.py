"""The host probe's writer thread: a slow or full disk never stalls the ring polling.

The source is benchmarks/src/ioctl_loop.c (one KVM_RESET_DIRTY_RINGS record per call, the loop's
call count is the ground truth).  ``HINTSCOPE_TEST_SLOW_FLUSH_S`` makes every BundleWriter flush
with rows sleep first (hintscope/bundle.py), wherever that flush runs: on the polling thread a
2 s sleep would let a 2 MiB ring (21,845 records) overflow at 20k events/s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from hintscope.bundle import SLOW_FLUSH_ENV, BundleWriter, read_bundle
from hintscope.errors import BundleError
from hintscope.probes import decode as D
from hintscope.probes.capture_writer import CaptureWriter
from tests.test_probe_host import ENV, PY
from tests.test_probe_host_lost import build_loop


def capture(tmp: Path, out: Path, rate: int, secs: float, probe_args: list[str], env: dict) -> tuple[int, str, int]:
    """Run ioctl_loop under the probe; returns (calls made, probe stderr, probe exit code)."""
    exe = build_loop(tmp)
    go = tmp / "go"
    src = subprocess.Popen([str(exe), str(secs), str(rate), str(go)], stdout=subprocess.PIPE, text=True)
    probe = None
    try:
        assert src.stdout.readline().startswith("READY")
        probe = subprocess.Popen([PY, "-m", "hintscope", "probe", "host", "--pid", str(src.pid), "-o", str(out),
                                  "--qemu", "off", *probe_args],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert probe.stdout.readline().strip() == "ATTACHED", probe.stderr.read()
        go.touch()
        o, _ = src.communicate(timeout=120)
        _, err = probe.communicate(timeout=180)     # ends by itself: target-exit (or an error)
    finally:
        for p in (probe, src):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate(timeout=30)
    calls = int(o.split("calls=")[1].split()[0]) if "calls=" in o else -1
    return calls, err, probe.returncode


@pytest.mark.needs_bpf
@pytest.mark.needs_kvm
def test_slow_flush_does_not_stall_polling(tmp_path):
    ring_mb, rate, secs, delay = 2, 20_000, 3.0, 2.0
    env = dict(ENV, **{SLOW_FLUSH_ENV: str(delay)})
    calls, err, rc = capture(tmp_path, tmp_path / "b", rate, secs, ["--ring-mb", str(ring_mb)], env)
    assert rc == 0, err
    b = read_bundle(tmp_path / "b")
    hp = b.meta["host_probe"]
    assert b.meta["end_reason"] == "target-exit" and b.complete
    io = b.table("ioctls")
    seen = int((io["name"] == "RESET_DIRTY_RINGS").sum())
    # Every flush slept 2 s while the ring holds ~1.1 s of events: had the poller waited for any of
    # them, the kernel would have dropped (and counted) records.
    assert b.meta["lost"] == {} and seen == calls == hp["records"], (b.meta["lost"], seen, calls)
    # ... and the records the ring could not have held waited in the writer's queue instead
    assert hp["writer"]["max_backlog_bytes"] > ring_mb << 20, hp["writer"]
    assert hp["writer"]["ring_held_s"] == 0


@pytest.mark.needs_bpf
@pytest.mark.needs_kvm
@pytest.mark.needs_root
def test_full_disk_is_one_line_error_and_every_record_accounted(tmp_path):
    small = Path(tempfile.mkdtemp(prefix="hs-writer-full-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        filler = small / "filler"
        # ~24 KiB left: the bundle's meta and reserve fit, the first parts of incompressible-enough rows do not
        with open(filler, "wb") as f:
            f.write(os.urandom(max(0, shutil.disk_usage(small).free - (24 << 10))))
        calls, err, rc = capture(tmp_path, small / "b", 100_000, 4.0, [], ENV)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert "Traceback" not in err, err[-3000:]
        assert rc == 2 and lines[-1].startswith("hintscope: error:") and "No space" in lines[-1], err[-2000:]
        filler.unlink()
        b = read_bundle(small / "b")
        assert b.complete and b.meta["end_reason"].startswith("error") and "No space" in b.meta["end_reason"]
        unwritten = b.meta["unwritten_rows"]
        assert sum(unwritten.values()) == b.meta["lost"]["bundle_write"] > 0
        # every record taken from the ring is in a part or counted as not written
        assert len(b.table("ioctls")) + unwritten.get("ioctls", 0) == b.meta["host_probe"]["records"] > 0
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)
        shutil.rmtree(small, ignore_errors=True)


def test_writer_bug_is_one_line_and_later_batches_are_counted(tmp_path):
    w = BundleWriter(tmp_path / "b", producer="test")
    seen = []
    cw = CaptureWriter(w, seen.append)
    good = D.synthetic_records("ioctl", 100)
    cw.submit(good, len(good))
    real_append = w.append

    def broken(table, cols):
        raise TypeError("boom\nsecond line")

    deadline = time.monotonic() + 30
    while cw.batches < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    w.append = broken
    cw.submit(good, len(good))
    cw.submit(D.synthetic_records("ioctl", 50), 50 * 96)
    cw.close()
    w.append = real_append
    assert cw.error is not None and "\n" not in str(cw.error)
    assert "writer thread failed (TypeError: boom second line)" in str(cw.error)
    assert len(seen) == 1 and seen[0].records == 100
    w.close(end_reason=f"error: {cw.error}")
    b = read_bundle(tmp_path / "b")
    assert len(b.table("ioctls")) == 100
    # the failing batch's rows and the batch after it are counted, not silently dropped
    assert b.meta["lost"]["bundle_write"] == 150


def test_backlog_bound_tells_the_poller_to_leave_records_in_the_ring(tmp_path, monkeypatch):
    from hintscope.probes import capture_writer

    monkeypatch.setattr(capture_writer, "COALESCE_BYTES", 96 * 250)
    w = BundleWriter(tmp_path / "b", producer="test")
    gate = threading.Event()
    cw = CaptureWriter(w, lambda d: gate.wait(30), max_backlog_bytes=96 * 150)
    assert not cw.full
    for _ in range(3):
        cw.submit(D.synthetic_records("ioctl", 100), 100 * 96)
    assert cw.full and cw.backlog_bytes == 96 * 300
    gate.set()
    cw.close()
    assert not cw.full and cw.backlog_bytes == 0 and cw.error is None
    # queued batches are written together, but never more than COALESCE_BYTES at once
    assert cw.batches == 2
    w.close(end_reason="test")
    seq = read_bundle(tmp_path / "b").table("ioctls")["seq"].to_numpy()
    assert np.array_equal(np.sort(seq), np.repeat(np.arange(100), 3))
