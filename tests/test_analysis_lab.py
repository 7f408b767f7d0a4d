"""Real-lab check of the per-sync cross-check (HINTSCOPE_LAB=1; root, BPF, KVM; ~1-2 min).

The bare-metal hinting guest (hintscope.lab.hintguest) migrates under KVM with manual protect while
the host probe, with ``--page-sends``, is attached to its source QEMU.  The harvest-based estimate of
pages newly set in QEMU's migration bitmap must track QEMU's own ``migration_bitmap_sync_end`` count,
and the capture's counters must equal QMP's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hintscope.analysis.summary import analyze
from hintscope.bundle import read_bundle
from tests.conftest import lab, needs_bpf, needs_kvm, needs_qemu, needs_root

ROOT = Path(__file__).resolve().parent.parent


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(x) for x in out]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@lab
@needs_root
@needs_bpf
@needs_kvm
@needs_qemu
def test_hintguest_probed_counts_match_qemu(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    labdir, probedir = tmp_path / "lab", tmp_path / "probe"
    labp = subprocess.Popen([sys.executable, "-m", "hintscope.lab.hintguest", "hintguest", "--behaviour", "polite",
                             "--dirty-ring", "0", "--trace", "off", "-o", str(labdir)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    probe = None
    try:
        src = None
        deadline = time.monotonic() + 60
        while src is None and time.monotonic() < deadline and labp.poll() is None:
            src = next((c for c in _children(labp.pid) if "hintscope-src" in _cmdline(c)), None)
            time.sleep(0.05)
        assert src, "source QEMU of the hintguest lab not found"
        probe = subprocess.Popen([sys.executable, "-m", "hintscope", "probe", "host", "--pid", str(src),
                                  "--page-sends", "-o", str(probedir)], cwd=ROOT, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = labp.communicate(timeout=400)
        assert labp.returncode == 0, out[-2000:]
        pout, _ = probe.communicate(timeout=60)
        assert probe.returncode == 0, pout[-2000:]
    finally:
        for p in (labp, probe):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    # Join the lab's QMP snapshots and QEMU trace log to the probe's bundle (same host, same clock).
    shutil.copytree(labdir / "qmp", probedir / "qmp")
    (probedir / "files").mkdir(exist_ok=True)
    shutil.copy(labdir / "files" / "qemu-trace.log", probedir / "files" / "qemu-trace.log")
    res = analyze(read_bundle(probedir))
    s = res["syncs"]
    assert res["summary"]["sync_source"] == "notify" and res["summary"]["dirty_mode"] == "manual"
    assert all(k["agree"] for k in res["counter_checks"]), res["counter_checks"]
    assert {k["check"].split(" vs ")[0] for k in res["counter_checks"]} >= {"page_send uprobe hits"}
    later = s.iloc[1:]
    assert (later["est_new_pages"] >= 0).all() and (later["qemu_new_pages"] >= 0).all()
    # QEMU may count a page or two it dirtied itself (the balloon's virtqueue in guest RAM).
    assert ((later["qemu_new_pages"] - later["est_new_pages"]).abs() <= 2).all(), s.to_string()
    t = res["accounting"]["totals"]
    assert t["applies"] > 0 and t["applies_outside_epochs"] == 0 and t["skipped_pages"] > 0
