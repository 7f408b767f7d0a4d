"""Source and destination QEMU from plain argv, and the hinting guest's serial log."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.qmp_sync import QMP

# Where this machine keeps the two QEMUs (README, notes/machine.md). 10.0.2 is unpacked from
# bookworm-backports, so it needs its firmware directories named; the system ones come after.
BPO = Path("/opt/hintscope/qemu-bpo/usr")
QEMUS = {
    "7.2": ("/usr/bin/qemu-system-x86_64", []),
    "10.0.2": (str(BPO / "bin/qemu-system-x86_64"),
               ["-L", str(BPO / "share/qemu"), "-L", "/usr/share/qemu", "-L", "/usr/share/seabios"]),
}

MEM_MB = 256
# Guest layout in a 256 MiB VM: no boot-time fill (it only costs boot time here), the background
# writer (32 MiB: at 32 MiB/s one pass over it
# takes about 1 s, long enough that the guest's slow phases, printing its log with a VM exit per
# byte, do not let the migration converge before its rounds are done) in the first 128 MiB, the hint pool
# (28 blocks of 4 MiB; the firmware keeps the top of RAM) in the second. The source's clear_bmap chunk is set to 128 MiB
# (x-clear-bitmap-shift 15 = 2^15 pages) so the pool has a chunk of its own, as in a big guest
# where free memory sits far from the busy pages: then the first KVM_CLEAR_DIRTY_LOG of the pool
# after a sync is the one issued by the hint apply, not by the migration thread sending a
# background page. With QEMU's default 1 GiB chunk the whole VM is one chunk and the migration
# thread re-arms it before the guest even sees the cmd id.
POOL_GFN = 0x8000
POOL_BLOCKS = 28
BLOCK_PAGES = 1024
CLEAR_BITMAP_SHIFT = 15


def guest_append(behaviour: str, stale: bool, rounds: int = 3, reuse: int = 4, nblocks: int = 8) -> str:
    return (f"behaviour={behaviour} pool={POOL_GFN:#x} pool_blocks={POOL_BLOCKS} nblocks={nblocks} "
            f"reuse={reuse} rounds={rounds} fill_mb=32 bg=0x1000-0x2fff" + (" stale=1" if stale else ""))


def qemu_available(version: str) -> str | None:
    """None when this QEMU can run here, else why not."""
    binary = QEMUS[version][0]
    if not os.access(binary, os.X_OK):
        return f"QEMU {version} not installed ({binary})"
    return None


def _die_with_parent() -> None:
    # A killed test run must not leave VMs behind.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


@dataclass
class VM:
    name: str
    workdir: Path
    version: str
    kernel: Path
    append: str
    dirty_ring: int = 0
    incoming: str | None = None
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    qmp: QMP | None = None

    @property
    def serial(self) -> Path:
        return self.workdir / f"{self.name}.serial"

    @property
    def qmp_path(self) -> Path:
        return self.workdir / f"{self.name}.qmp"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def argv(self) -> list[str]:
        binary, firmware = QEMUS[self.version]
        accel = "kvm" + (f",dirty-ring-size={self.dirty_ring}" if self.dirty_ring else "")
        a = [binary, *firmware, "-name", f"outsider-{self.name}", "-accel", accel, "-m", str(MEM_MB),
             "-smp", "1", "-display", "none", "-nodefaults", "-no-user-config",
             "-kernel", str(self.kernel), "-append", self.append,
             # virtio-balloon's free page hinting refuses to realize without an iothread
             "-object", "iothread,id=io1",
             "-device", "virtio-balloon-pci,id=balloon0,free-page-hint=on,iothread=io1",
             "-global", f"migration.x-clear-bitmap-shift={CLEAR_BITMAP_SHIFT}",
             "-serial", f"file:{self.serial}",
             "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if self.incoming:
            a += ["-S", "-incoming", self.incoming]
        return a + self.extra

    def start(self) -> "VM":
        self.workdir.mkdir(parents=True, exist_ok=True)
        for p in (self.serial, self.qmp_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        err = open(self.workdir / f"{self.name}.stderr", "wb")
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                     preexec_fn=_die_with_parent)
        err.close()
        deadline = time.monotonic() + 20
        while not self.qmp_path.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU {self.name} exited {self.proc.returncode}: {self.stderr_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"QEMU {self.name} made no QMP socket in 20 s")
            time.sleep(0.05)
        self.qmp = QMP(self.qmp_path)
        return self

    def stderr_tail(self) -> str:
        with contextlib.suppress(OSError):
            return " | ".join((self.workdir / f"{self.name}.stderr").read_text(errors="replace").splitlines()[-3:])
        return ""

    def cmd(self, name: str, **args):
        assert self.qmp is not None
        return self.qmp.cmd(name, **args)

    def status(self) -> str:
        return self.cmd("query-status")["status"]

    def wait_status(self, want: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (st := self.status()) != want:
            if time.monotonic() > deadline:
                raise RuntimeError(f"QEMU {self.name} is {st!r}, expected {want!r}")
            time.sleep(0.05)

    def stop(self) -> None:
        # QMP first, then SIGTERM: a `quit` makes QEMU drop the connection under qemu.qmp's reader
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# ---- the guest's serial log: `HG t=<tsc> ev=<name> key=value ...` (docs/hintguest.md) ----------
LINE = re.compile(r"^HG t=(\d+) ev=(\w+)((?: \w+=\S+)*) *$")


@dataclass
class GuestLog:
    events: list[tuple[str, dict[str, str]]]
    bad_lines: int

    def of(self, name: str) -> list[dict[str, str]]:
        return [kv for ev, kv in self.events if ev == name]

    def hinted_blocks(self) -> list[tuple[int, int, int, int]]:
        """(first gfn, pages, cmd id, round) of every block the guest made available as a hint."""
        return [(int(h["gfn"], 16), int(h["npages"]), int(h["id"], 16), int(h["round"])) for h in self.of("hint")]

    def writes_after_hint(self) -> dict[int, int]:
        """gfn -> sequence number of the guest's last write to it after hinting it (ev=write)."""
        out: dict[int, int] = {}
        for w in self.of("write"):
            out[int(w["gfn"], 16)] = int(w["seq"])
        return out

    def error(self) -> str | None:
        errs = self.of("error")
        return " ".join(f"{k}={v}" for k, v in errs[0].items()) if errs else None


