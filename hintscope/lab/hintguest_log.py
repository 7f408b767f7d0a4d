"""What the hintguest leaves behind: its serial log and the records it stamps into pages.

The guest (lab/guests/hintguest/hintguest.c) logs ``HG t=<tsc> ev=<name> k=v ...`` lines on COM1 and
stamps ``u32 magic, u32 gfn, u64 seq, u32 round, u32 id`` at the start of every page it writes.  Both
are guest output: bounded, malformed lines counted as problems, never fatal.  The lab turns them into
the ``hintguest_*`` tables; what they mean for the migration is the analysis' job
(``analysis.lost_pages``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hintscope.errors import HintscopeError
from hintscope.protocol import PAGE

MAGICS = {0x53554748: "HGUS", 0x57524748: "HGRW", 0x47424748: "HGBG", 0x4C464748: "HGFL"}
MAX_LOG_BYTES = 16 << 20

# ---------------------------------------------------------------------------------------------
# serial log parsing (guest output is untrusted: bounded, malformed lines counted, not fatal)

LINE_RE = r"^HG t=(?P<tsc>\d{1,20}) ev=(?P<ev>[a-z_]{1,20})(?P<rest>(?: .*)?)$"
KEYS = {  # column -> (regex on the rest of the line, base)
    "cmd_id": (r"(?:^| )id=(0x[0-9a-f]{1,8})(?= |$)", 16),
    "gfn": (r"(?:^| )gfn=(0x[0-9a-f]{1,12})(?= |$)", 16),
    "npages": (r"(?:^| )npages=(\d{1,12})(?= |$)", 10),
    "seq": (r"(?:^| )seq=(\d{1,18})(?= |$)", 10),
    "round": (r"(?:^| )round=(\d{1,9})(?= |$)", 10),
    "avail_idx": (r"(?:^| )avail_idx=(\d{1,9})(?= |$)", 10),
    "tsc_hz": (r"(?:^| )tsc_hz=(\d{1,12})(?= |$)", 10),
    "tsc_end": (r"(?:^| )t_end=(\d{1,19})(?= |$)", 10),
}
PHASE_RE = r"(?:^| )phase=(early|late)(?= |$)"


@dataclass
class GuestLog:
    events: pd.DataFrame           # hintguest_events
    hints: pd.DataFrame            # hintguest_hints
    writes: pd.DataFrame           # hintguest_writes
    tsc_hz: int
    boot: dict[str, str]
    errors: list[str]
    problems: list[str] = field(default_factory=list)


def _num(col: pd.Series, base: int) -> pd.Series:
    present = col.notna()
    out = pd.Series(np.full(len(col), -1, dtype=np.int64), index=col.index)
    if present.any():
        out[present] = col[present].map(lambda s: int(s, base)).astype(np.int64)
    return out


def _kv(rest: str) -> dict[str, str]:
    return dict(t.split("=", 1) for t in rest.split() if "=" in t)


def parse_serial(text: str, source: str = "serial log") -> GuestLog:
    """Parse the hintguest serial log. Raises HintscopeError only when nothing usable is in it."""
    lines = pd.Series(text.split("\n"))
    lineno = pd.Series(np.arange(1, len(lines) + 1, dtype=np.int64))
    nonblank = lines.str.strip() != ""
    m = lines.str.extract(LINE_RE)
    ok = m["tsc"].notna()
    problems = []
    bad = nonblank & ~ok
    if bad.any():
        first = int(lineno[bad].iloc[0])
        problems.append(f"{source}: {int(bad.sum())} line(s) not in 'HG t=<tsc> ev=<name> ...' form (first: line {first})")
    m, lineno = m[ok].reset_index(drop=True), lineno[ok].reset_index(drop=True)
    if m.empty:
        raise HintscopeError(f"{source}: no hintguest event lines (did the guest boot?)")
    tsc = m["tsc"].map(int)
    over = tsc >= 1 << 64
    if over.any():
        problems.append(f"{source}: {int(over.sum())} line(s) with a TSC beyond 64 bits dropped")
        m, lineno, tsc = m[~over].reset_index(drop=True), lineno[~over].reset_index(drop=True), tsc[~over].reset_index(drop=True)
    rest = m["rest"].fillna("")
    cols = {k: _num(rest.str.extract(rx, expand=False), base) for k, (rx, base) in KEYS.items()}
    calib = cols["tsc_hz"][m["ev"] == "calib"]
    tsc_hz = int(calib.iloc[-1]) if len(calib) and calib.iloc[-1] > 0 else 0
    if not tsc_hz:
        problems.append(f"{source}: no calib line; guest_ns left at -1")
    tsc_u = tsc.to_numpy(dtype=np.uint64)
    guest_ns = ((tsc_u.astype(np.float64) * 1e9 / tsc_hz).astype(np.int64) if tsc_hz
                else np.full(len(m), -1, dtype=np.int64))
    ev = m["ev"].astype(str)
    phase = rest.str.extract(PHASE_RE, expand=False).fillna("")
    events = pd.DataFrame({
        "tsc": tsc_u, "guest_ns": guest_ns, "line": lineno.to_numpy(), "ev": ev.to_numpy(),
        "cmd_id": cols["cmd_id"].to_numpy(), "gfn": cols["gfn"].to_numpy(), "npages": cols["npages"].to_numpy(),
        "seq": cols["seq"].to_numpy(), "round": cols["round"].to_numpy(), "phase": phase.to_numpy(),
        "tsc_end": cols["tsc_end"].to_numpy(),
    })
    is_hint = (events["ev"] == "hint") & (events["gfn"] >= 0) & (events["npages"] > 0) & (events["cmd_id"] >= 0)
    hints = events.loc[is_hint, ["tsc", "guest_ns", "cmd_id", "round", "gfn", "npages"]].copy()
    hints["avail_idx"] = cols["avail_idx"][is_hint.to_numpy()].to_numpy()
    is_write = (events["ev"] == "write") & (events["gfn"] >= 0) & (events["seq"] >= 0) & (events["phase"] != "")
    writes = events.loc[is_write, ["tsc", "guest_ns", "cmd_id", "round", "gfn", "seq", "phase"]].copy()
    for name, sel, n in (("hint", events["ev"] == "hint", len(hints)), ("write", events["ev"] == "write", len(writes))):
        if int(sel.sum()) != n:
            problems.append(f"{source}: {int(sel.sum()) - n} '{name}' line(s) missing fields, dropped")
    boot_rest = rest[ev == "boot"]
    boot = _kv(boot_rest.iloc[0]) if len(boot_rest) else {}
    errs = [r.strip()[:200] for r in rest[ev == "error"]]
    return GuestLog(events.reset_index(drop=True), hints.reset_index(drop=True), writes.reset_index(drop=True),
                    tsc_hz, boot, errs, problems)


def read_serial_log(path: Path) -> GuestLog:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_LOG_BYTES + 1)
    except OSError as e:
        raise HintscopeError(f"{path}: cannot read the hintguest serial log ({e.strerror})") from None
    log = parse_serial(raw[:MAX_LOG_BYTES].decode("ascii", errors="replace"), str(path))
    if len(raw) > MAX_LOG_BYTES:
        log.problems.append(f"{path}: longer than {MAX_LOG_BYTES} bytes; the rest was ignored")
    return log


# ---------------------------------------------------------------------------------------------
# page records in a RAM image


def _records(img: Path, gfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(magic name, seq) of the HG record at the start of each page; ('', -1) when none."""
    if len(gfns) == 0:
        return np.array([], dtype=object), np.array([], dtype=np.int64)
    mm = np.memmap(img, dtype=np.uint8, mode="r")
    n_pages = len(mm) // PAGE
    g = np.clip(gfns, 0, n_pages - 1).astype(np.int64)
    heads = np.stack([np.asarray(mm[p * PAGE:p * PAGE + 16]) for p in g])
    magic = heads[:, 0:4].copy().view("<u4").ravel()
    rec_gfn = heads[:, 4:8].copy().view("<u4").ravel()
    seq = heads[:, 8:16].copy().view("<u8").ravel().astype(np.int64)
    valid = np.isin(magic, list(MAGICS)) & (rec_gfn == (gfns & 0xFFFFFFFF))
    names = np.array([MAGICS.get(int(x), "") for x in magic], dtype=object)
    names[~valid] = ""
    del mm
    return names, np.where(valid, seq, -1)


