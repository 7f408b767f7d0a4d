"""Reader for QEMU's ``-trace`` log (log backend), e.g. ``-trace events=EV,file=OUT -msg timestamp=on``.

Line formats seen from QEMU 7.2 (checked against real output, see tests/data/qemu-trace-7.2-kvm.log;
QEMU 10.0 adds ``AddrSpace#N`` and ``guest_memfd=.. guest_memfd_offset=..`` to kvm_set_user_memory)::

    13172@1795641809.777262:migration_bitmap_sync_start
    13172@1795641809.777285:migration_bitmap_sync_end dirty_pages 0
    13153@1795641808.620677:kvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0x4000000 ua=0x7f05f7e00000 ret=0
    2026-11-25T21:23:28.619829Z qemu-system-x86_64: warning: host doesn't support requested feature ...

The second kind is an error_report() message: ``-trace file=`` makes the trace file QEMU's log
file, and ``-msg timestamp=on`` stamps messages in UTC.  Those become event ``message``.

The log is untrusted input.  Limits (both documented in docs/analysis.md):

* ``hintscope.limits.MAX_LINE`` characters per line: a longer line is malformed (never handed to a regex);
* ``hintscope.limits.MAX_TRACE_BYTES`` per file: only that prefix is read and the truncation is reported.

The file is parsed in chunks of ``CHUNK_BYTES`` (whole lines), so the intermediate string frames stay
bounded whatever the file size.

Malformed lines are counted; :attr:`TraceParse.problem` is one line naming the file, the count
and the first bad line number.  Every valid line is kept.  Parsing is vectorised (one regex
pass over all lines, one per event kind over its rows).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from hintscope import schema
from hintscope.errors import HintscopeError

from hintscope import limits

# Bytes parsed at once: bounds the intermediate (string) frames, not the result.
CHUNK_BYTES = 4 << 20  # worst case (13-byte lines) ~320k lines: ~150 MB of intermediates

TABLE = "qemu_trace"

_LINE = re.compile(
    r"^(?:(?P<tid>\d{1,10})@(?P<sec>\d{1,11})\.(?P<usec>\d{6}):(?P<event>[A-Za-z_][A-Za-z0-9_]{0,127})(?: (?P<args>.*))?"
    r"|(?P<iso>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6})Z (?P<msg>.*))$"
)

_HEX = r"0x([0-9a-fA-F]{1,16})"
_PTR = r"(0x[0-9a-fA-F]{1,16}|\(nil\))"
_DEC = r"(\d{1,18})"
_SDEC = r"(-?\d{1,18})"

# event -> (regex over args, [(column, kind)]); kind: dec, hex, ptr (0x.. or (nil)), str.
EVENTS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "kvm_set_user_memory": (
        rf"^(?:AddrSpace#{_DEC} )?Slot#{_DEC} flags={_HEX} gpa={_HEX} size={_HEX} ua={_HEX}"
        rf"(?: guest_memfd=-?\d{{1,10}} guest_memfd_offset=0x[0-9a-fA-F]{{1,16}})? ret={_SDEC}\s*$",
        [("as_id", "dec"), ("slot", "dec"), ("flags", "hex"), ("gpa", "hex"), ("size", "hex"), ("hva", "hex"),
         ("ret", "dec")]),
    "kvm_clear_dirty_log": (
        rf"^slot#{_DEC} start {_HEX} size {_HEX}\s*$",
        [("slot", "dec"), ("first_page", "hex"), ("num_pages", "hex")]),
    "migration_bitmap_sync_start": (r"^\s*$", []),
    "migration_bitmap_sync_end": (rf"^dirty_pages {_DEC}\s*$", [("dirty_pages", "dec")]),
    "migration_bitmap_clear_dirty": (
        rf"^rb (.{{1,256}}) start {_HEX} size {_HEX} page {_HEX}\s*$",
        [("block", "str"), ("offset", "hex"), ("size", "hex"), ("first_page", "hex")]),
    "migrate_set_state": (r"^new state ([A-Za-z0-9_-]{1,64})\s*$", [("state", "str")]),
    "ram_save_page": (
        rf"^(.{{1,256}}): offset: {_HEX} host: {_PTR}\s*$",
        [("block", "str"), ("offset", "hex"), ("hva", "ptr")]),
    "ram_load_loop": (
        rf"^(.{{1,256}}): addr: {_HEX} flags: {_HEX} host: {_PTR}\s*$",
        [("block", "str"), ("offset", "hex"), ("flags", "hex"), ("hva", "ptr")]),
    "kvm_dirty_ring_page": (
        rf"^vcpu {_DEC} fetch {_DEC} offset {_HEX}\s*$",
        [("vcpu", "dec"), ("count", "dec"), ("first_page", "hex")]),
    "kvm_dirty_ring_reap": (rf"^reaped {_DEC} pages \(took {_SDEC} us\)\s*$", [("count", "dec"), ("size", "dec")]),
    "kvm_dirty_ring_flush": (rf"^{_DEC}\s*$", [("count", "dec")]),
    "kvm_dirty_ring_full": (rf"^vcpu {_DEC}\s*$", [("vcpu", "dec")]),
    "kvm_dirty_ring_reap_vcpu": (rf"^vcpu {_DEC}\s*$", [("vcpu", "dec")]),
}

_INT_COLS = ["slot", "as_id", "flags", "gpa", "size", "hva", "first_page", "num_pages", "dirty_pages", "offset",
             "vcpu", "count"]
_STR_COLS = ["state", "block"]
_INT32 = {"slot", "as_id", "vcpu"}


@dataclass
class TraceParse:
    """A parsed log: the valid rows plus what was wrong with the rest."""

    frame: pd.DataFrame
    path: str
    lines: int
    bad: int
    first_bad: int | None
    first_bad_reason: str | None
    truncated_at: int | None = None

    @property
    def problem(self) -> str | None:
        """One line for the user, or None when every line parsed."""
        parts = []
        if self.bad:
            parts.append(f"{self.bad} of {self.lines} lines malformed and skipped "
                         f"(first: line {self.first_bad}: {self.first_bad_reason})")
        if self.truncated_at is not None:
            parts.append(f"read only the first {self.truncated_at} bytes (cap)")
        if not parts:
            return None
        return f"{self.path}: " + "; ".join(parts) + f"; kept {len(self.frame)} events"


def hex_to_int64(hexdigits: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Hex digit strings (1..16 digits, no 0x) -> (int64 values, ok mask); ok is False above 2**63-1.

    Vectorised: the strings are left-padded to 16 bytes and each byte is mapped to its nibble.
    """
    n = len(hexdigits)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    raw = hexdigits.str.lower().str.zfill(16).to_numpy(dtype=object).astype("S16")
    b = np.frombuffer(raw.tobytes(), dtype=np.uint8).reshape(n, 16)
    nib = np.where(b >= ord("a"), b - (ord("a") - 10), b - ord("0")).astype(np.uint64)
    w = (np.uint64(16) ** np.arange(7, -1, -1, dtype=np.uint64))
    hi = nib[:, :8] @ w
    lo = nib[:, 8:] @ w
    ok = hi < np.uint64(1 << 31)
    val = np.where(ok, (hi << np.uint64(32)) | lo, np.uint64(0)).astype(np.int64)
    return val, ok


