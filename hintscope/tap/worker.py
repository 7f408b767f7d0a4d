"""The tap's decoder process: reads framed stream copies from the pump and writes ``page_sends``.

It runs apart from the pump so that neither its CPU time nor a crash in it can slow or stop the
forwarding. Started by :mod:`hintscope.tap.cli` as ``python -m hintscope.tap.worker``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import time
from typing import Any, BinaryIO

from hintscope.bundle import BundleWriter
from hintscope.errors import HintscopeError
from hintscope.tap.proxy import CTL_HDR, DATA_HDR, MAX_CTL
from hintscope.tap.stream import StreamDecoder, RunSink

PRODUCER = "tap"
READY = b"READY\n"
FLUSH_S = 1.0
MAX_PROBLEMS = 100


def _read(f: BinaryIO, n: int) -> bytes | None:
    b = f.read(n)
    return b if b is not None and len(b) == n else None


class Capture:
    """Decoder state plus what the pump told us; decides the source status at the end."""

    def __init__(self, writer: BundleWriter):
        self.writer = writer
        self.sink = RunSink(on_rows=self._rows, flush_every=20_000)
        self.dec = StreamDecoder(self.sink)
        self.problems: list[str] = []
        self.end: dict[str, Any] | None = None
        self.cut: str | None = None
        self.crashed = False
        self.write_error: str | None = None
        self._last_flush = time.monotonic()

    def _rows(self, cols: dict[str, list]) -> None:
        self.writer.append("page_sends", cols)

    def problem(self, what: str) -> None:
        if len(self.problems) < MAX_PROBLEMS and what not in self.problems:
            self.problems.append(what)

    def data(self, ts: int, data: bytes) -> None:
        if self.crashed or self.cut:
            return
        try:
            self.dec.feed(data, ts)
        except Exception as e:  # noqa: BLE001 - a decoder bug must cost the decode, never the capture
            self.crashed = True
            self.problem(f"tap decoder error at stream offset about {self.dec.bytes_seen}: "
                         f"{type(e).__name__}: {e}")
            self.dec.stopped = self.dec.stopped or "decoder error"

    def control(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        ev = obj.get("event")
        if ev == "cut":
            self.cut = str(obj.get("reason"))
            self.problem(f"tap: {self.cut}")
        elif ev == "other-connection":
            self.problem(f"tap: {obj.get('problem')}")
        elif ev == "end":
            self.end = obj

    def maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush >= FLUSH_S:
            self._last_flush = time.monotonic()
            self.sink.flush_rows()
            self.flush()

    def flush(self) -> None:
        try:
            self.writer.flush()
        except HintscopeError as e:
            self.write_error = str(e)

    def finish(self) -> str:
        try:
            self.dec.finish(eof=self.cut is None and not self.crashed)
        except Exception as e:  # noqa: BLE001 - the stream is hostile input: a decoder bug is a problem line
            self.problem(f"tap decoder error at the end: {type(e).__name__}: {e}")
        for p in self.dec.problems:
            self.problem(f"tap: {p}")
        if self.end is None:
            self.problem("tap: the proxy ended without its end record (killed?)")
        for c in (self.end or {}).get("connections", []):
            for e in c.get("errors", []):
                self.problem(f"tap: connection {c.get('conn')}: {e}")
        for e in (self.end or {}).get("forward_errors", []):
            self.problem(f"tap: {e}")
        if self.write_error:
            self.problem(f"tap: {self.write_error}")
        s = self.dec.summary()
        forwarded = sum(c.get("bytes_src_to_dst", 0) for c in (self.end or {}).get("connections", []))
        if self.dec.bytes_seen == 0 and not forwarded and not self.cut:
            status, reason = "unavailable", "no migration stream reached the tap"
        elif self.dec.ram_done and not self.problems:
            status, reason = "captured", None
        else:
            status = "partial"
            reason = self.problems[0] if self.problems else (self.dec.stopped or "incomplete")
        ru = resource.getrusage(resource.RUSAGE_SELF)
        s["cpu_s"] = round(ru.ru_utime + ru.ru_stime, 3)
        details = {"decoder": s, "problems": list(self.problems),
                   "clock": "host CLOCK_MONOTONIC when the tap read the bytes (upper bound on QEMU's read)"}
        if self.end:
            details["proxy"] = {k: v for k, v in self.end.items() if k != "event"}
        self.writer.set_source("tap", status, reason, **details)
        if self.problems:
            self.writer.meta.setdefault("problems", []).extend(self.problems)
        return status


def run(feed: BinaryIO, cap: Capture) -> None:
    while True:
        kind = feed.read(1)
        if not kind:
            return
        if kind == b"D":
            h = _read(feed, DATA_HDR.size)
            if h is None:
                return
            ts, n = DATA_HDR.unpack(h)
            data = _read(feed, n)
            if data is None:
                return
            cap.data(ts, data)
        elif kind == b"C":
            h = _read(feed, CTL_HDR.size)
            if h is None:
                return
            (n,) = CTL_HDR.unpack(h)
            if n > MAX_CTL:
                cap.problem(f"tap: control frame of {n} bytes from the proxy")
                return
            body = _read(feed, n)
            if body is None:
                return
            try:
                cap.control(json.loads(body))
            except ValueError:
                cap.problem("tap: unreadable control frame from the proxy")
        else:
            cap.problem(f"tap: unknown frame {kind!r} from the proxy")
            return
        cap.maybe_flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hintscope.tap.worker")
    ap.add_argument("--feed-fd", type=int, required=True)
    ap.add_argument("--ready-fd", type=int, required=True)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--append", action="store_true")
    ap.add_argument("--meta", default="{}", help="JSON merged into meta['sources']['tap'] (listen, forward)")
    a = ap.parse_args(argv)
    # A Ctrl-C reaches the whole process group: the proxy handles it and then closes the feed,
    # which is how this process learns that the capture ended.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        writer = BundleWriter(a.bundle, PRODUCER, append=a.append)
    except (HintscopeError, OSError) as e:
        print(f"hintscope tap: error: {e}", file=sys.stderr)
        return 2
    writer.set_source("tap", "partial", "capture running", **json.loads(a.meta))
    writer.flush()
    os.write(a.ready_fd, READY)
    os.close(a.ready_fd)
    cap = Capture(writer)
    end_reason = "stream ended"
    try:
        with os.fdopen(a.feed_fd, "rb", buffering=1 << 20) as feed:
            run(feed, cap)
    finally:
        status = cap.finish()
        cap.sink.flush_rows()
        try:
            if cap.end is None:
                end_reason = "error: the proxy ended without its end record"
            elif cap.end.get("end") != "stream ended":
                end_reason = str(cap.end.get("end"))
            writer.close(end_reason)
        except HintscopeError as e:
            print(f"hintscope tap: error: {e}", file=sys.stderr)
            return 2
    print(json.dumps({"status": status, "rows": writer.rows.get("page_sends", 0),
                      "pages": cap.dec.pages, "problems": cap.problems[:5]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
