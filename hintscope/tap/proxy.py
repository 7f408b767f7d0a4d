"""The byte pump: forwards every accepted connection to the destination unchanged, both ways.

Forwarding never waits on the decoder. The source-to-destination bytes of the main channel
(the connection that starts with the 'QEVM' magic) are also put on a bounded queue; a feeder
thread writes them, framed with the time the tap read them, into a pipe to the decoder process
(:mod:`hintscope.tap.worker`). When that queue holds more than ``max_backlog`` bytes, or the
decoder is gone, the copy is cut and the decoder told why; forwarding goes on.

Frames on the pipe: ``b"D" + >QI(ts_ns, n) + n bytes`` (stream data) and
``b"C" + >I(n) + n bytes of JSON`` (control: other connections, a cut, the end with totals).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import queue
import resource
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from hintscope.tap import format as F
from hintscope.tap.addr import Addr

CHUNK = 1 << 20
DATA_HDR = struct.Struct(">QI")
CTL_HDR = struct.Struct(">I")
MAX_CTL = 1 << 20


def _write_all(fd: int, parts: list[bytes | memoryview]) -> None:
    views = [memoryview(p) for p in parts]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


class _Eof(Exception):
    pass


_libc = ctypes.CDLL(None, use_errno=True)
_libc.tee.restype = ctypes.c_ssize_t
_libc.tee.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint]
SPLICE_F_NONBLOCK = 2
F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # the default 64 KiB works, with more wakeups
    return r, w


def _tee(fd_in: int, fd_out: int, n: int) -> int:
    """Bytes duplicated (0 when the target pipe is full)."""
    r = _libc.tee(fd_in, fd_out, n, SPLICE_F_NONBLOCK)
    if r < 0:
        e = ctypes.get_errno()
        if e == errno.EAGAIN:
            return 0
        raise OSError(e, os.strerror(e))
    return r


def _read_exact(fd: int, n: int) -> bytes:
    parts = []
    while n:
        b = os.read(fd, n)
        if not b:
            raise OSError(errno.EIO, "pipe ended early")
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


def _splice_works() -> bool:
    if not hasattr(os, "splice"):
        return False
    r, w = os.pipe()
    r2, w2 = os.pipe()
    try:
        os.write(w, b"x")
        return _tee(r, w2, 1) == 1 and os.splice(r, w2, 1) == 1
    except OSError:
        return False
    finally:
        for fd in (r, w, r2, w2):
            os.close(fd)


@dataclass
class Conn:
    idx: int
    src: socket.socket
    dst: socket.socket
    role: str = "unknown"          # main | other | unknown (no bytes yet)
    s2d: int = 0
    d2s: int = 0
    errors: list[str] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    left: int = 2                  # directions still pumping

    def summary(self) -> dict[str, Any]:
        return {"conn": self.idx, "role": self.role, "bytes_src_to_dst": self.s2d, "bytes_dst_to_src": self.d2s,
                "errors": self.errors}


class Pump:
    def __init__(self, listen: Addr, forward: Addr, feed_fd: int | None, max_backlog: int = 256 << 20,
                 splice: bool = True):
        self.listen_addr = listen
        self.forward_addr = forward
        self.feed_fd = feed_fd
        self.max_backlog = max_backlog
        self.conns: list[Conn] = []
        self.lock = threading.Lock()
        self.main: Conn | None = None
        self.backlog = 0
        self.max_seen_backlog = 0
        self.cut: str | None = None
        self.decoder_gone: str | None = None
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.fed = 0
        self.copied = 0   # splice mode: stream bytes that went through user memory (tee pipe full)
        self.errors: list[str] = []
        self._feeder = threading.Thread(target=self._feed_loop, name="tap-feeder", daemon=True)
        self._tee_r: int | None = None
        self._tee_w: int | None = None
        if splice and feed_fd is not None and _splice_works():
            self._tee_r, self._tee_w = _pipe()
        self.mode = "splice" if self._tee_w is not None else "copy"

    # -- decoder feed ---------------------------------------------------------------------------
    def _control(self, obj: dict[str, Any]) -> None:
        self.q.put(("C", obj))

    def _feed(self, ts: int, data: bytes) -> None:
        if self.cut or self.decoder_gone:
            return
        with self.lock:
            if self.backlog + len(data) > self.max_backlog:
                self.cut = (f"decoder fell behind: {self.backlog} bytes queued at stream offset {self.fed} "
                            f"(limit {self.max_backlog}); the rest of the stream was forwarded but not decoded")
                self._control({"event": "cut", "reason": self.cut, "stream_pos": self.fed})
                return
            self.backlog += len(data)
            self.max_seen_backlog = max(self.max_seen_backlog, self.backlog)
        self.fed += len(data)
        self.q.put(("D", ts, data))

    def _feed_pipe(self, ts: int, n: int) -> bool:
        """``n`` bytes were tee'd into the tee pipe; False (and the copy cut) if over the backlog."""
        with self.lock:
            if self.cut or self.decoder_gone:
                return False
            if self.backlog + n > self.max_backlog:
                self.cut = (f"decoder fell behind: {self.backlog} bytes queued at stream offset {self.fed} "
                            f"(limit {self.max_backlog}); the rest of the stream was forwarded but not decoded")
                self._control({"event": "cut", "reason": self.cut, "stream_pos": self.fed})
                return False
            self.backlog += n
            self.max_seen_backlog = max(self.max_seen_backlog, self.backlog)
        self.fed += n
        self.q.put(("P", ts, n))
        return True

    def _feed_loop(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                if self._tee_r is not None:
                    os.close(self._tee_r)
                return
            if item[0] == "P":
                n = item[2]
                with self.lock:
                    self.backlog -= n
                if self.cut or self.decoder_gone or self.feed_fd is None:
                    continue
                try:
                    _write_all(self.feed_fd, [b"D" + DATA_HDR.pack(item[1], n)])
                    while n:  # pipe to pipe: the kernel moves the pages, no copy here
                        n -= os.splice(self._tee_r, self.feed_fd, n)
                except OSError as e:
                    self.decoder_gone = f"decoder process gone ({e.strerror or e})"
                continue
            if item[0] == "D":
                data = item[2]
                with self.lock:
                    self.backlog -= len(data)
                if self.cut or self.decoder_gone or self.feed_fd is None:
                    continue
                parts = [b"D" + DATA_HDR.pack(item[1], len(data)), data]
            else:
                if self.decoder_gone or self.feed_fd is None:
                    continue
                body = json.dumps(item[1]).encode()[:MAX_CTL]
                parts = [b"C" + CTL_HDR.pack(len(body)), body]
            try:
                _write_all(self.feed_fd, parts)
            except OSError as e:
                self.decoder_gone = f"decoder process gone ({e.strerror or e})"

    # -- forwarding -----------------------------------------------------------------------------
    def _splice_main(self, c: Conn, a: socket.socket, b: socket.socket) -> None:
        """Source to destination through a pipe with splice(2): the bytes never enter this process.
        tee(2) duplicates each chunk into the tee pipe, which the feeder splices on to the decoder.
        When the tee pipe is full, that chunk goes through user memory instead (read, send, queue),
        so forwarding never waits on the decoder."""
        p1r, p1w = _pipe()
        src, dst = a.fileno(), b.fileno()
        try:
            while True:
                n = os.splice(src, p1w, CHUNK)
                ts = time.monotonic_ns()
                if not n:
                    return
                m = n  # bytes that need no copy through this process
                if not (self.cut or self.decoder_gone):
                    m = _tee(p1r, self._tee_w, n)
                    if m and not self._feed_pipe(ts, m):
                        m = n  # cut just now: nothing more to copy
                if m < n:
                    data = _read_exact(p1r, n)
                    b.sendall(data)
                    self._feed(ts, data[m:])
                    self.copied += n - m
                else:
                    left = n
                    while left:
                        left -= os.splice(p1r, dst, left)
                c.s2d += n
        finally:
            os.close(p1r)
            os.close(p1w)

    def _pump(self, c: Conn, a: socket.socket, b: socket.socket, forward: bool) -> None:
        pending: list[tuple[int, bytes]] = []   # held only while the connection's role is unknown
        head = b""
        err = None
        try:
            if forward and self._tee_w is not None:
                head = a.recv(4, socket.MSG_PEEK | socket.MSG_WAITALL)
                if head:
                    self._classify(c, head, [])
                if c.role == "main":
                    self._splice_main(c, a, b)
                    raise _Eof
            while True:
                data = a.recv(CHUNK)
                ts = time.monotonic_ns()
                if not data:
                    break
                b.sendall(data)
                if not forward:
                    c.d2s += len(data)
                    continue
                c.s2d += len(data)
                if c.role == "main":
                    self._feed(ts, data)
                elif c.role == "unknown":
                    pending.append((ts, data))
                    head = (head + data)[:4]
                    if len(head) == 4:
                        self._classify(c, head, pending)
                        pending = []
        except _Eof:
            pass
        except OSError as e:
            err = f"{'source->destination' if forward else 'destination->source'}: {e.strerror or e}"
        if forward and c.role == "unknown" and head:
            self._classify(c, head, pending)
        if err:
            c.errors.append(err)
            for s in (a, b):  # the other direction must not wait forever
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        else:
            try:
                b.shutdown(socket.SHUT_WR)  # pass the EOF on, keep the other direction open
            except OSError:
                pass
        with self.lock:
            c.left -= 1
            last = c.left == 0
        if last:
            a.close()
            b.close()
            c.done.set()

    def _classify(self, c: Conn, head: bytes, pending: list[tuple[int, bytes]]) -> None:
        word = int.from_bytes(head.ljust(4, b"\0"), "big")
        with self.lock:
            main = word == F.FILE_MAGIC and self.main is None
            if main:
                self.main = c
        if main:
            c.role = "main"
            for ts, data in pending:
                self._feed(ts, data)
            return
        c.role = "other"
        what = ("a multifd channel: its pages are not decoded" if word == F.MULTIFD_MAGIC
                else "a second migration stream" if word == F.FILE_MAGIC
                else "not a migration main channel (postcopy preempt channel?)")
        self._control({"event": "other-connection", "conn": c.idx, "first_word": f"0x{word:08x}",
                       "problem": f"connection {c.idx} starts with 0x{word:08x}, {what}"})

    def serve(self, stop: threading.Event, on_listen=None) -> dict[str, Any]:
        """Accept and forward until the main channel has ended both ways (or ``stop`` is set)."""
        self._feeder.start()
        lsock = self.listen_addr.listen()
        lsock.settimeout(0.1)
        if on_listen is not None:
            on_listen()
        end = "stream ended"
        try:
            while not stop.is_set():
                if self.main is not None and self.main.done.is_set() and all(c.done.is_set() for c in self.conns):
                    break
                try:
                    src, _ = lsock.accept()
                except socket.timeout:
                    continue
                src.settimeout(None)
                try:
                    dst = self.forward_addr.connect()
                except Exception as e:  # noqa: BLE001 - a failed forward must close the source, not the tap
                    self.errors.append(str(e))
                    src.close()
                    continue
                c = Conn(len(self.conns), src, dst)
                self.conns.append(c)
                for a, b, fwd in ((src, dst, True), (dst, src, False)):
                    threading.Thread(target=self._pump, args=(c, a, b, fwd), daemon=True,
                                     name=f"tap-{c.idx}-{'s2d' if fwd else 'd2s'}").start()
            else:
                end = "stopped by signal"
                for c in self.conns:
                    for s in (c.src, c.dst):
                        try:
                            s.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                for c in self.conns:
                    c.done.wait(5)
        finally:
            lsock.close()
            if self.listen_addr.family == socket.AF_UNIX:
                try:
                    os.unlink(str(self.listen_addr.target))
                except OSError:
                    pass
        stats = {"end": end, "listen": self.listen_addr.text, "forward": self.forward_addr.text,
                 "mode": self.mode, "connections": [c.summary() for c in self.conns], "forward_errors": self.errors,
                 "fed_bytes": self.fed, "copied_bytes": self.copied, "max_backlog_bytes": self.max_seen_backlog, "backlog_limit": self.max_backlog,
                 "cut": self.cut, "decoder_gone": self.decoder_gone,
                 "cpu_s": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 3)}
        self._control({"event": "end", **stats})
        self.q.put(None)
        self._feeder.join(timeout=600)
        if self._tee_w is not None:
            os.close(self._tee_w)
        return stats