def _empty() -> pd.DataFrame:
    return schema.get(TABLE).arrow_schema.empty_table().to_pandas()


def parse_bytes(data: bytes, path: str = "<trace>") -> TraceParse:
    """Parse the bytes of a trace log (see module docstring), chunk by chunk."""
    frames, lines, bad, first, why = [], 0, 0, None, None
    pos = 0
    truncated = None
    while pos < len(data) or not frames:
        end = len(data) if len(data) - pos <= CHUNK_BYTES else data.rfind(b"\n", pos, pos + CHUNK_BYTES) + 1
        if end <= pos:  # no newline in a whole chunk: that is one (malformed) over-long line
            nl = data.find(b"\n", pos)
            end = len(data) if nl < 0 else nl + 1
        r = _parse_chunk(data[pos:end], path)
        if r.first_bad is not None and first is None:
            first, why = r.first_bad + lines, r.first_bad_reason
        r.frame["line"] += lines
        frames.append(r.frame)
        lines += r.lines
        bad += r.bad
        pos = end
        if not data:
            break
        kept = sum(len(x) for x in frames)
        if kept >= limits.MAX_TRACE_EVENTS and pos < len(data):
            # The result, not the input, is what grows: stop at the event cap (reported as truncation).
            truncated = pos
            break
    f = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    return TraceParse(f, path, lines, bad, first, why, truncated)


