"""Markers for tests that need real privileges or devices.

needs_root / needs_bpf / needs_kvm / needs_qemu run for real where the machine has them and
skip with the reason printed (`-ra`) where it does not.  `lab` tests are the long real-lab
runs: they run only with HINTSCOPE_LAB=1.
"""

from __future__ import annotations

import functools
import os
import shutil

import pytest

QEMU = os.environ.get("HINTSCOPE_QEMU", "/usr/bin/qemu-system-x86_64")


@functools.cache
def _reasons() -> dict[str, str | None]:
    from hintscope.probes.bcc_env import bpf_unavailable_reason

    root = None if os.geteuid() == 0 else "needs root"
    kvm = None
    if not os.path.exists("/dev/kvm"):
        kvm = "needs /dev/kvm"
    elif not os.access("/dev/kvm", os.R_OK | os.W_OK):
        kvm = "/dev/kvm is not accessible to this user"
    qemu = None if (shutil.which(QEMU) or os.path.exists(QEMU)) else f"needs QEMU ({QEMU} not found)"
    return {
        "needs_root": root,
        "needs_bpf": bpf_unavailable_reason(),
        "needs_kvm": kvm,
        "needs_qemu": qemu,
        "lab": None if os.environ.get("HINTSCOPE_LAB") == "1" else "long real-lab test: set HINTSCOPE_LAB=1",
    }


def pytest_configure(config):
    for name, doc in [
        ("needs_root", "test needs root"),
        ("needs_bpf", "test loads BPF programs (root, BCC, kernel headers, tracefs)"),
        ("needs_kvm", "test needs /dev/kvm"),
        ("needs_qemu", "test needs qemu-system-x86_64"),
    ]:
        config.addinivalue_line("markers", f"{name}: {doc}")


def pytest_runtest_setup(item):
    for name, reason in _reasons().items():
        if reason and item.get_closest_marker(name):
            pytest.skip(f"{name}: {reason}")


needs_root = pytest.mark.needs_root
needs_bpf = pytest.mark.needs_bpf
needs_kvm = pytest.mark.needs_kvm
needs_qemu = pytest.mark.needs_qemu
lab = pytest.mark.lab
