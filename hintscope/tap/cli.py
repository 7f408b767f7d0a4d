"""``hintscope tap``: forward a QEMU migration stream unchanged and record its page sends.

Point the source's ``migrate`` at the tap's --listen address; the tap connects each incoming
connection to --forward (the destination's ``-incoming`` address) and pumps bytes both ways.
The RAM section of the main channel is decoded on a copy, in a separate process, into the
``page_sends`` table of BUNDLE. The tap exits by itself when the stream has ended both ways.
See docs/tap.md.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from hintscope.bundle import clock_anchor, write_json_atomic
from hintscope.errors import HintscopeError
from hintscope.tap import addr as taddr
from hintscope.tap.proxy import Pump

EPILOG = """examples:
  # destination: qemu-system-x86_64 ... -incoming unix:/run/dst.sock
  hintscope tap --listen unix:/run/tap.sock --forward unix:/run/dst.sock -o run1
  # source (QMP): {"execute": "migrate", "arguments": {"uri": "unix:/run/tap.sock"}}
  hintscope tap --listen tcp:0.0.0.0:4444 --forward tcp:dsthost:4444 -o run2
  hintscope tap --listen unix:/tmp/t.sock --forward unix:/tmp/d.sock -o run3 --append   # join a probe's bundle
"""

READY_TIMEOUT_S = 60.0
PIPE_SIZE = 1 << 20


def start_worker(bundle: Path, append: bool, meta: dict[str, Any]) -> tuple[subprocess.Popen, int]:
    """The decoder process, ready (bundle opened); returns it and the write end of its feed pipe."""
    feed_r, feed_w = os.pipe()
    ready_r, ready_w = os.pipe()
    try:
        import fcntl
        fcntl.fcntl(feed_w, 1031, PIPE_SIZE)  # F_SETPIPE_SZ: fewer wakeups of the feeder
    except OSError:
        pass
    argv = [sys.executable, "-m", "hintscope.tap.worker", "--feed-fd", str(feed_r), "--ready-fd", str(ready_w),
            "--bundle", str(bundle), "--meta", json.dumps(meta)] + (["--append"] if append else [])
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.Popen(argv, pass_fds=(feed_r, ready_w), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    os.close(feed_r)
    os.close(ready_w)
    try:
        r, _, _ = select.select([ready_r], [], [], READY_TIMEOUT_S)
        ok = bool(r) and os.read(ready_r, 16).startswith(b"READY")
    finally:
        os.close(ready_r)
    if not ok:
        os.close(feed_w)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        lines = (err or b"").decode(errors="replace").strip().splitlines()
        msg = lines[-1].removeprefix("hintscope tap: error: ") if lines else f"exit {proc.returncode}"
        raise HintscopeError(f"tap decoder did not start: {msg}")
    return proc, feed_w


def _close_for_dead_worker(bundle: Path, append: bool, rc: int, stats: dict[str, Any]) -> None:
    """The decoder process died without closing its share of the bundle: close it for it, so the
    bundle says why instead of "capture did not finish"."""
    path = bundle / ("meta-tap.json" if append else "meta.json")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(meta, dict) or meta.get("status") != "running":
        return
    why = f"the tap's decoder process died (exit {rc}); the stream was forwarded, decoding stopped"
    src = meta.setdefault("sources", {}).setdefault("tap", {})
    src.update({"status": "partial", "reason": why, "proxy": stats})
    src.setdefault("problems", []).append(why)
    meta.setdefault("problems", []).append(why)
    meta["status"] = "complete"
    meta["end_reason"] = f"error: {why}"
    meta.setdefault("clock_anchors", []).append(clock_anchor("end"))
    write_json_atomic(path, meta)


def run_tap(listen: str, forward: str, bundle: Path, append: bool = False, max_backlog_mb: int = 256,
            on_listen=None, stop: threading.Event | None = None) -> dict[str, Any]:
    la = taddr.parse(listen, "--listen")
    fa = taddr.parse(forward, "--forward")
    proc, feed_w = start_worker(bundle, append, {"listen": listen, "forward": forward})
    stop = stop or threading.Event()
    pump = Pump(la, fa, feed_w, max_backlog=max_backlog_mb << 20)
    try:
        stats = pump.serve(stop, on_listen=on_listen)
    finally:
        os.close(feed_w)
        try:
            out, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    result: dict[str, Any] = {"proxy": stats, "worker_exit": proc.returncode}
    if proc.returncode != 0:
        result["worker_error"] = (err or b"").decode(errors="replace").strip()[-500:] or f"exit {proc.returncode}"
        _close_for_dead_worker(bundle, append, proc.returncode, stats)
    try:
        result.update(json.loads(out.decode().strip().splitlines()[-1]))
    except (ValueError, IndexError):
        result["status"] = "partial" if proc.returncode else "unknown"
    return result


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("tap", help="forward a QEMU migration stream and record its page sends (page_sends)",
                              description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", required=True, metavar="ADDR", help="where the source connects: unix:PATH or tcp:HOST:PORT")
    p.add_argument("--forward", required=True, metavar="ADDR", help="the destination's -incoming address")
    p.add_argument("-o", "--output", required=True, metavar="BUNDLE", help="bundle directory to create (or join, --append)")
    p.add_argument("--append", action="store_true", help="join an existing bundle (e.g. the host probe's) as producer 'tap'")
    p.add_argument("--max-backlog", type=int, default=256, metavar="MIB",
                   help="stream bytes the decoder may lag behind before it is cut off (forwarding never waits)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()

    def on_signal(signum, frame):  # noqa: ARG001
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def listening():
        print(f"tap: listening on {args.listen}, forwarding to {args.forward}", flush=True)

    r = run_tap(args.listen, args.forward, Path(args.output), append=args.append,
                max_backlog_mb=args.max_backlog, on_listen=listening, stop=stop)
    conns = r["proxy"]["connections"]
    fwd = sum(c["bytes_src_to_dst"] for c in conns)
    pages = r.get("pages") or {}
    print(f"tap: {len(conns)} connection(s), {fwd} bytes forwarded source->destination; page_sends "
          f"{r.get('rows', 0)} rows ({sum(pages.values())} pages: "
          f"{', '.join(f'{k} {v}' for k, v in sorted(pages.items())) or 'none'}); status {r.get('status')}")
    for p in r.get("problems") or []:
        print(f"tap: problem: {p}")
    if r.get("worker_error"):
        print(f"tap: decoder process failed: {r['worker_error']}", file=sys.stderr)
    print(f"bundle: {args.output}")
    return 0