def _parse_chunk(data: bytes, path: str) -> TraceParse:
    text = data.decode("utf-8", errors="replace")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    n = len(lines)
    if n == 0:
        return TraceParse(_empty(), path, 0, 0, None, None)
    s = pd.Series(lines, dtype="string")
    max_line = limits.MAX_LINE
    too_long = (s.str.len() > max_line).to_numpy()
    # Regexes never see an over-long line: it stays malformed.
    s_checked = s.where(~too_long, "")
    m = s_checked.str.extract(_LINE)
    is_trace = m["event"].notna().to_numpy()
    is_msg = m["iso"].notna().to_numpy()
    blank = (s.str.strip() == "").to_numpy()
    valid = (is_trace | is_msg) & ~too_long
    # A blank line is harmless (QEMU writes none, but editors do): neither kept nor counted bad.
    reason = np.full(n, "", dtype=object)
    reason[~valid & ~blank] = "not a `TID@SEC.USEC:event` or timestamped message line"
    reason[too_long] = f"longer than {max_line} characters"

    df = pd.DataFrame({"line": np.arange(1, n + 1, dtype=np.int64)})
    tid = pd.to_numeric(m["tid"], errors="coerce").fillna(-1).astype(np.int64).to_numpy()
    tid_ok = tid <= np.iinfo(np.int32).max
    sec = pd.to_numeric(m["sec"], errors="coerce").fillna(0).astype(np.int64).to_numpy()
    usec = pd.to_numeric(m["usec"], errors="coerce").fillna(0).astype(np.int64).to_numpy()
    wall = sec * 1_000_000_000 + usec * 1000
    if is_msg.any():
        iso = pd.to_datetime(m["iso"].where(pd.Series(is_msg)), format="%Y-%m-%dT%H:%M:%S.%f", errors="coerce",
                             utc=True)
        # Only years a nanosecond timestamp can hold (1677..2262) convert; others are malformed.
        year = iso.dt.year.to_numpy(dtype="float64", na_value=np.nan)
        in_range = (year >= 1678) & (year <= 2261)
        iso = iso.where(pd.Series(in_range, index=iso.index))
        iso_ns = iso.dt.as_unit("ns").astype("int64").to_numpy()
        iso_bad = is_msg & iso.isna().to_numpy()
        wall = np.where(is_msg, iso_ns, wall)
        reason[iso_bad & valid] = "bad message timestamp"
        valid &= ~iso_bad
    reason[~tid_ok & valid] = "thread id out of range"
    valid &= tid_ok | is_msg
    # sec * 1e9 must fit int64 (year 2262); a larger second count would wrap silently.
    sec_ok = is_msg | (sec < 9_223_372_036)
    reason[~sec_ok & valid] = "timestamp out of range"
    valid &= sec_ok
    df["wall_ns"] = wall
    df["tid"] = np.where(is_msg, -1, tid)
    df["event"] = m["event"].where(pd.Series(is_trace), "message").astype("string")
    df["args"] = m["args"].fillna("").where(pd.Series(is_trace), m["msg"].fillna("")).astype("string")
    for c in _INT_COLS:
        df[c] = np.int64(-1)
    df["ret"] = np.int64(0)
    for c in _STR_COLS:
        df[c] = ""

    ev = df["event"].to_numpy(dtype=object)
    for name, (rx, fields) in EVENTS.items():
        rows = np.flatnonzero(valid & is_trace & (ev == name))
        if not len(rows):
            continue
        if not fields:  # a regex without groups: only the match matters
            sub = pd.DataFrame(index=df.index[rows])
            matched = df["args"].iloc[rows].str.match(rx).fillna(False).to_numpy(dtype=bool)
        else:
            sub = df["args"].iloc[rows].str.extract(rx)
            # Optional groups may be NaN on a match; the last group of every pattern is mandatory.
            matched = sub.iloc[:, -1].notna().to_numpy()
        ok = matched.copy()
        vals: dict[str, np.ndarray] = {}
        for i, (col, kind) in enumerate(fields):
            g = sub.iloc[:, i]
            if kind == "str":
                vals[col] = g.fillna("").to_numpy(dtype=object)
                continue
            if kind == "ptr":
                nil = (g == "(nil)").fillna(False).to_numpy(dtype=bool)
                g = g.str.removeprefix("0x").where(~pd.Series(nil, index=g.index), "0")
                kind = "hex"
            present = g.notna().to_numpy()
            if kind == "hex":
                v, vok = hex_to_int64(g.fillna("0"))
            else:
                v = pd.to_numeric(g.fillna("0"), errors="coerce").fillna(0).astype(np.int64).to_numpy()
                vok = np.ones(len(v), bool)
            if col in _INT32:
                vok &= np.abs(v) <= np.iinfo(np.int32).max
            ok &= vok | ~present
            if col == "as_id":
                v = np.where(present, v, 0)
            vals[col] = v
        for col, v in vals.items():
            df.iloc[rows[ok], df.columns.get_loc(col)] = v[ok]
        bad_rows = rows[~ok]
        reason[bad_rows] = f"arguments of {name} not as QEMU prints them"
        valid[bad_rows] = False
    # Events that carry a slot but no address-space id are address space 0 in QEMU 7.2.
    df.loc[(df["slot"] >= 0) & (df["as_id"] < 0), "as_id"] = 0

    bad_mask = ~valid & ~blank
    bad = int(bad_mask.sum())
    first = int(np.flatnonzero(bad_mask)[0]) if bad else None
    out = df[valid].reset_index(drop=True)
    out.insert(0, "ts_ns", np.int64(-1))
    t = schema.get(TABLE)
    out = out[t.names]
    for c in t.cols:
        if c.dtype == "string":
            out[c.name] = out[c.name].astype("string")
        else:
            out[c.name] = out[c.name].astype(c.dtype)
    return TraceParse(out, path, n, bad, None if first is None else first + 1,
                      None if first is None else str(reason[first]))


