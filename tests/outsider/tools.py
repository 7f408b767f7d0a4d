"""hintscope's command-line tools, run the way a user runs them: probe host, tap, analyze."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = [sys.executable, "-m", "hintscope"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def tap_available() -> str | None:
    """None when `hintscope tap` exists in this tree, else why the tap cannot be used."""
    r = subprocess.run([*PY, "tap", "--help"], capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=60)
    if r.returncode != 0 or "--listen" not in r.stdout:
        return "no `hintscope tap` command in this tree yet (hintscope/tap/ not landed)"
    return None


class Probe:
    """`python -m hintscope probe host --pid PID -o BUNDLE` with its default options."""

    def __init__(self, pid: int, bundle: Path, log: Path):
        self.bundle, self.log = bundle, log
        self.argv = [*PY, "probe", "host", "--pid", str(pid), "-o", str(bundle)]
        self._err = open(log, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self._err, cwd=ROOT, env=_env())
        self.attached = False

    def wait_attached(self, timeout: float = 120) -> None:
        """The probe prints ATTACHED on stdout once every probe is attached (docs/probes.md)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        buf = b""
        while b"ATTACHED" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"probe did not print ATTACHED within {timeout:.0f} s: {self.tail()}")
            r, _, _ = select.select([self.proc.stdout], [], [], min(left, 0.5))
            if r:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    raise RuntimeError(f"probe exited {self.proc.wait()} before attaching: {self.tail()}")
                buf += chunk
        self.attached = True

    def stop(self, timeout: float = 60) -> int:
        """SIGINT, as a user's Ctrl-C; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(10)
        self._err.close()
        return rc

    def tail(self) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-3:])
        except OSError:
            return ""


class Tap:
    """`python -m hintscope tap --listen unix:A --forward unix:B -o BUNDLE` between the two QEMUs."""

    def __init__(self, listen: Path, forward: Path, bundle: Path, log: Path):
        self.listen, self.bundle, self.log = listen, bundle, log
        self.argv = [*PY, "tap", "--listen", f"unix:{listen}", "--forward", f"unix:{forward}", "-o", str(bundle)]
        self._err = open(log, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=self._err, stderr=subprocess.STDOUT, cwd=ROOT, env=_env())

    def wait_listening(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.listen.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"tap exited {self.proc.returncode} before listening: {self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tap made no socket {self.listen} in {timeout:.0f} s: {self.tail()}")
            time.sleep(0.05)

    def wait(self, timeout: float = 60) -> int:
        """The tap stops by itself when the stream ends; SIGINT only if it does not."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGINT)
            try:
                rc = self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait(10)
            rc = -1000 + rc  # marks "had to be stopped"
        self._err.close()
        return rc

    def tail(self) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-3:])
        except OSError:
            return ""


def analyze(bundle: Path, fail_on: str | None = "hazard") -> tuple[int, dict | None, str | None]:
    """`python -m hintscope analyze BUNDLE --json [--fail-on F]`: (exit status, the JSON, None), or
    (exit status, None, what went wrong) when it printed no JSON."""
    argv = [*PY, "analyze", str(bundle), "--json"] + (["--fail-on", fail_on] if fail_on else [])
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    try:
        return r.returncode, json.loads(r.stdout), None
    except json.JSONDecodeError:
        last = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-1:] or ["(no stderr)"]
        return r.returncode, None, f"analyze exit {r.returncode}, no JSON on stdout; stderr ends: {last[0][:300]}"


def verdict_and_findings(doc: dict) -> tuple[str, list[dict]]:
    """Reads the contract's top-level keys, or the older nesting under findings (CONTRACT.md)."""
    if isinstance(doc.get("verdict"), str):
        f = doc.get("findings")
        return doc["verdict"], f if isinstance(f, list) else []
    f = doc.get("findings") or {}
    inner = f.get("findings") if isinstance(f, dict) else None
    if isinstance(inner, dict):
        return str(inner.get("verdict", f.get("verdict"))), list(inner.get("findings") or [])
    return str(f.get("verdict")), list(inner or [])
