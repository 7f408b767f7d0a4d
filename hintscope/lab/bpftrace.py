"""A bpftrace program run beside a lab migration: started with a READY handshake, stopped with SIGINT.

The program must print ``READY`` from its ``BEGIN`` block (bpftrace runs BEGIN once every probe is
attached, so READY is the go signal).  Used by the ioctl crosscheck (lab/crosscheck.py) and the
hintguest's kick capture (lab/hintguest_kicks.bt).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from pathlib import Path

from hintscope.errors import HintscopeError
from hintscope.lab.session import read_until


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    if not shutil.which("bpftrace"):
        return "bpftrace not installed (apt-get install bpftrace)"
    return None


class Bpftrace:
    """``bpftrace`` running ``program`` (a file or ``-e`` text) with positional ``args``."""

    def __init__(self, program: str | Path, args: list[str | int], log_path: Path):
        self.program, self.args, self.log_path = program, [str(a) for a in args], log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.out = bytearray()

    async def start(self, timeout: float = 60.0) -> None:
        if reason := unavailable_reason():
            raise HintscopeError(f"bpftrace: {reason}")
        prog = [str(self.program)] if isinstance(self.program, Path) else ["-e", self.program]
        self.proc = await asyncio.create_subprocess_exec(shutil.which("bpftrace"), *prog, *self.args,
                                                         stdout=asyncio.subprocess.PIPE,
                                                         stderr=asyncio.subprocess.STDOUT)
        try:
            ready = await read_until(self.proc.stdout, b"READY", timeout, self.out.extend)
        except asyncio.TimeoutError:
            await self.stop()
            raise HintscopeError(f"bpftrace did not attach within {timeout:.0f} s") from None
        if not ready:
            raise HintscopeError(f"bpftrace exited before attaching: {bytes(self.out)[-300:].decode(errors='replace')}")

    async def stop(self) -> str:
        """SIGINT, then everything bpftrace printed (also written to ``log_path``)."""
        if self.proc is None:
            return ""
        t0 = time.monotonic()
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = await asyncio.wait_for(self.proc.communicate(), 30)
        except asyncio.TimeoutError:
            self.proc.kill()
            out, _ = await self.proc.communicate()
        self.out += out or b""
        text = bytes(self.out).decode(errors="replace")
        self.log_path.write_text(text + f"\n# exit {self.proc.returncode} after {time.monotonic() - t0:.2f} s\n")
        return text
