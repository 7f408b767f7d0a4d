"""Host-side parser of the guest stream (format: hintscope/probes/guest.py docstring).

The stream is written by a guest, so it is hostile input: any byte sequence must give either
tables of the valid records plus one-line problem notes, or (when a file is unusable as a
whole) a one-line :class:`HintscopeError`.  Parsing is vectorised: one regex pass per record
type over a pandas string Series.

Source and destination files of one migration are joined: records are de-duplicated on
(writer, seq), ordered by seq, and ``side`` records where each arrived.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hintscope import limits
from hintscope.errors import HintscopeError

MAX_STREAM_BYTES = limits.MAX_STREAM_BYTES
MAX_HEADER_CHARS = 1 << 20
U64_MAX = "18446744073709551615"
I64_MAX = "9223372036854775807"

KINDS = {
    1: "run_enter", 2: "run_exit", 3: "config_changed", 4: "cmd_id", 5: "outbuf", 6: "hint",
    7: "return_enter", 8: "return_exit", 9: "block_returned", 10: "shrinker_enter", 11: "shrinker_exit",
    12: "reuse", 13: "free_page_report", 14: "remove", 15: "hint_freed",
}
REASONS = {0: "other", 1: "done", 2: "shrinker", 3: "remove"}
CMD_ID_STOP, CMD_ID_DONE = 0, 1
HINT_ORDER = 10

_D = r"(\d{1,20})"
E_RE = rf"^E {_D} {_D} {_D} {_D} {_D} {_D} {_D} {_D}$"
E_COLS = ["seq", "guest_ns", "cpu", "tid", "kind", "a0", "a1", "a2"]
E_U64 = {"a0", "a1", "a2"}
# A / S lines come from the probe, W lines from the workload; both: "<P> <seq> <ns> <word or values> [text]"
A_RE = rf"^A {_D} {_D} (ATTACHED)$"
S_RE = rf"^S {_D} {_D} {_D} {_D} (-?\d{{1,19}})$"
W_RE = r"^W (\d{1,20}) (\d{1,20}) ([A-Z]{1,16})(?: (.{0,4000}))?$"
WPFN_RE = r"^(\d{1,9}) (\d{1,20}(?:,\d{1,20}){0,4095})$"


@dataclass
class GuestStream:
    """Parsed guest stream: one DataFrame per guest table, plus header and problem notes."""

    tables: dict[str, pd.DataFrame]
    header: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def _fits(s: pd.Series, limit: str) -> pd.Series:
    """Decimal strings (digits only) that are <= limit, compared without converting."""
    n = s.str.len()
    return (n < len(limit)) | ((n == len(limit)) & (s <= limit))


def _to_int(s: pd.Series, dtype: str) -> np.ndarray:
    return np.array(s.to_numpy(dtype=object), dtype=np.uint64 if dtype == "uint64" else np.int64) if len(s) else \
        np.empty(0, dtype=dtype)


def _read_lines(path: Path, problems: list[str] | None = None) -> tuple[pd.Series, bool]:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise HintscopeError(f"{path}: cannot read guest stream ({e.strerror})") from None
    if size > MAX_STREAM_BYTES:
        raise HintscopeError(f"{path}: {size} bytes, larger than any guest stream hintscope writes "
                             f"({MAX_STREAM_BYTES >> 20} MiB)")
    raw = path.read_bytes()
    # Memory grows with the line count (one regex match object per line), not with the bytes:
    # cut at MAX_STREAM_LINES lines before splitting the text.
    rest = raw.split(b"\n", limits.MAX_STREAM_LINES)
    if len(rest) > limits.MAX_STREAM_LINES and rest[-1]:
        raw = raw[: len(raw) - len(rest[-1])]
        if problems is not None:
            problems.append(f"{path}: more than {limits.MAX_STREAM_LINES} lines, read only the first "
                            f"{limits.MAX_STREAM_LINES} ({len(raw)} of {size} bytes)")
    del rest
    truncated = bool(raw) and not raw.endswith(b"\n")
    text = raw.decode("utf-8", errors="replace").replace("\x00", "\ufffd")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return pd.Series(lines, dtype=object).astype("string"), truncated


def _parse_one(path: Path, side: str, problems: list[str]) -> tuple[dict[str, pd.DataFrame], dict]:
    lines, truncated = _read_lines(path, problems)
    n_total = len(lines)
    if truncated and n_total:
        lines = lines.iloc[:-1]
        problems.append(f"{path}: last line is truncated (no newline), dropped")
    header: dict = {}
    used = pd.Series(False, index=lines.index)

    hdr = lines[lines.str.startswith("HSG ", na=False)]
    if len(hdr):
        used[hdr.index] = True
        first = hdr.iloc[0]
        try:
            if len(first) > MAX_HEADER_CHARS:
                raise ValueError("header too long")
            _, ver, js = first.split(" ", 2)
            obj = json.loads(js)
            if not isinstance(obj, dict):
                raise ValueError("header is not an object")
            if ver != "1":
                problems.append(f"{path}: stream version {ver[:10]!r}, this hintscope reads version 1")
            header = obj
        except (ValueError, RecursionError) as e:
            problems.append(f"{path}: unreadable stream header ({str(e)[:80]})")

    out: dict[str, pd.DataFrame] = {}
    # --- E: probe events
    e = lines.str.extract(E_RE)
    e.columns = E_COLS
    ok = e["seq"].notna()
    for c in E_COLS:
        ok &= _fits(e[c].fillna("0"), U64_MAX if c in E_U64 else I64_MAX)
    ok &= e["cpu"].fillna("0").str.len() <= 5
    ok &= e["tid"].fillna("0").str.len() <= 10
    e = e[ok]
    used[e.index] = True
    ev = pd.DataFrame({
        "seq": _to_int(e["seq"], "int64"), "guest_ns": _to_int(e["guest_ns"], "int64"),
        "cpu": _to_int(e["cpu"], "int64"), "tid": _to_int(e["tid"], "int64"), "kind": _to_int(e["kind"], "int64"),
        "a0": _to_int(e["a0"], "uint64"), "a1": _to_int(e["a1"], "uint64"), "a2": _to_int(e["a2"], "uint64"),
        "line": e.index.to_numpy(dtype=np.int64),
    })
    bad_range = (ev["tid"] > np.iinfo(np.int32).max) | (ev["cpu"] > 4096) | ~ev["kind"].isin(list(KINDS))
    if bad_range.any():
        problems.append(f"{path}: {int(bad_range.sum())} probe records with an unknown event kind or out-of-range "
                        f"cpu/tid (first at line {int(ev['line'][bad_range].iloc[0]) + 1}), dropped")
        ev = ev[~bad_range]
    ev["side"] = side
    out["E"] = ev

    # --- A / S: probe status
    a = lines.str.extract(A_RE).dropna()
    s = lines.str.extract(S_RE).dropna()
    a = a[_fits(a[0], I64_MAX) & _fits(a[1], I64_MAX)]
    s = s[_fits(s[0], I64_MAX) & _fits(s[1], I64_MAX) & _fits(s[2], I64_MAX) & _fits(s[3], I64_MAX)]
    used[a.index] = True
    used[s.index] = True
    rep_a = pd.DataFrame({"seq": _to_int(a[0], "int64"), "guest_ns": _to_int(a[1], "int64"), "source": "probe",
                          "word": "ATTACHED", "v0": -1, "v1": -1, "v2": -1, "text": ""})
    rep_s = pd.DataFrame({"seq": _to_int(s[0], "int64"), "guest_ns": _to_int(s[1], "int64"), "source": "probe",
                          "word": "STATS", "v0": _to_int(s[2], "int64"), "v1": _to_int(s[3], "int64"),
                          "v2": pd.to_numeric(s[4]).to_numpy(dtype=np.int64) if len(s) else np.empty(0, np.int64),
                          "text": ""})
    # --- W: workload
    w = lines.str.extract(W_RE).dropna(subset=[0])
    w = w[_fits(w[0], I64_MAX) & _fits(w[1], I64_MAX)]
    used[w.index] = True
    text = w[3].fillna("")
    wpfn = w[2] == "WPFN"
    vals = text[~wpfn].str.extract(r"^(-?\d{1,18})?(?: (-?\d{1,18}))?(?: (-?\d{1,18}))?")
    rep_w = pd.DataFrame({"seq": _to_int(w[0][~wpfn], "int64"), "guest_ns": _to_int(w[1][~wpfn], "int64"),
                          "source": "workload", "word": w[2][~wpfn].to_numpy(dtype=object),
                          "v0": pd.to_numeric(vals[0]).fillna(-1).to_numpy(dtype=np.int64),
                          "v1": pd.to_numeric(vals[1]).fillna(-1).to_numpy(dtype=np.int64),
                          "v2": pd.to_numeric(vals[2]).fillna(-1).to_numpy(dtype=np.int64),
                          "text": text[~wpfn].to_numpy(dtype=object)})
    rep = pd.concat([df for df in (rep_a, rep_s, rep_w) if len(df)], ignore_index=True) if \
        (len(rep_a) + len(rep_s) + len(rep_w)) else rep_a
    rep["side"] = side
    out["reports"] = rep
    # writer page frames: "W seq ns WPFN <first index> <pfn,pfn,...>"
    wp = text[wpfn].str.extract(WPFN_RE).dropna()
    bad_wpfn = int(wpfn.sum()) - len(wp)
    if bad_wpfn:
        problems.append(f"{path}: {bad_wpfn} malformed WPFN lines, dropped")
    if len(wp):
        lists = wp[1].str.split(",")
        idx0 = pd.to_numeric(wp[0]).to_numpy(dtype=np.int64)
        lens = lists.str.len().to_numpy(dtype=np.int64)
        flat = pd.Series(np.concatenate(lists.to_numpy()), dtype="string")
        fits = _fits(flat, U64_MAX).to_numpy()
        index = np.repeat(idx0, lens) + (np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens))
        out["writer"] = pd.DataFrame({"index": index[fits], "pfn": _to_int(flat[fits], "uint64")})
        if (~fits).any():
            problems.append(f"{path}: {int((~fits).sum())} out-of-range writer pfns, dropped")

    bad = ~used
    if bad.any():
        first = int(np.flatnonzero(bad.to_numpy())[0]) + 1
        problems.append(f"{path}: {int(bad.sum())} of {n_total} lines are not guest stream records "
                        f"(first: line {first}), skipped")
    return out, header


def parse_streams(files: list[tuple[str | os.PathLike, str]]) -> GuestStream:
    """Parse and join guest stream files given as (path, side), e.g. [(src, "src"), (dst, "dst")].

    Raises HintscopeError only when no file can be read at all; everything else becomes a note
    in ``problems`` and the valid records are kept.
    """
    problems: list[str] = []
    parts: list[dict[str, pd.DataFrame]] = []
    header: dict = {}
    readable = 0
    for path, side in files:
        p = Path(path)
        if not p.exists():
            problems.append(f"{p}: guest stream file missing")
            continue
        try:
            out, hdr = _parse_one(p, side, problems)
        except HintscopeError as e:
            problems.append(str(e))
            continue
        readable += 1
        header = header or hdr
        parts.append(out)
    if not readable:
        raise HintscopeError(problems[0] if problems else "no guest stream files given")

    ev = pd.concat([o["E"] for o in parts], ignore_index=True)
    ev = _dedupe(ev, ["seq"], ["guest_ns", "cpu", "tid", "kind", "a0", "a1", "a2"], "probe event", problems)
    ev = ev.sort_values("seq", kind="stable", ignore_index=True)
    if len(ev):
        # Python ints: a forged seq near 2**63 would wrap the int64 difference.
        gaps = int(ev["seq"].iloc[-1]) - int(ev["seq"].iloc[0]) + 1 - len(ev)
        if gaps:
            problems.append(f"guest stream: {gaps} probe records missing (sequence gaps)")
    reps = pd.concat([o["reports"] for o in parts], ignore_index=True)
    reps = _dedupe(reps, ["source", "word", "seq"], ["guest_ns", "v0", "v1", "v2", "text"], "report", problems)
    reps = reps.sort_values(["guest_ns", "seq"], kind="stable", ignore_index=True)
    writer = pd.concat([o["writer"] for o in parts if "writer" in o], ignore_index=True) if \
        any("writer" in o for o in parts) else pd.DataFrame({"index": [], "pfn": []})
    writer = writer.drop_duplicates("index").sort_values("index", ignore_index=True)
    if len(ev) and (ev["guest_ns"].diff().fillna(0) < 0).any():
        problems.append("guest stream: guest_ns goes backwards in sequence order (records reordered or forged)")

    tables = derive_tables(ev, reps, writer)
    counts = {k: len(v) for k, v in tables.items()}
    return GuestStream(tables=tables, header=header, problems=problems, counts=counts)


def _dedupe(df: pd.DataFrame, key: list[str], payload: list[str], what: str, problems: list[str]) -> pd.DataFrame:
    """A line can arrive in both files around the switch; keep the first copy."""
    if df.empty:
        return df
    dup = df.duplicated(key, keep="first")
    if dup.any():
        conflict = df.duplicated(key + payload, keep="first") != dup
        if conflict.any():
            problems.append(f"guest stream: {int(conflict.sum())} {what} records reuse a sequence number with "
                            "different content, kept the first")
    return df[~dup]


def derive_tables(ev: pd.DataFrame, reps: pd.DataFrame, writer: pd.DataFrame) -> dict[str, pd.DataFrame]:
    name = ev["kind"].map(KINDS)
    events = pd.DataFrame({
        "guest_ns": ev["guest_ns"].to_numpy(np.int64), "seq": ev["seq"].to_numpy(np.int64),
        "side": ev["side"].to_numpy(object), "cpu": ev["cpu"].to_numpy(np.int32), "tid": ev["tid"].to_numpy(np.int32),
        "event": name.to_numpy(object), "a0": ev["a0"].to_numpy(np.uint64), "a1": ev["a1"].to_numpy(np.uint64),
        "a2": ev["a2"].to_numpy(np.uint64),
    })
    run_idx = (events["event"] == "run_enter").cumsum().to_numpy() - 1
    h = events[events["event"] == "hint"]
    hints = pd.DataFrame({
        "guest_ns": h["guest_ns"], "side": h["side"], "tid": h["tid"], "pfn": h["a0"],
        "order": np.minimum(h["a1"].to_numpy(), 64).astype(np.int32),
        "cmd_id": (h["a2"].to_numpy() & np.uint64(0xFFFFFFFF)).astype(np.uint32),
        "run": run_idx[h.index.to_numpy()].astype(np.int32),
    })
    r = events[events["event"] == "block_returned"]
    returns = pd.DataFrame({
        "guest_ns": r["guest_ns"], "side": r["side"], "tid": r["tid"], "pfn": r["a0"],
        "order": np.minimum(r["a2"].to_numpy(), 64).astype(np.int32),
        "reason": r["a1"].map(lambda v: REASONS.get(int(v), "other")).astype(object) if len(r) else pd.Series([], dtype=object),
    })
    u = events[events["event"] == "reuse"]
    block = (u["a0"].to_numpy() >> np.uint64(HINT_ORDER)) << np.uint64(HINT_ORDER)
    reuse = pd.DataFrame({
        "guest_ns": u["guest_ns"].to_numpy(), "side": u["side"].to_numpy(), "tid": u["tid"].to_numpy(),
        "pfn": u["a0"].to_numpy(), "order": np.minimum(u["a1"].to_numpy(), 64).astype(np.int32),
        "gfp": u["a2"].to_numpy(), "block_pfn": block,
    })
    reuse["returned_ns"] = _last_before(reuse, returns)
    return {
        "guest_events": events.reset_index(drop=True),
        "guest_hints": hints.reset_index(drop=True),
        "guest_returns": returns.reset_index(drop=True),
        "guest_reuse": reuse,
        "guest_reports": reps[["guest_ns", "side", "seq", "source", "word", "v0", "v1", "v2", "text"]],
        "guest_writer_pages": writer.astype({"index": np.int32, "pfn": np.uint64}),
    }


def _last_before(reuse: pd.DataFrame, returns: pd.DataFrame) -> np.ndarray:
    """Guest time of the latest return of each reuse's block before the reuse (-1 if none)."""
    if reuse.empty:
        return np.empty(0, np.int64)
    if returns.empty:
        return np.full(len(reuse), -1, np.int64)
    left = pd.DataFrame({"t": reuse["guest_ns"].to_numpy(np.int64), "blk": reuse["block_pfn"].to_numpy(np.uint64),
                         "i": np.arange(len(reuse))}).sort_values("t", kind="stable")
    rb = (returns["pfn"].to_numpy(np.uint64) >> np.uint64(HINT_ORDER)) << np.uint64(HINT_ORDER)
    right = pd.DataFrame({"t": returns["guest_ns"].to_numpy(np.int64), "blk": rb,
                          "rt": returns["guest_ns"].to_numpy(np.int64)}).sort_values("t", kind="stable")
    m = pd.merge_asof(left, right, on="t", by="blk", direction="backward")
    out = np.full(len(reuse), -1, np.int64)
    out[m["i"].to_numpy()] = m["rt"].fillna(-1).to_numpy(np.int64)
    return out


def ring_drops(gs: GuestStream) -> dict[str, int]:
    """Events the in-guest probe's ring buffer dropped, per side (the STATS drop counter is cumulative)."""
    r = gs.tables.get("guest_reports")
    if r is None or not len(r):
        return {}
    st = r[r["word"] == "STATS"]
    per = st.groupby("side")["v0"].max() if len(st) else pd.Series(dtype="int64")
    return {str(k): int(v) for k, v in per.items() if int(v) > 0}


def write_to_bundle(writer, gs: GuestStream) -> None:
    """Append the parsed tables to a BundleWriter and record the source status."""
    for name, df in gs.tables.items():
        if len(df):
            writer.append(name, df)
    drops = ring_drops(gs)
    for side, n in drops.items():
        # the probe's perf buffer overflowed: those guest events are gone, so the guest timeline is partial
        gs.problems.append(f"guest probe ({side}): the ring buffer dropped {n} events (STATS drops)")
        writer.add_lost(f"guest_probe_{side}", n)
    status = "captured" if not gs.problems else "partial"
    writer.set_source("guest_probe", status=status, reason="; ".join(gs.problems[:5]) or None,
                      header=gs.header, counts=gs.counts, problems=gs.problems[:50])
