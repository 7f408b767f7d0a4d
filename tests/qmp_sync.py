"""A blocking QMP client for tests that drive QEMU by hand, on qemu.qmp's legacy (sync) API."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol


class QMP:
    def __init__(self, path: Path, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"QEMU never created {path}")
            time.sleep(0.05)
        self.m = QEMUMonitorProtocol(str(path))
        self.m.connect()
        self.m.settimeout(timeout)

    def cmd(self, name: str, **args):
        """The command's return value; a QMP error raises."""
        return self.m.cmd(name, **args)

    def close(self) -> None:
        # QEMU may already be gone (quit, killed by a fault test): the disconnect then re-raises
        # the reader's EOF, which says nothing about the test.
        with contextlib.suppress(Exception):
            self.m.close()

    def __del__(self) -> None:
        self.close()