def reuse_writes_in_memory(img: Path, pool: tuple[int, int]) -> pd.DataFrame:
    """Reuse writes as the source RAM holds them: every pool page whose record is 'HGRW' for itself.

    The serial log can end before the guest's last events (the VM stops mid-print); the source
    image cannot miss a write the guest made. Columns: gfn, seq, round, cmd_id."""
    mm = np.memmap(img, dtype=np.uint8, mode="r")
    lo, hi = pool[0], min(pool[1], len(mm) // PAGE)
    if hi <= lo:
        return pd.DataFrame({"gfn": [], "seq": [], "round": [], "cmd_id": []}, dtype=np.int64)
    heads = np.asarray(mm[lo * PAGE:hi * PAGE]).reshape(hi - lo, PAGE)[:, :24]
    del mm
    rec = np.ascontiguousarray(heads)
    magic = rec[:, 0:4].copy().view("<u4").ravel()
    rgfn = rec[:, 4:8].copy().view("<u4").ravel()
    gfns = np.arange(lo, hi, dtype=np.int64)
    ok = (magic == 0x57524748) & (rgfn == gfns)
    return pd.DataFrame({"gfn": gfns[ok], "seq": rec[ok, 8:16].copy().view("<u8").ravel().astype(np.int64),
                         "round": rec[ok, 16:20].copy().view("<u4").ravel().astype(np.int64),
                         "cmd_id": rec[ok, 20:24].copy().view("<u4").ravel().astype(np.int64)})


def page_records(src_img: Path, dst_img: Path, gfns: np.ndarray) -> pd.DataFrame:
    """The ``hintguest_pages`` rows: the HG record of each page in both images (facts, no verdict)."""
    gfns = np.unique(np.asarray(gfns, dtype=np.int64))
    s_mag, s_seq = _records(src_img, gfns)
    d_mag, d_seq = _records(dst_img, gfns)
    return pd.DataFrame({"gfn": gfns, "src_seq": s_seq, "dst_seq": d_seq, "src_magic": s_mag, "dst_magic": d_mag})
