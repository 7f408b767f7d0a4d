"""One outsider migration end to end: boot both QEMUs, attach the probe (and the tap), migrate over
QMP, compare memory, analyze the probe's bundle."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tests.outsider import memcheck, tools
from tests.outsider.vm import MEM_MB, VM, guest_append, read_log, wait_serial

# c' findings (CONTRACT.md): the host-only hazard and the loss shown by writes or the memory check
CPRIME = ("rearm-in-apply", "rearm-wipe")


@dataclass(frozen=True)
class Scenario:
    version: str = "7.2"             # vm.QEMUS key
    behaviour: str = "early-reuse"   # polite | early-reuse | late-reuse
    stale: bool = False              # the guest's start message carries a stale id: QEMU drops every hint
    dirty_ring: int = 0              # entries per vCPU; 0 = bitmap mode (manual protect)
    tap: bool = False                # route the migration through `hintscope tap`
    bandwidth_mb: int = 32           # while the guest runs its rounds (it must not converge yet)

    @property
    def label(self) -> str:
        mode = f"ring{self.dirty_ring}" if self.dirty_ring else "bitmap"
        return f"{self.version}-{self.behaviour}{'-stale' if self.stale else ''}-{mode}{'-tap' if self.tap else ''}"


@dataclass
class Result:
    scenario: Scenario
    workdir: Path
    bundle: Path
    tap_bundle: Path | None = None
    migration: dict[str, Any] = field(default_factory=dict)
    mem: memcheck.MemCheck | None = None
    probe_exit: int | None = None
    tap_exit: int | None = None
    analyze_exit: int | None = None
    analyze_error: str | None = None      # analyze crashed or printed no JSON
    verdict: str = ""
    findings: list[dict] = field(default_factory=list)
    guest: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def by_kind(self, kind: str, confidence: str | None = None) -> list[dict]:
        return [f for f in self.findings if f.get("kind") == kind
                and (confidence is None or f.get("confidence") == confidence)]

    def pages(self, kind: str, confidence: str | None = None) -> int:
        return sum(int(f.get("gfn_count") or 0) for f in self.by_kind(kind, confidence))

    def row(self) -> dict[str, Any]:
        m = self.mem.summary() if self.mem else {}
        cp = {k: f"{len(self.by_kind(k))} ({self.pages(k)} pages)" for k in CPRIME if self.by_kind(k)}
        return {"run": self.scenario.label, "writes_after_hint": m.get("written_after_hint"),
                "lost": m.get("lost"), "lost_other": m.get("lost_other"), "hinted_held": m.get("hinted_held"),
                "verdict": self.analyze_error or self.verdict, "cprime": cp, "analyze_exit": self.analyze_exit,
                "syncs": self.migration.get("dirty-sync-count"), "cmd_ids": self.guest.get("cmd_ids"),
                "total_ms": self.migration.get("total-time")}


def _migrate(src: VM, uri: str, sc: Scenario, timeout: float = 90) -> dict[str, Any]:
    """A bandwidth the guest's background writer outpaces and a 1 ms downtime keep QEMU iterating
    (one cmd id per sync) until the guest logs bg_stop after its last round; then let it converge."""
    # Not 0: QEMU syncs again only once what is left to send is below bandwidth x downtime, so a
    # 0 ms limit means no sync (and no cmd id) until the first pass is done, and then completion.
    src.cmd("migrate-set-parameters", **{"max-bandwidth": sc.bandwidth_mb << 20, "downtime-limit": 1})
    src.cmd("migrate", uri=uri)
    opened = False
    deadline = time.monotonic() + timeout
    while True:
        info = src.cmd("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        if not opened and b"ev=bg_stop" in src.serial.read_bytes():
            src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 30, "downtime-limit": 300})
            opened = True
        if time.monotonic() > deadline:
            with contextlib.suppress(Exception):
                src.cmd("migrate_cancel")
            raise RuntimeError(f"migration still {info.get('status')} after {timeout:.0f} s")
        time.sleep(0.1)


def run(sc: Scenario, workdir: Path, kernel: Path) -> Result:
    workdir.mkdir(parents=True, exist_ok=True)
    res = Result(sc, workdir, workdir / "probe.bundle")
    append = guest_append(sc.behaviour, sc.stale)
    dst_sock, tap_sock = workdir / "dst.sock", workdir / "tap.sock"
    src = VM("src", workdir, sc.version, kernel, append, sc.dirty_ring)
    dst = VM("dst", workdir, sc.version, kernel, append, sc.dirty_ring, incoming=f"unix:{dst_sock}")
    probe = tap = None
    t0 = time.monotonic()
    try:
        src.start()
        # the probe's BCC compile overlaps the guest's boot
        probe = tools.Probe(src.pid, res.bundle, workdir / "probe.log")
        dst.start()
        wait_serial(src.serial, r"^HG t=\d+ ev=ready", 60)
        res.timings["boot"] = time.monotonic() - t0
        probe.wait_attached()
        res.timings["probe_attached"] = time.monotonic() - t0
        uri = f"unix:{dst_sock}"
        if sc.tap:
            res.tap_bundle = workdir / "tap.bundle"
            tap = tools.Tap(tap_sock, dst_sock, res.tap_bundle, workdir / "tap.log")
            tap.wait_listening()
            uri = f"unix:{tap_sock}"
        t_mig = time.monotonic()
        info = _migrate(src, uri, sc)
        res.timings["migrate"] = time.monotonic() - t_mig
        res.migration = {"status": info.get("status"), "total-time": info.get("total-time"),
                         "downtime": info.get("downtime"), **{k: (info.get("ram") or {}).get(k) for k in
                         ("dirty-sync-count", "transferred", "normal", "duplicate")}}
        if info.get("status") != "completed":
            raise RuntimeError(f"migration {info.get('status')}: {info.get('error-desc', '')}")
        src.wait_status("postmigrate", 10)
        dst.wait_status("paused", 30)   # -S: the destination stays paused after the incoming migration
        if tap is not None:
            res.tap_exit = tap.wait()
        res.probe_exit = probe.stop()
        t_mem = time.monotonic()
        a = memcheck.dump(src, workdir / "src.ram", MEM_MB)
        b = memcheck.dump(dst, workdir / "dst.ram", MEM_MB)
        # The source stops mid-print, cutting its log; the resumed destination prints the rest.
        dst.cmd("cont")
        log = read_log(src.serial, dst.serial, wait_s=3)
        res.mem = memcheck.compare(a, b, log)
        del a, b
        res.timings["memcheck"] = time.monotonic() - t_mem
        starts = log.of("start")
        res.guest = {"cmd_ids": len(starts), "rounds": len({s["round"] for s in starts}),
                     "bg_stop": bool(log.of("bg_stop")), "used_timeouts": len(log.of("used_timeout")),
                     "error": log.error(), "bad_lines": log.bad_lines}
    finally:
        for v in (src, dst):
            v.stop()
        if tap is not None and tap.proc.poll() is None:
            res.tap_exit = tap.wait(5)
        if probe is not None and probe.proc.poll() is None:
            res.probe_exit = probe.stop()
    t_an = time.monotonic()
    res.analyze_exit, doc, res.analyze_error = tools.analyze(res.bundle, fail_on="hazard")
    if doc is not None:
        res.verdict, res.findings = tools.verdict_and_findings(doc)
    res.timings["analyze"] = time.monotonic() - t_an
    res.timings["total"] = time.monotonic() - t0
    return res


# ---- with the tap: were the hinted pages sent again after their apply? ------------------------
def applies(bundle: Path) -> list[tuple[int, int, int]]:
    """(first gfn, pages, return time ns) of every hint apply the probe saw (qemu_events), the HVA
    mapped to a gfn through the probe's memslots table."""
    from hintscope.bundle import Bundle

    b = Bundle.open(bundle)
    ev = b.table("qemu_events").sort_values("ts_ns", kind="stable")
    slots = b.table("memslots")
    slots = slots[slots["size"] > 0]
    out = []
    pending: dict[int, tuple[int, int]] = {}
    for r in ev.itertuples(index=False):
        if r.event == "hint_apply":
            pending[int(r.tid)] = (int(r.a0), int(r.a1))
        elif r.event == "hint_apply_ret" and int(r.tid) in pending:
            hva, n = pending.pop(int(r.tid))
            s = slots[(slots["hva"] <= hva) & (hva < slots["hva"] + slots["size"])]
            if len(s):
                s = s.iloc[-1]
                out.append(((int(s["gpa"]) + hva - int(s["hva"])) >> 12, n >> 12, int(r.ts_ns)))
    return out


