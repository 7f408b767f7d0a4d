"""An independent count of the source VMM's dirty-log ioctls, taken with bpftrace.

The host probe (BCC) records every ioctl as a row; this counts the same syscalls with a separate
tool and a separate program (``syscalls:sys_exit_ioctl``, keyed by the command the thread entered
with), so a test can compare the two. It is a check of the probe, not part of a normal capture.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import time
from pathlib import Path

from hintscope.errors import HintscopeError

CMDS = {
    "GET_DIRTY_LOG": 0x4010AE42,
    "CLEAR_DIRTY_LOG": 0xC018AEC0,
    "SET_USER_MEMORY_REGION": 0x4020AE46,
    "RESET_DIRTY_RINGS": 0xAEC7,
}

# BEGIN fires once every other probe is attached: its READY line is the go signal.
PROGRAM = """
BEGIN { printf("READY\\n"); }
tracepoint:syscalls:sys_enter_ioctl /pid == $1/ { @cmd[tid] = args->cmd; }
tracepoint:syscalls:sys_exit_ioctl /pid == $1 && @cmd[tid]/ {
  $c = @cmd[tid] & 0xffffffff;  // cmd may come back sign-extended
  if ($c == %(GET_DIRTY_LOG)d || $c == %(CLEAR_DIRTY_LOG)d || $c == %(SET_USER_MEMORY_REGION)d ||
      $c == %(RESET_DIRTY_RINGS)d) { @n[$c] = count(); }
  delete(@cmd[tid]);
}
END { clear(@cmd); }
""" % CMDS

# Map keys print signed (an int64 map value as key), so 0xC018AEC0 may show as negative.
LINE_RE = re.compile(r"^@n\[(-?\d+)\]:\s+(\d+)\s*$", re.M)


class IoctlCounter:
    """``bpftrace`` counting the dirty-log ioctls of one PID until :meth:`stop`."""

    def __init__(self, pid: int, log_path: Path):
        self.pid, self.log_path = pid, log_path
        self.proc: asyncio.subprocess.Process | None = None
        self._out = bytearray()

    async def start(self, timeout: float = 60.0) -> None:
        bt = shutil.which("bpftrace")
        if not bt:
            raise HintscopeError("crosscheck needs bpftrace (apt-get install bpftrace)")
        self.proc = await asyncio.create_subprocess_exec(bt, "-e", PROGRAM, str(self.pid),
                                                         stdout=asyncio.subprocess.PIPE,
                                                         stderr=asyncio.subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), max(0.1, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                await self.stop()
                raise HintscopeError(f"bpftrace did not attach within {timeout:.0f} s") from None
            if not line:
                raise HintscopeError(f"bpftrace exited before attaching: {bytes(self._out)[-300:].decode(errors='replace')}")
            self._out += line
            if line.strip() == b"READY":
                return

    async def stop(self) -> dict[str, int]:
        """SIGINT, then the counts bpftrace prints on exit; a HintscopeError when it printed none."""
        if self.proc is None:
            return {}
        t0 = time.monotonic()
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = await asyncio.wait_for(self.proc.communicate(), 30)
        except asyncio.TimeoutError:
            self.proc.kill()
            out, _ = await self.proc.communicate()
        self._out += out or b""
        text = bytes(self._out).decode(errors="replace")
        self.log_path.write_text(text + f"\n# exit {self.proc.returncode} after {time.monotonic() - t0:.2f} s\n")
        if "@n[" not in text and self.proc.returncode != 0:
            raise HintscopeError(f"bpftrace exited {self.proc.returncode} without counts (log {self.log_path})")
        names = {v: k for k, v in CMDS.items()}
        counts = {k: 0 for k in CMDS}
        for cmd, n in LINE_RE.findall(text):
            c = int(cmd) & 0xFFFFFFFF
            if c in names:
                counts[names[c]] += int(n)
        return counts
