"""Host probe against a real KVM user: the minivmm (direct /dev/kvm VMM) run as a subprocess.

The probe runs as the lab runs it (``python -m hintscope probe host --pid ... -o ...``); the
minivmm opens /dev/kvm, waits for a go file written after the probe printed ATTACHED, then
creates its VM, so the probe sees every ioctl.  The bundle's GET_DIRTY_LOG harvest (or dirty
ring pushes) must equal exactly the pages the guest wrote.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hintscope.analysis.harvest import unrun
from hintscope.bundle import read_bundle
from hintscope.probes import kvm_abi as K
from hintscope.probes.decode import pages_from_words
from hintscope.probes.host import MAX_SLOT_PAGES

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
PY = sys.executable


def wait_line(proc: subprocess.Popen, want: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([proc.stdout], [], [], 0.5)
        if r:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith(want):
                return line
    proc.kill()
    _, err = proc.communicate(timeout=30)
    raise AssertionError(f"no {want!r} line; stderr: {err[-2000:]}")


class Capture:
    """minivmm + probe subprocesses wired together."""

    def __init__(self, tmp: Path, vmm_args: list[str], probe_args: list[str] = ()):
        self.go = tmp / "go"
        self.out = tmp / "bundle"
        self.vmm = subprocess.Popen([PY, "-m", "hintscope.lab.minivmm", *vmm_args, "--go-file", str(self.go)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        wait_line(self.vmm, "READY")
        self.probe = subprocess.Popen([PY, "-m", "hintscope", "probe", "host", "--pid", str(self.vmm.pid),
                                       "-o", str(self.out), *probe_args],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        wait_line(self.probe, "ATTACHED")
        self.go.touch()

    def finish(self, timeout: float = 120) -> tuple[list[dict], str]:
        vout, verr = self.vmm.communicate(timeout=timeout)
        assert self.vmm.returncode == 0, verr
        _, perr = self.probe.communicate(timeout=timeout)
        assert self.probe.returncode == 0, perr
        return [json.loads(x) for x in vout.splitlines() if x.startswith("{")], perr

    def kill(self) -> None:
        for p in (self.probe, self.vmm):
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=30)


@pytest.fixture
def captures():
    made: list[Capture] = []
    yield made
    for c in made:
        c.kill()


def harvests_by_get(b) -> list[list[int]]:
    io = b.table("ioctls")
    bw = unrun(b.table("bitmap_words"))
    gets = io[io["name"] == "GET_DIRTY_LOG"].sort_values("seq")
    out = []
    for seq in gets["seq"]:
        g = bw[(bw["seq"] == seq) & (bw["op"] == "get")]
        out.append(pages_from_words(g["word"].to_numpy(), g["mask"].to_numpy()).tolist())
    return out


@pytest.mark.parametrize("mode", ["bitmap", "manual"])
@pytest.mark.needs_bpf
@pytest.mark.needs_kvm
def test_get_dirty_log_harvest_is_exact(tmp_path, captures, mode):
    c = Capture(tmp_path, ["--pages", "2,5,8,11,14;3,200;64,65,127,128,255", "--mode", mode])
    captures.append(c)
    rounds, _ = c.finish()
    b = read_bundle(c.out)
    assert b.meta["end_reason"] == "target-exit" and b.complete and not b.problems
    written = [r["written"] for r in rounds]
    assert [r["harvest"] for r in rounds] == written          # the VMM's own view agrees
    assert harvests_by_get(b) == written                      # ... and so does the probe's
    ms = b.table("memslots")
    assert len(ms) == 1
    assert (ms["slot"][0], ms["flags"][0], ms["size"][0], ms["ret"][0]) == (0, K.MEM_LOG_DIRTY_PAGES, 256 * 4096, 0)
    assert ms["hva"][0] != 0
    io = b.table("ioctls")
    gets = io[io["name"] == "GET_DIRTY_LOG"]
    assert gets["pages"].tolist() == [len(w) for w in written] and (gets["num_pages"] == 256).all()
    assert (io["ts_ns"] >= io["enter_ns"]).all() and io["seq"].is_unique
    assert b.meta["lost"] == {} and b.meta["sources"]["host_ioctl"]["status"] == "captured"
    assert b.meta["vmm"]["pid"] == c.vmm.pid and b.meta["vmm"]["version"]
    if mode == "manual":
        caps = io[io["name"] == "ENABLE_CAP"]
        assert caps["cap"].tolist() == [K.CAP_MANUAL_DIRTY_LOG_PROTECT2] and caps["arg0"].tolist() == [1]
        # minivmm clears exactly what GET returned
        clears = io[io["name"] == "CLEAR_DIRTY_LOG"].sort_values("seq")
        bw = unrun(b.table("bitmap_words"))
        got = [pages_from_words(bw[(bw.seq == s) & (bw.op == "clear")]["word"].to_numpy(),
                                bw[(bw.seq == s) & (bw.op == "clear")]["mask"].to_numpy()).tolist()
               for s in clears["seq"]]
        assert got == written and (clears["first_page"] == 0).all()


@pytest.mark.needs_bpf
@pytest.mark.needs_kvm
def test_dirty_ring_pushes_are_exact(tmp_path, captures):
    c = Capture(tmp_path, ["--pages", "2,5,8,11,14;3,200", "--mode", "ring"])
    captures.append(c)
    rounds, _ = c.finish()
    b = read_bundle(c.out)
    io = b.table("ioctls")
    resets = io[io["name"] == "RESET_DIRTY_RINGS"].sort_values("ts_ns")
    cap = io[io["name"] == "ENABLE_CAP"]
    assert cap["cap"].tolist() == [K.CAP_DIRTY_LOG_RING] and cap["arg0"].tolist() == [4096 * 16]
    push = b.table("ring_push")
    assert (push["slot"] == 0).all()
    lo = 0
    got = []
    for t in resets["ts_ns"]:
        got.append(sorted(push[(push.ts_ns > lo) & (push.ts_ns <= t)]["offset"].tolist()))
        lo = t
    assert got == [r["written"] for r in rounds]
    assert resets["pages"].tolist() == [len(r["written"]) for r in rounds]
    assert len(b.table("ring_reset")) == len(rounds)
    assert b.table("bitmap_words").empty                       # no GET in ring mode


@pytest.mark.needs_bpf
@pytest.mark.needs_kvm
def test_long_clear_bitmap_walk_exact_and_truncated(tmp_path, captures):
    # ~3.9M pages: the in-kernel walk needs ~30 tail calls; every one of 3000 scattered bits must arrive.
    pages_ok = MAX_SLOT_PAGES - 12345
    (tmp_path / "a").mkdir()
    c = Capture(tmp_path / "a", ["--pages", "2", "--mode", "manual", "--mem-pages", str(pages_ok),
                                  "--clear-pattern", "3000"])
    captures.append(c)
    out, _ = c.finish()
    pattern = next(x["clear_pattern"] for x in out if "clear_pattern" in x)
    b = read_bundle(c.out)
    io = b.table("ioctls")
    last = io[io["name"] == "CLEAR_DIRTY_LOG"].sort_values("seq").iloc[-1]
    bw = unrun(b.table("bitmap_words"))
    g = bw[(bw.seq == last["seq"]) & (bw.op == "clear")]
    assert pages_from_words(g["word"].to_numpy(), g["mask"].to_numpy()).tolist() == pattern
    assert last["pages"] == 3000 and last["num_pages"] == pages_ok
    assert b.meta["host_probe"]["bitmap_truncated"] == 0

    # Past the walk's reach: the beginning is kept, the truncation is reported.
    big = MAX_SLOT_PAGES + 64 * 1000
    (tmp_path / "b").mkdir()
    c2 = Capture(tmp_path / "b", ["--pages", "2", "--mode", "manual", "--mem-pages", str(big),
                                  "--clear-pattern", "2000"])
    captures.append(c2)
    out, _ = c2.finish()
    pattern = np.array(next(x["clear_pattern"] for x in out if "clear_pattern" in x))
    b = read_bundle(c2.out)
    bw = unrun(b.table("bitmap_words"))
    io = b.table("ioctls")
    last = io[io["name"] == "CLEAR_DIRTY_LOG"].sort_values("seq").iloc[-1]
    g = bw[(bw.seq == last["seq"]) & (bw.op == "clear")]
    assert pages_from_words(g["word"].to_numpy(), g["mask"].to_numpy()).tolist() == \
        pattern[pattern < MAX_SLOT_PAGES].tolist()
    # every bitmap of this slot is too long: the round's GET and CLEAR and the pattern CLEAR
    walked = io["name"].isin(["GET_DIRTY_LOG", "CLEAR_DIRTY_LOG"]) & (io["ret"] == 0)
    assert b.meta["host_probe"]["bitmap_truncated"] == walked.sum() == 3
    assert b.meta["sources"]["host_ioctl"]["status"] == "partial"
    assert b.meta["lost"].get("host_bitmap", 0) >= 1


@pytest.mark.needs_bpf
@pytest.mark.needs_kvm
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_interrupted_capture_leaves_readable_bundle(tmp_path, captures, sig):
    c = Capture(tmp_path, ["--pages", "2,3", "--loop", "0.05"], ["--flush-interval", "0.3"])
    captures.append(c)
    deadline = time.monotonic() + 60
    while not list((c.out / "ioctls").glob("part-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    c.probe.send_signal(getattr(signal, sig))
    _, err = c.probe.communicate(timeout=60)
    b = read_bundle(c.out)
    io = b.table("ioctls")
    assert len(io[io["name"] == "GET_DIRTY_LOG"]) >= 2
    assert set(harvests_by_get(b)[0]) == {2, 3}
    if sig != "SIGKILL":
        assert c.probe.returncode == 0, err
        assert b.complete and b.meta["end_reason"] == sig.lower() and not b.problems
    else:
        assert not b.complete and any("did not finish" in p for p in b.problems)


def run_probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "hintscope", "probe", "host", *args], capture_output=True, text=True,
                          timeout=60, env=ENV)


def test_missing_pid_is_a_one_line_error(tmp_path):
    r = run_probe("--pid", "999999999", "-o", str(tmp_path / "b"))
    assert r.returncode == 2
    assert r.stderr.strip() == "hintscope: error: pid 999999999: no such process"
    assert not (tmp_path / "b").exists()


def test_bad_pidfile_is_a_one_line_error(tmp_path):
    (tmp_path / "pid").write_text("qemu\n")
    r = run_probe("--pidfile", str(tmp_path / "pid"), "-o", str(tmp_path / "b"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not a pid file" in r.stderr


def test_non_kvm_process_is_a_one_line_error(tmp_path):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        r = run_probe("--pid", str(sleeper.pid), "-o", str(tmp_path / "b"))
    finally:
        sleeper.kill()
        sleeper.wait()
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a KVM user" in lines[0] and f"pid {sleeper.pid} (sleep)" in lines[0]
    assert not (tmp_path / "b").exists()


@pytest.mark.needs_bpf
@pytest.mark.needs_kvm
def test_duration_pidfile_and_trace_log_copy(tmp_path):
    vmm = subprocess.Popen([PY, "-m", "hintscope.lab.minivmm", "--pages", "7", "--loop", "0.05", "--no-wait"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        wait_line(vmm, "READY")
        (tmp_path / "vmm.pid").write_text(f"{vmm.pid}\n")
        log = tmp_path / "trace.log"
        log.write_text("12@1700000000.000001:migrate_set_state new state active\n")
        r = subprocess.run([PY, "-m", "hintscope", "probe", "host", "--pidfile", str(tmp_path / "vmm.pid"),
                            "--duration", "1.5", "--qemu-trace-log", str(log), "-o", str(tmp_path / "b")],
                           capture_output=True, text=True, timeout=120, env=ENV)
    finally:
        vmm.kill()
        vmm.communicate(timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "ATTACHED"
    b = read_bundle(tmp_path / "b")
    assert b.meta["end_reason"] == "duration" and b.complete
    assert b.meta["sources"]["qemu_trace"]["status"] == "captured"
    assert b.file("qemu-trace.log").read_text() == log.read_text()
    # the VM was created before the probe attached: GETs are seen, their bitmaps cannot be sized
    io = b.table("ioctls")
    gets = io[io["name"] == "GET_DIRTY_LOG"]
    assert len(gets) >= 2 and (gets["pages"] == -1).all() and (gets["num_pages"] == -1).all()
    assert b.meta["host_probe"]["get_unknown_slot"] == len(gets)
    assert b.meta["sources"]["host_ioctl"]["status"] == "partial"
    assert b.table("bitmap_words").empty
