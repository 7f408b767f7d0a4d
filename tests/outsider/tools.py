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


def _read_until(proc: subprocess.Popen, token: bytes, timeout: float, what: str, tail) -> bytes:
    """Reads ``proc``'s stdout until ``token`` shows up; returns what was read."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    while token not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"{what} did not print {token.decode()!r} within {timeout:.0f} s: {tail()}")
        r, _, _ = select.select([proc.stdout], [], [], min(left, 0.5))
        if r:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"{what} exited {proc.wait()} before printing {token.decode()!r}: {tail()}")
            buf += chunk
    return buf


class Probe:
    """`python -m hintscope probe host --pid PID -o BUNDLE` with its default options."""

    def __init__(self, pid: int, bundle: Path, log: Path):
        self.bundle, self.log = bundle, log
        self.argv = [*PY, "probe", "host", "--pid", str(pid), "-o", str(bundle)]
        self._err = open(log, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self._err, cwd=ROOT, env=_env())
        self.attached = False
        self.interrupted = False

    def wait_attached(self, timeout: float = 120) -> None:
        """The probe prints ATTACHED on stdout once every probe is attached (docs/probes.md)."""
        _read_until(self.proc, b"ATTACHED", timeout, "probe", self.tail)
        self.attached = True

    def wait_bundle(self, timeout: float = 60) -> None:
        """Until the probe has created its bundle (meta.json), which another tool may then join."""
        deadline = time.monotonic() + timeout
        while not (self.bundle / "meta.json").exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"probe exited {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"probe made no bundle in {timeout:.0f} s: {self.tail()}")
            time.sleep(0.05)

    def interrupt(self) -> None:
        """SIGINT, as a user's Ctrl-C, without waiting for the exit."""
        if self.proc.poll() is None and not self.interrupted:
            self.proc.send_signal(signal.SIGINT)
            self.interrupted = True

    def stop(self, timeout: float = 60) -> int:
        """SIGINT (once) and wait; returns the exit status."""
        self.interrupt()
        if self.proc.returncode is not None and self._err.closed:
            return self.proc.returncode
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
    """`python -m hintscope tap --listen unix:A --forward unix:B -o BUNDLE --append` between the two
    QEMUs, joining the probe's bundle so that `analyze` sees the page sends beside the probe's data."""

    def __init__(self, listen: Path, forward: Path, bundle: Path, log: Path):
        self.listen, self.bundle, self.log = listen, bundle, log
        self.argv = [*PY, "tap", "--listen", f"unix:{listen}", "--forward", f"unix:{forward}", "-o", str(bundle),
                     "--append"]
        self._err = open(log, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self._err, cwd=ROOT, env=_env())
        self.out = b""

    def wait_listening(self, timeout: float = 60) -> None:
        """The tap prints `tap: listening on ADDR ...` on stdout once it accepts connections."""
        self.out += _read_until(self.proc, b"listening on", timeout, "tap", self.tail)

    def wait(self, timeout: float = 60) -> int:
        """The tap stops by itself when the stream has ended both ways; SIGINT only if it does not
        (the status then is 1000 below the tap's own)."""
        assert self.proc.stdout is not None
        try:
            self.out += self.proc.communicate(timeout=timeout)[0] or b""
            rc = self.proc.returncode
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.out += self.proc.communicate(timeout=20)[0] or b""
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            rc = self.proc.returncode - 1000
        self._err.close()
        with open(self.log, "ab") as f:
            f.write(self.out)
        return rc

    def tail(self) -> str:
        lines = self.out.decode(errors="replace").strip().splitlines()
        try:
            lines += self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            pass
        return " | ".join(lines[-3:])


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
