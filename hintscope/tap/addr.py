"""Tap endpoints: ``unix:/path`` or ``tcp:HOST:PORT`` (QEMU's own migration URI spelling)."""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass

from hintscope.errors import HintscopeError


@dataclass(frozen=True)
class Addr:
    family: int
    target: str | tuple[str, int]
    text: str

    def listen(self) -> socket.socket:
        s = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            if self.family == socket.AF_UNIX:
                path = str(self.target)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    pass
                else:
                    if not stat.S_ISSOCK(st.st_mode):
                        raise HintscopeError(f"--listen {self.text}: {path} exists and is not a socket")
                    os.unlink(path)  # a stale socket of an earlier run
            else:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(self.target)
            s.listen(16)
        except OSError as e:
            s.close()
            raise HintscopeError(f"--listen {self.text}: {e.strerror or e}") from None
        except HintscopeError:
            s.close()
            raise
        return s

    def connect(self, timeout: float = 10.0) -> socket.socket:
        s = socket.socket(self.family, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(self.target)
        except OSError as e:
            s.close()
            raise HintscopeError(f"--forward {self.text}: {e.strerror or e}") from None
        s.settimeout(None)
        if self.family != socket.AF_UNIX:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s


def parse(text: str, what: str = "address") -> Addr:
    kind, _, rest = text.partition(":")
    if kind == "unix" and rest:
        return Addr(socket.AF_UNIX, rest, text)
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if host and port.isdigit() and 0 < int(port) < 65536:
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            return Addr(fam, (host, int(port)), text)
    raise HintscopeError(f"{what} {text!r}: expected unix:/path or tcp:HOST:PORT")
