"""Probe safety: the BPF programs only read, the probe detaches on every exit path, and it refuses
targets it should not touch.

Detach is checked on the kernel's own bookkeeping: ``bpftool prog show --json`` lists the pids that
hold each program; every program the probe process held while attached must be gone after it exits
(other engineers' programs on the same host are not counted), and no BCC uprobe/kprobe event named
after the probe's pid may stay in tracefs.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
QEMU = os.environ.get("HINTSCOPE_QEMU", "/usr/bin/qemu-system-x86_64")
BPF_SOURCES = sorted((ROOT / "hintscope").rglob("*.bpf.c"))
# Helpers that write user memory, change return values, or signal processes: never in a probe.
FORBIDDEN = ["bpf_probe_write_user", "bpf_override_return", "bpf_send_signal", "bpf_send_signal_thread",
             "bpf_sys_bpf", "bpf_copy_from_user_task", "bpf_set_retval", "bpf_probe_write_kernel"]
REAL = [pytest.mark.needs_root, pytest.mark.needs_bpf]


def test_bpf_sources_found():
    names = {p.name for p in BPF_SOURCES}
    assert "host.bpf.c" in names, names


@pytest.mark.parametrize("src", BPF_SOURCES, ids=[p.name for p in BPF_SOURCES])
def test_bpf_programs_only_read(src):
    text = re.sub(r"/\*.*?\*/|//[^\n]*", "", src.read_text(), flags=re.S)  # comments may name them
    used = [h for h in FORBIDDEN if re.search(rf"\b{h}\b", text)]
    assert used == [], f"{src.name} uses {used}"


def test_python_loaders_only_attach_read_side():
    """The Python side must not load BPF programs of a writing type (LSM, struct_ops, fmod_ret)."""
    for p in (ROOT / "hintscope" / "probes").glob("*.py"):
        t = p.read_text()
        assert not re.search(r"\b(LSM|STRUCT_OPS|fmod_ret|override_return)\b", t), p.name


# --- live probe -------------------------------------------------------------------------------

def bpf_progs() -> list[dict]:
    r = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout or "[]")


def progs_of(pid: int) -> set[int]:
    """BPF program ids held by ``pid``, from its fdinfo (this bpftool cannot show pids)."""
    ids = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return ids
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-prog":
                continue
            m = re.search(r"^prog_id:\s*(\d+)", Path(f"/proc/{pid}/fdinfo/{fd}").read_text(), re.M)
        except OSError:
            continue
        if m:
            ids.add(int(m.group(1)))
    return ids


def leftover_events(pid: int) -> list[str]:
    out = []
    for f in ("uprobe_events", "kprobe_events"):
        try:
            out += [ln for ln in Path(f"/sys/kernel/tracing/{f}").read_text().splitlines() if f"bcc_{pid}" in ln]
        except OSError:
            pass
    return out


@pytest.fixture
def kvm_target(tmp_path):
    """A paused KVM QEMU (real KVM user; never runs guest code)."""
    if not os.path.exists(QEMU):
        pytest.skip(f"needs QEMU at {QEMU}")
    p = subprocess.Popen([QEMU, "-accel", "kvm", "-m", "32", "-display", "none", "-S", "-nodefaults",
                          "-no-user-config"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not any(os.readlink(f"/proc/{p.pid}/fd/{fd}").startswith("anon_inode:kvm-vm")
                  for fd in os.listdir(f"/proc/{p.pid}/fd") if os.path.exists(f"/proc/{p.pid}/fd/{fd}")):
        assert p.poll() is None and time.monotonic() < deadline, "QEMU did not create a VM"
        time.sleep(0.1)
    yield p
    p.kill()
    p.wait()


def start_probe(pid: int, out: Path, *extra: str) -> tuple[subprocess.Popen, set[int]]:
    pr = subprocess.Popen([sys.executable, "-m", "hintscope", "probe", "host", "--pid", str(pid), "-o", str(out),
                           *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    r, _, _ = select.select([pr.stdout], [], [], 180)
    line = pr.stdout.readline() if r else ""
    if line.strip() != "ATTACHED":
        pr.kill()
        raise AssertionError(f"probe did not attach: {pr.communicate()[1][-2000:]}")
    held = progs_of(pr.pid)
    assert held, "attached probe holds no BPF program (bpftool sees none)"
    return pr, held


def assert_detached(pr: subprocess.Popen, held: set[int]) -> None:
    # The kernel frees a program when its last fd/link closes; give it a moment after exit.
    deadline = time.monotonic() + 10
    while (still := held & {p["id"] for p in bpf_progs()}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not still, f"programs {sorted(still)} still loaded after the probe exited"
    assert leftover_events(pr.pid) == []


@pytest.mark.parametrize("how", ["duration", "sigint", "sigterm", "sigkill"])
@pytest.mark.parametrize("_m", [pytest.param(0, marks=REAL + [pytest.mark.needs_kvm, pytest.mark.needs_qemu])])
def test_probe_detaches_on_every_exit(kvm_target, tmp_path, how, _m):
    extra = ["--duration", "2"] if how == "duration" else []
    pr, held = start_probe(kvm_target.pid, tmp_path / "b", *extra)
    if how == "sigint":
        pr.send_signal(signal.SIGINT)
    elif how == "sigterm":
        pr.send_signal(signal.SIGTERM)
    elif how == "sigkill":
        pr.kill()
    _, err = pr.communicate(timeout=60)
    assert "Traceback" not in err, err[-2000:]
    if how != "sigkill":
        assert pr.returncode == 0, err[-2000:]
    assert_detached(pr, held)
    assert kvm_target.poll() is None, "the target must survive the probe"


@pytest.mark.parametrize("_m", [pytest.param(0, marks=REAL + [pytest.mark.needs_kvm, pytest.mark.needs_qemu])])
def test_probe_detaches_when_load_fails(kvm_target, tmp_path, _m):
    """A 64 GiB ring buffer cannot be created: the probe fails after compiling, in one line,
    and leaves no program behind."""
    before = {p["id"] for p in bpf_progs()}
    pr = subprocess.Popen([sys.executable, "-m", "hintscope", "probe", "host", "--pid", str(kvm_target.pid),
                           "--ring-mb", str(64 << 10), "-o", str(tmp_path / "b")], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=ENV)
    seen: set[int] = set()
    while pr.poll() is None:  # record what it loads while it tries
        seen |= progs_of(pr.pid)
        time.sleep(0.05)
    out, err = pr.communicate()
    assert "ATTACHED" not in out, "a 64 GiB ring was accepted"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert pr.returncode != 0 and "Traceback" not in err, err[-2000:]
    # libbcc/clang print their own diagnostics to stderr from C; hintscope's verdict is the last line.
    assert lines[-1].startswith("hintscope: error:") and "BPF" in lines[-1], err[-2000:]
    assert sum(ln.startswith("hintscope: error:") for ln in lines) == 1
    assert not (seen - before) & {p["id"] for p in bpf_progs()}
    assert leftover_events(pr.pid) == []
    assert kvm_target.poll() is None


@pytest.mark.needs_root
def test_probe_refuses_non_kvm_pid(tmp_path):
    t = subprocess.Popen(["sleep", "60"])
    try:
        r = subprocess.run([sys.executable, "-m", "hintscope", "probe", "host", "--pid", str(t.pid), "-o",
                            str(tmp_path / "b")], capture_output=True, text=True, env=ENV, timeout=120)
    finally:
        t.kill()
        t.wait()
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert "not a KVM user" in lines[0] and str(t.pid) in lines[0]
    assert not (tmp_path / "b").exists(), "a refused target must not leave a bundle behind"


@pytest.mark.needs_root
@pytest.mark.parametrize("pid", ["0", "-5", "999999999"])
def test_probe_refuses_bad_pids(tmp_path, pid):
    r = subprocess.run([sys.executable, "-m", "hintscope", "probe", "host", "--pid", pid, "-o",
                        str(tmp_path / "b")], capture_output=True, text=True, env=ENV, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("hintscope: error:"), r.stderr[-2000:]
