"""Launching QEMU for the lab, talking QMP to it (``qemu.qmp``), and tearing it down.

One :class:`Qemu` is one VMM process with its QMP socket, serial file and stderr log in a private
work directory. Source and destination of a migration are two of them; the destination gets
``-incoming`` plus ``-S`` so it stays paused after the incoming migration completes (QEMU only
autostarts an incoming VM without ``-S``), which is what lets the lab compare memory first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from hintscope.errors import HintscopeError

DEFAULT_QEMU = "/usr/bin/qemu-system-x86_64"

# The events the lab asks of QEMU's own trace log on the source (names checked with -trace help on 7.2).
TRACE_EVENTS = [
    "migration_bitmap_sync_start",
    "migration_bitmap_sync_end",
    "kvm_clear_dirty_log",
    "kvm_set_user_memory",
    "migrate_set_state",
    "ram_save_page",
    "kvm_dirty_ring_reap",
    "kvm_dirty_ring_flush",
]


def kvm_usable() -> bool:
    return os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)


def resolve_accel(accel: str) -> str:
    if accel == "auto":
        return "kvm" if kvm_usable() else "tcg"
    if accel == "kvm" and not kvm_usable():
        raise HintscopeError("--accel kvm: /dev/kvm is missing or not accessible")
    if accel not in ("kvm", "tcg"):
        raise HintscopeError(f"--accel {accel}: expected kvm, tcg or auto")
    return accel


def find_qemu(path: str | None) -> str:
    q = path or os.environ.get("HINTSCOPE_QEMU") or DEFAULT_QEMU
    found = shutil.which(q) or (q if os.path.isfile(q) and os.access(q, os.X_OK) else None)
    if not found:
        raise HintscopeError(f"QEMU binary {q} not found or not executable (use --qemu PATH)")
    return found


def qemu_version(qemu: str) -> str:
    r = subprocess.run([qemu, "-version"], capture_output=True, text=True, timeout=20)
    first = (r.stdout or r.stderr).strip().splitlines()
    return first[0] if first else "unknown"


_BUILD_LABEL_RE = re.compile(r"^label=([ -~]{1,80})$", re.M)


def qemu_label(qemu: str, version: str | None = None) -> str:
    """The QEMU version label for metadata and plots.

    A binary built by scripts/build-qemu.sh sits in ``PREFIX/bin`` beside ``PREFIX/BUILD-INFO``, whose
    ``label=`` line says what it is: ``patched (<hash of its patches>)`` or ``stock 10.0.2 (source build)``.
    Any other binary is labelled by its version number (``7.2.22``, ``10.0.2``)."""
    info = Path(os.path.realpath(qemu)).parent.parent / "BUILD-INFO"
    with contextlib.suppress(OSError, UnicodeDecodeError):
        with info.open("rb") as f:
            m = _BUILD_LABEL_RE.search(f.read(4096).decode("ascii"))
        if m:
            return m.group(1).strip()
    ver = version if version is not None else qemu_version(qemu)
    m = re.search(r"version (\d+\.\d+(?:\.\d+)?)", ver)
    return m.group(1) if m else ver[:40]


def available_trace_events(qemu: str) -> set[str]:
    r = subprocess.run([qemu, "-trace", "help"], capture_output=True, text=True, timeout=30)
    return set(r.stdout.split())


@dataclass
class QemuConfig:
    """Everything that goes on one QEMU command line."""

    name: str                      # "src" / "dst": names the files in workdir
    workdir: Path
    qemu: str = DEFAULT_QEMU
    accel: str = "kvm"             # kvm or tcg (already resolved)
    dirty_ring: int = 0            # KVM dirty ring entries per vCPU; 0 = bitmap mode
    mem_mb: int = 256
    smp: int = 1
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    hint: bool = True              # virtio-balloon with free-page-hint on an iothread
    incoming: str | None = None    # e.g. "unix:/tmp/.../mig.sock"; implies -S
    trace_events_file: Path | None = None
    trace_file: Path | None = None
    extra: list[str] = field(default_factory=list)

    @property
    def qmp_path(self) -> Path:
        return self.workdir / f"{self.name}.qmp"

    @property
    def serial_path(self) -> Path:
        return self.workdir / f"{self.name}.serial"

    @property
    def stderr_path(self) -> Path:
        return self.workdir / f"{self.name}.stderr"

    def argv(self) -> list[str]:
        if self.accel == "kvm":
            accel = "kvm" + (f",dirty-ring-size={self.dirty_ring}" if self.dirty_ring else "")
        else:
            accel = "tcg"
        a = [self.qemu, "-name", f"hintscope-{self.name}", "-accel", accel, "-m", str(self.mem_mb),
             "-smp", str(self.smp), "-display", "none", "-nodefaults", "-no-user-config",
             "-serial", f"file:{self.serial_path}",
             "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
             "-msg", "timestamp=on"]
        if self.kernel:
            a += ["-kernel", self.kernel]
        if self.initrd:
            a += ["-initrd", self.initrd]
        if self.append:
            a += ["-append", self.append]
        if self.hint:
            a += ["-object", "iothread,id=io1",
                  "-device", "virtio-balloon-pci,id=balloon0,free-page-hint=on,iothread=io1"]
        if self.trace_events_file and self.trace_file:
            a += ["-trace", f"events={self.trace_events_file},file={self.trace_file}"]
        if self.incoming:
            a += ["-S", "-incoming", self.incoming]
        return a + list(self.extra)


def _die_with_parent() -> None:
    """In the forked child: SIGKILL when the parent exits, so no QEMU outlives its lab run."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Qemu:
    """A running QEMU with a connected QMP client. Use ``async with`` or call :meth:`stop`."""

    def __init__(self, cfg: QemuConfig):
        self.cfg = cfg
        self.proc: subprocess.Popen | None = None
        self.qmp: QMPClient | None = None
        self.greeting: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stderr_tail(self, n: int = 3) -> str:
        try:
            lines = self.cfg.stderr_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        # -msg timestamp=on prefixes lines with a timestamp; the message is what matters.
        lines = [re.sub(r"^\S+Z ", "", ln) for ln in lines if "warning: host doesn't support" not in ln]
        return " | ".join(lines[-n:])

    async def start(self, timeout: float = 20.0) -> "Qemu":
        cfg = self.cfg
        cfg.workdir.mkdir(parents=True, exist_ok=True)
        for p in (cfg.qmp_path, cfg.serial_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        with open(cfg.stderr_path, "wb") as err:
            # Own session: a Ctrl-C on the terminal reaches hintscope, which then quits QEMU cleanly.
            # If hintscope itself dies (SIGTERM, SIGKILL) before it can, the kernel kills QEMU.
            self.proc = subprocess.Popen(cfg.argv(), stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise HintscopeError(f"QEMU {cfg.name} exited with {self.proc.returncode} at start: "
                                     f"{self.stderr_tail() or 'no message'} (log {cfg.stderr_path})")
            if cfg.qmp_path.exists():
                client = QMPClient(f"hintscope-{cfg.name}")
                try:
                    await client.connect(str(cfg.qmp_path))
                    self.qmp = client
                    self.greeting = dict(client.greeting._raw) if client.greeting else {}
                    return self
                except Exception:  # noqa: BLE001 - qemu.qmp raises many types while QEMU starts; retry
                    with contextlib.suppress(Exception):
                        await client.disconnect()
            if time.monotonic() > deadline:
                raise HintscopeError(f"QEMU {cfg.name}: no QMP socket at {cfg.qmp_path} after {timeout:.0f} s")
            await asyncio.sleep(0.05)

    async def cmd(self, name: str, args: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        if self.qmp is None:
            raise HintscopeError(f"QEMU {self.cfg.name}: QMP not connected")
        try:
            return await asyncio.wait_for(self.qmp.execute(name, args), timeout)
        except asyncio.TimeoutError:
            raise HintscopeError(f"QEMU {self.cfg.name}: QMP {name} got no reply in {timeout:.0f} s") from None
        except Exception as e:  # noqa: BLE001 - a dead QEMU surfaces as any qemu.qmp error: name the exit
            if self.proc is not None and self.proc.poll() is not None:
                raise HintscopeError(f"QEMU {self.cfg.name} died (exit {self.proc.returncode}): "
                                     f"{self.stderr_tail() or 'no message'}") from None
            raise HintscopeError(f"QEMU {self.cfg.name}: QMP {name} failed: {e}") from None

    async def status(self) -> str:
        return str((await self.cmd("query-status")).get("status"))

    async def stop(self, grace: float = 3.0) -> int | None:
        """Quit through QMP, then SIGTERM, then SIGKILL; returns the exit status."""
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.execute("quit"), 2.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.disconnect(), 2.0)
            self.qmp = None
        if self.proc is None:
            return None
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None and self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(sig)
            t_end = time.monotonic() + grace
            while self.proc.poll() is None and time.monotonic() < t_end:
                await asyncio.sleep(0.05)
            if self.proc.poll() is not None:
                break
        with contextlib.suppress(FileNotFoundError):
            self.cfg.qmp_path.unlink()
        return self.proc.returncode

    async def __aenter__(self) -> "Qemu":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()


async def ram_map(q: "Qemu", mem_bytes: int) -> dict[str, list[int]]:
    """Guest RAM's HVA ranges in ``q``, from QEMU's own HMP ``gpa2hva`` (columns of table ``ram_map``).

    The lab guests stay below 3 GiB, so x86 RAM is one range from GPA 0 (the VGA/ROM hole is
    an overlay, not a gap in pc.ram); the last page is checked to prove the range is linear.
    """
    async def gpa2hva(gpa: int) -> int | None:
        out = await q.cmd("human-monitor-command", {"command-line": f"gpa2hva {gpa:#x}"})
        m = re.search(r"is (0x[0-9a-fA-F]+)", str(out))
        return int(m.group(1), 16) if m else None

    ts = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    first, last = await gpa2hva(0), await gpa2hva(mem_bytes - 4096)
    if first is None or last is None or last - first != mem_bytes - 4096:
        raise HintscopeError(f"QEMU {q.cfg.name}: guest RAM is not one linear HVA range (gpa2hva {first}, {last})")
    return {"ts_ns": [ts], "gpa": [0], "size": [mem_bytes], "hva": [first]}