def read_log(src: Path, dst: Path | None = None, wait_s: float = 0) -> GuestLog:
    """Parses the source's serial file and, after it, the resumed destination's, which continues
    the line the source was cut in. With ``dst``, waits up to ``wait_s`` for the destination to
    get back to its main loop (a heartbeat line): then the round the source was in is logged."""
    if dst is not None:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not (dst.exists() and re.search(rb"ev=(hb|done)\b", dst.read_bytes())):
            time.sleep(0.05)
    data = b"".join(p.read_bytes()[:64 << 20] for p in (src, dst) if p is not None and p.exists())
    events, bad = [], 0
    for line in data.decode("ascii", errors="replace").splitlines():
        m = LINE.match(line)
        if not m:
            bad += 1
            continue
        events.append((m.group(2), dict(kv.split("=", 1) for kv in m.group(3).split())))
    return GuestLog(events, bad)


def wait_serial(path: Path, pattern: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    rx = re.compile(pattern, re.M)
    while True:
        text = path.read_bytes().decode("ascii", errors="replace") if path.exists() else ""
        if m := re.search(r"^HG t=\d+ ev=error (.*)$", text, re.M):
            raise RuntimeError(f"{path}: guest error: {m.group(1)[:200]}")
        if rx.search(text):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path}: no {pattern!r} from the guest within {timeout:.0f} s")
        time.sleep(0.05)
