"""The direct-KVM tiny VMM on its own: its harvest must be exactly the pages its guest wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hintscope.errors import HintscopeError
from hintscope.lab import minivmm


ROOT = Path(__file__).resolve().parents[1]


def run_vmm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "hintscope.lab.minivmm", "--no-wait", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_guest_code_layout():
    code = minivmm.guest_code([2, 255], value=0x41)
    # mov ax, 0x0200; mov ds, ax; mov byte [0], 0x41 -- then the same for page 255, then hlt
    assert code[:10] == bytes([0xB8, 0x00, 0x02, 0x8E, 0xD8, 0xC6, 0x06, 0x00, 0x00, 0x41])
    assert code[10:13] == bytes([0xB8, 0x00, 0xFF])
    assert code[-1] == 0xF4 and len(code) == 21


def test_page_list_validation():
    assert minivmm.parse_rounds("5,2,2;7", 256) == [[2, 5], [7]]
    with pytest.raises(HintscopeError, match="out of range"):
        minivmm.parse_rounds("0,3", 256)
    with pytest.raises(HintscopeError, match="out of range"):
        minivmm.parse_rounds("300", 1024)
    with pytest.raises(HintscopeError, match="bad page list"):
        minivmm.parse_rounds("2,x", 256)


@pytest.mark.needs_kvm
@pytest.mark.parametrize("mode", ["bitmap", "manual", "ring"])
def test_harvest_is_exactly_the_written_pages(mode):
    r = run_vmm("--pages", "2,5,8,11,14;3,200;255", "--mode", mode)
    assert r.returncode == 0, r.stderr
    rounds = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [x["written"] for x in rounds] == [[2, 5, 8, 11, 14], [3, 200], [255]]
    for x in rounds:
        assert x["harvest"] == x["written"], x
    assert r.stdout.splitlines()[-1] == "DONE"


@pytest.mark.needs_kvm
def test_clear_pattern_needs_manual_mode():
    r = run_vmm("--pages", "2", "--clear-pattern", "3")
    assert r.returncode == 2
    assert "needs --mode manual" in r.stderr and len(r.stderr.strip().splitlines()) == 1
