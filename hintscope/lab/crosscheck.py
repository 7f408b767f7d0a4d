"""An independent count of the source VMM's dirty-log ioctls, taken with bpftrace.

The host probe (BCC) records every ioctl as a row; this counts the same syscalls with a separate
tool and a separate program (``syscalls:sys_exit_ioctl``, keyed by the command the thread entered
with), so a test can compare the two. It is a check of the probe, not part of a normal capture.
"""

from __future__ import annotations

import re
from pathlib import Path

from hintscope.errors import HintscopeError
from hintscope.lab.bpftrace import Bpftrace
from hintscope.probes import kvm_abi

CMDS = {
    "GET_DIRTY_LOG": kvm_abi.GET_DIRTY_LOG,
    "CLEAR_DIRTY_LOG": kvm_abi.CLEAR_DIRTY_LOG_IOCTL,
    "SET_USER_MEMORY_REGION": kvm_abi.SET_USER_MEMORY_REGION,
    "RESET_DIRTY_RINGS": kvm_abi.RESET_DIRTY_RINGS,
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
        self.bt = Bpftrace(PROGRAM, [pid], log_path)

    async def start(self, timeout: float = 60.0) -> None:
        await self.bt.start(timeout)

    async def stop(self) -> dict[str, int]:
        """SIGINT, then the counts bpftrace prints on exit; a HintscopeError when it printed none."""
        if self.bt.proc is None:
            return {}
        text = await self.bt.stop()
        if "@n[" not in text and self.bt.proc.returncode != 0:
            raise HintscopeError(f"bpftrace exited {self.bt.proc.returncode} without counts (log {self.log_path})")
        names = {v: k for k, v in CMDS.items()}
        counts = {k: 0 for k in CMDS}
        for cmd, n in LINE_RE.findall(text):
            c = int(cmd) & 0xFFFFFFFF
            if c in names:
                counts[names[c]] += int(n)
        return counts