def resent_after_apply(res: Result) -> dict[str, Any]:
    """Pages of applied hints that the tap saw sent after the apply returned, excluding pages the
    guest wrote after hinting them and whose write reached the destination (those must be sent)."""
    from hintscope.bundle import Bundle

    assert res.tap_bundle is not None and res.mem is not None
    sends = Bundle.open(res.tap_bundle).table("page_sends")
    sends = sends[sends["block"] == "pc.ram"]
    kept = set(res.mem.written_after_hint) - set(res.mem.lost)
    first = (sends["offset"].to_numpy(np.int64) >> 12)
    last = first + sends["npages"].to_numpy(np.int64)
    start = sends["ts_ns"].to_numpy(np.int64)
    bad: set[int] = set()
    checked = 0
    aps = applies(res.bundle)
    for gfn, n, ret_ns in aps:
        sel = (start > ret_ns) & (first < gfn + n) & (last > gfn)
        for f, l in zip(first[sel], last[sel]):
            bad.update(g for g in range(max(int(f), gfn), min(int(l), gfn + n)) if g not in kept)
        checked += n
    lost_sent = sorted(set(res.mem.lost) & bad)
    return {"applies": len(aps), "pages_checked": checked, "send_rows": len(sends),
            "resent": sorted(bad), "lost_resent": lost_sent}