def parse_file(path: str | os.PathLike, meta: Mapping[str, Any] | None = None,
               max_bytes: int | None = None) -> TraceParse:
    """Parse a log file; with ``meta`` (a bundle's meta) fill ``ts_ns`` from the clock anchors."""
    p = Path(path)
    max_bytes = limits.MAX_TRACE_BYTES if max_bytes is None else max_bytes
    try:
        with open(p, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise HintscopeError(f"{p}: cannot read QEMU trace log ({e.strerror})") from None
    truncated = None
    if len(data) > max_bytes:
        data = data[:max_bytes]
        # Drop the partial last line.
        data = data[: data.rfind(b"\n") + 1]
        truncated = max_bytes
    r = parse_bytes(data, str(p))
    if truncated is not None:
        r.truncated_at = min(truncated, r.truncated_at or truncated)
    if r.lines and not len(r.frame) and r.bad:
        raise HintscopeError(f"{p}: not a QEMU trace log (none of {r.lines} lines parsed; "
                             f"line {r.first_bad}: {r.first_bad_reason})")
    if meta is not None:
        add_monotonic(r.frame, meta)
    return r


def add_monotonic(frame: pd.DataFrame, meta: Mapping[str, Any]) -> None:
    """Fill ``ts_ns`` from ``wall_ns`` through the bundle's clock anchors (in place)."""
    from hintscope.bundle import mono_from_wall

    if len(frame) and meta.get("clock_anchors"):
        frame["ts_ns"] = mono_from_wall(meta, frame["wall_ns"].to_numpy())


def trace_log_path(bundle) -> Path | None:
    """Where a bundle keeps the QEMU trace log: meta['qemu_trace']['file'], else files/qemu-trace.log."""
    qt = bundle.meta.get("qemu_trace")
    rel = qt.get("file") if isinstance(qt, dict) else None
    if isinstance(rel, str) and rel:
        p = (bundle.path / rel).resolve()
        # The meta is untrusted too: only files inside the bundle.
        if p.is_file() and bundle.path.resolve() in p.parents:
            return p
    return bundle.file("qemu-trace.log")


def load(bundle, problems: list[str] | None = None) -> pd.DataFrame:
    """The bundle's ``qemu_trace`` table, or its trace log parsed on the fly when the table is absent."""
    if bundle.has(TABLE):
        return bundle.table(TABLE)
    # Parsed once per opened bundle: the detector and the analysis both ask for it.
    memo = bundle.__dict__.setdefault("_qemu_trace_parse", {})
    if "frame" not in memo:
        memo["problem"] = None
        p = trace_log_path(bundle)
        if p is None:
            memo["frame"] = _empty()
        else:
            try:
                r = parse_file(p, bundle.meta)
                memo["frame"], memo["problem"] = r.frame, r.problem
            except HintscopeError as e:
                memo["frame"], memo["problem"] = _empty(), str(e)
    if memo["problem"] and problems is not None:
        problems.append(memo["problem"])
    return memo["frame"]


def write_to_bundle(writer, path: str | os.PathLike) -> TraceParse:
    """Parse ``path`` and append it as table ``qemu_trace`` to an open BundleWriter (for producers)."""
    r = parse_file(path, writer.meta)
    writer.append(TABLE, r.frame)
    if r.problem:
        writer.meta.setdefault("problems", []).append(r.problem)
    return r
