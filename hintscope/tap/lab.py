"""The tap as the lab runs it: a ``hintscope tap`` process between source and destination that joins
the run bundle (producer ``tap``, table ``page_sends``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from hintscope.errors import HintscopeError

ROOT = str(Path(__file__).resolve().parents[2])


class LabTap:
    """Start before ``migrate`` (use :attr:`uri` as the migration URI), stop after the migration."""

    def __init__(self, bundle: Path, forward: str, workdir: Path):
        self.bundle = bundle
        self.forward = forward
        self.uri = f"unix:{workdir / 'tap.sock'}"
        self.log_path = workdir / "tap.log"
        self.argv = [sys.executable, "-m", "hintscope", "tap", "--listen", self.uri, "--forward", forward,
                     "-o", str(bundle), "--append"]
        self.proc: asyncio.subprocess.Process | None = None
        self._log = None

    async def start(self, timeout: float = 60.0) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._log = open(self.log_path, "ab")
        self.proc = await asyncio.create_subprocess_exec(*self.argv, stdout=asyncio.subprocess.PIPE,
                                                         stderr=self._log, env=env)
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except asyncio.TimeoutError:
            line = b""
        self._log.write(line)
        self._log.flush()
        if not line.startswith(b"tap: listening"):
            await self.stop(timeout=5)
            raise HintscopeError(f"migration-stream tap did not start: {self._tail()} (log {self.log_path})")

    def _tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1][:300] if lines else "no output"

    async def stop(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait for the tap to end by itself (the stream ended both ways); SIGTERM it after ``timeout``."""
        if self.proc is None:
            return {"used": False}
        t0 = time.monotonic()
        out = b""
        try:
            out, _ = await asyncio.wait_for(self.proc.communicate(), timeout)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                out, _ = await asyncio.wait_for(self.proc.communicate(), 30)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                out, _ = await self.proc.communicate()
        if self._log:
            self._log.write(out or b"")
            self._log.close()
            self._log = None
        lines = (out or b"").decode(errors="replace").strip().splitlines()
        return {"used": True, "argv": self.argv, "exit": self.proc.returncode,
                "wait_s": round(time.monotonic() - t0, 3), "output": lines[-6:]}


@contextlib.asynccontextmanager
async def migration_tap(enabled: bool, bundle: Path, forward: str, workdir: Path, summary: dict[str, Any]):
    """Yields the URI the source should migrate to: the tap's (which forwards to ``forward``) when
    ``enabled``, else ``forward`` itself. The tap's outcome goes to ``summary['tap']``."""
    if not enabled:
        summary["tap"] = {"used": False, "reason": "--tap off"}
        yield forward
        return
    tap = LabTap(bundle, forward, workdir)
    await tap.start()
    try:
        yield tap.uri
    finally:
        summary["tap"] = await tap.stop()
