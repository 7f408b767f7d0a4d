"""Host probe against a real QEMU (KVM, 64 MiB, paused): memslots, dirty-log ioctls and uprobes.

QEMU registers its memslots before the probe can attach; a migration to ``exec:cat > /dev/null``
turns dirty logging on (SET_USER_MEMORY_REGION again, now with LOG_DIRTY_PAGES) and syncs,
so the probe sees slots, GET/CLEAR_DIRTY_LOG and the QEMU uprobes within a second.  Full
migrations with hinting are the lab's tests (tests/test_lab*.py).
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hintscope.bundle import read_bundle
from tests.qmp_sync import QMP
from hintscope.probes import kvm_abi as K
from tests.conftest import QEMU

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


QEMU10 = Path("/opt/hintscope/qemu-bpo/usr")   # scripts/install-qemu-backports.sh


def probed_migration(tmp_path: Path, accel: str, binary: list[str] = (QEMU,), probe_args: list[str] = ()):
    """Start a paused QEMU, attach the probe, migrate to /dev/null, quit; returns (bundle, syncs)."""
    sock = tmp_path / "qmp.sock"
    qemu = subprocess.Popen([*binary, "-accel", accel, "-m", "64", "-display", "none", "-S", "-nodefaults",
                             "-qmp", f"unix:{sock},server=on,wait=off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    probe = None
    try:
        qmp = QMP(sock)
        probe = subprocess.Popen([sys.executable, "-m", "hintscope", "probe", "host", "--pid", str(qemu.pid),
                                  "-o", str(tmp_path / "b"), *probe_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=ENV)
        r, _, _ = select.select([probe.stdout], [], [], 120)
        line = probe.stdout.readline() if r else ""
        if line.strip() != "ATTACHED":
            probe.kill()
            raise AssertionError(f"probe did not attach: {probe.communicate(timeout=30)[1][-2000:]}")
        qmp.cmd("migrate", uri="exec:cat > /dev/null")
        deadline = time.monotonic() + 60
        while (st := qmp.cmd("query-migrate"))["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, st
            time.sleep(0.1)
        assert st["status"] == "completed", st
        syncs = st["ram"]["dirty-sync-count"]
        qmp.cmd("quit")
        qemu.wait(timeout=30)
        _, err = probe.communicate(timeout=60)
        assert probe.returncode == 0, err
    finally:
        for p in (probe, qemu):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()

    b = read_bundle(tmp_path / "b")
    assert b.meta["end_reason"] == "target-exit" and not b.problems
    return b, syncs


def check_uprobes(b, syncs: int) -> None:
    q = b.meta["sources"]["qemu_uprobes"]
    assert q["status"] == "captured" and q["symbols"]["qemu_guest_free_page_hint"] == "attached"
    ev = b.table("qemu_events")
    assert (ev["event"] == "sync_fetch_begin").sum() == syncs == (ev["event"] == "sync_fetch_end").sum()
    names = q["migration_states"]                 # numbers -> names for this QEMU version
    states = [(names[a], names[b]) for a, b in ev[ev["event"] == "migrate_state"][["a1", "a2"]].values.tolist()]
    assert ("setup", "active") in states and states[-1][1] == "completed"
    # QEMU >= 9 also sends migration state notifiers through notifier_with_return_list_notify
    lst = q["precopy_list"]
    assert lst is not None
    reasons = ev[(ev["event"] == "precopy_notify") & (ev["a0"] == lst)]["a1"].tolist()
    assert reasons.count(1) == syncs and reasons.count(2) == syncs      # BEFORE / AFTER_BITMAP_SYNC


@pytest.mark.needs_qemu
@pytest.mark.needs_bpf
def test_tcg_qemu_gets_uprobes_only(tmp_path):
    b, syncs = probed_migration(tmp_path, "tcg")
    assert b.meta["sources"]["host_ioctl"]["status"] == "unavailable"
    assert "TCG" in b.meta["sources"]["host_ioctl"]["reason"]
    assert b.table("ioctls").empty
    check_uprobes(b, syncs)


@pytest.mark.needs_qemu
@pytest.mark.needs_kvm
@pytest.mark.needs_bpf
def test_qemu_memslots_dirty_log_and_uprobes(tmp_path):
    b, syncs = probed_migration(tmp_path, "kvm")
    check_uprobes(b, syncs)
    assert b.meta["vmm"]["kind"] == "qemu" and b.meta["vmm"]["version"].startswith("QEMU emulator version")
    ms = b.table("memslots")
    logged = ms[(ms["flags"] & K.MEM_LOG_DIRTY_PAGES) != 0]
    assert logged["size"].sum() >= (64 << 20) - (1 << 20)     # guest RAM (minus the VGA/BIOS holes)
    assert (ms["ret"] == 0).all() and (ms["as_id"] == 0).all()

    io = b.table("ioctls")
    gets = io[io["name"] == "GET_DIRTY_LOG"]
    assert len(gets) >= syncs and (gets["ret"] == 0).all()
    # every slot was (re-)registered after attach, so every bitmap was read in full
    assert (gets["pages"] >= 0).all() and (gets["pages"] <= gets["num_pages"]).all()
    bw = b.table("bitmap_words")
    assert set(bw.loc[bw.op == "get", "seq"]) <= set(gets["seq"])

    ev = b.table("qemu_events")
    # each sync's GETs fall inside its fetch window
    begins = ev.loc[ev.event == "sync_fetch_begin", "ts_ns"].to_numpy()
    ends = ev.loc[ev.event == "sync_fetch_end", "ts_ns"].to_numpy()
    inside = sum(((gets["ts_ns"] > s) & (gets["ts_ns"] < e)).sum() for s, e in zip(begins, ends))
    assert inside == len(gets)


@pytest.mark.needs_kvm
@pytest.mark.needs_bpf
@pytest.mark.skipif(not (QEMU10 / "bin/qemu-system-x86_64").exists(), reason="QEMU 10 backport not unpacked "
                    "(scripts/install-qemu-backports.sh)")
def test_qemu10_page_sends_through_out_of_line_helpers(tmp_path):
    binary = [str(QEMU10 / "bin/qemu-system-x86_64"), "-L", str(QEMU10 / "share/qemu"),
              "-L", str(QEMU10 / "share/seabios")]
    b, syncs = probed_migration(tmp_path, "kvm", binary, ["--page-sends"])
    check_uprobes(b, syncs)
    assert b.meta["vmm"]["version"].startswith("QEMU emulator version 10.")
    # buffer_is_zero is inline from QEMU 9.0: the probe falls back to its out-of-line helpers
    assert b.meta["sources"]["qemu_uprobes"]["symbols"]["buffer_is_zero"].startswith("attached via buffer_is_zero_ool")
    ev = b.table("qemu_events")
    sends = ev[ev["event"] == "page_send"]
    ram = b.table("memslots").query("size >= 0x1000000")       # the 64 MiB RAM slot(s)
    assert len(sends) >= (ram["size"].sum() >> 12)            # every RAM page at least once
    assert sends["tid"].nunique() == 1 and (sends["a1"] == 4096).all()
    lo, hi = ram["hva"].min(), (ram["hva"] + ram["size"]).max()
    assert ((sends["a0"] >= lo) & (sends["a0"] < hi)).sum() >= (ram["size"].sum() >> 12)
