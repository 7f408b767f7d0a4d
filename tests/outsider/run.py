"""One outsider migration end to end: boot both QEMUs, attach the probe (and the tap), migrate over
QMP, compare memory, analyze the probe's bundle."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
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

    def gfns(self, kind: str, confidence: str | None = None) -> set[int] | None:
        """Every gfn the findings of that kind name, or None when a finding's list was capped."""
        out: set[int] = set()
        for f in self.by_kind(kind, confidence):
            g = f.get("gfns") or []
            if len(g) != int(f.get("gfn_count") or 0):
                return None
            out.update(int(x) for x in g)
        return out

    def pages(self, kind: str, confidence: str | None = None) -> int:
        return sum(int(f.get("gfn_count") or 0) for f in self.by_kind(kind, confidence))

    def dump(self) -> dict[str, Any]:
        """Everything a report needs, JSON-ready."""
        return {**self.row(), "mem": self.mem.summary() if self.mem else None,
                "lost_gfns": self.mem.lost if self.mem else None, "migration": self.migration,
                "guest": self.guest, "probe_exit": self.probe_exit, "tap_exit": self.tap_exit,
                "analyze_error": self.analyze_error, "timings_s": {k: round(v, 2) for k, v in self.timings.items()},
                "findings": [{k: f.get(k) for k in ("kind", "confidence", "gfn_count", "gfn_first", "gfn_last")}
                             for f in self.findings], "workdir": str(self.workdir)}

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


@dataclass
class Live:
    """A scenario booted and waiting: source paused at the guest's `ready`, probe attached, tap listening."""
    res: Result
    src: VM
    dst: VM
    probe: tools.Probe | None = None
    tap: tools.Tap | None = None
    uri: str = ""
    t0: float = 0.0
    closed: threading.Event = field(default_factory=threading.Event)

    def mark(self, name: str) -> None:
        self.res.timings[name] = time.monotonic() - self.t0

    def close(self) -> None:
        if self.closed.is_set():
            return
        for v in (self.src, self.dst):
            v.stop()
        if self.tap is not None:
            self.res.tap_exit = self.tap.wait(30)
        if self.probe is not None:
            self.res.probe_exit = self.probe.stop()
        self.mark("stopped")
        self.closed.set()


def prepare(sc: Scenario, workdir: Path, kernel: Path) -> Live:
    """Boots both QEMUs and attaches the tools. The source is paused once its guest is ready (no
    cmd id has been issued yet: that needs a migration), so a run can be booted while another one
    is being checked, and the migration itself still runs alone."""
    workdir.mkdir(parents=True, exist_ok=True)
    res = Result(sc, workdir, workdir / "probe.bundle")
    append = guest_append(sc.behaviour, sc.stale)
    dst_sock, tap_sock = workdir / "dst.sock", workdir / "tap.sock"
    live = Live(res, VM("src", workdir, sc.version, kernel, append, sc.dirty_ring),
                VM("dst", workdir, sc.version, kernel, append, sc.dirty_ring, incoming=f"unix:{dst_sock}"),
                uri=f"unix:{dst_sock}", t0=time.monotonic())
    try:
        live.src.start()
        # the probe's BCC compile and the tap's start overlap the guest's boot
        live.probe = tools.Probe(live.src.pid, res.bundle, workdir / "probe.log")
        live.dst.start()
        if sc.tap:
            live.probe.wait_bundle()   # the tap joins the probe's bundle (--append)
            res.tap_bundle = res.bundle
            live.tap = tools.Tap(tap_sock, dst_sock, res.bundle, workdir / "tap.log")
            live.uri = f"unix:{tap_sock}"
        wait_serial(live.src.serial, r"^HG t=\d+ ev=ready", 120)
        live.src.cmd("stop")
        live.mark("guest_ready")
        live.probe.wait_attached()
        live.mark("probe_attached")
        if live.tap is not None:
            live.tap.wait_listening()
            live.mark("tap_listening")
    except BaseException:
        live.close()
        raise
    return live


def migrate(live: Live) -> None:
    """Resumes the source and migrates it; the destination ends paused (-S)."""
    res, src, dst = live.res, live.src, live.dst
    try:
        src.cmd("cont")
        t_mig = time.monotonic()
        info = _migrate(src, live.uri, res.scenario)
        res.timings["migrate"] = time.monotonic() - t_mig
        res.migration = {"status": info.get("status"), "total-time": info.get("total-time"),
                         "downtime": info.get("downtime"), **{k: (info.get("ram") or {}).get(k) for k in
                         ("dirty-sync-count", "transferred", "normal", "duplicate")}}
        if info.get("status") != "completed":
            raise RuntimeError(f"migration {info.get('status')}: {info.get('error-desc', '')}")
        src.wait_status("postmigrate", 10)
        dst.wait_status("paused", 30)
        assert live.probe is not None
        live.probe.interrupt()   # it writes its last rows while the memory is compared
    except BaseException:
        live.close()
        raise


def check(live: Live) -> Result:
    """Memory check, then stop everything and analyze the bundle."""
    res, src, dst, workdir = live.res, live.src, live.dst, live.res.workdir
    try:
        t_mem = time.monotonic()
        scratch = memcheck.scratch_dir(workdir)
        a = memcheck.dump(src, scratch / f"{workdir.name}-src.ram", MEM_MB)
        b = memcheck.dump(dst, scratch / f"{workdir.name}-dst.ram", MEM_MB)
        # The source stops mid-print, cutting its log; the resumed destination prints the rest.
        dst.cmd("cont")
        log = read_log(src.serial, dst.serial, wait_s=8)
        res.mem = memcheck.compare(a, b, log)
        del a, b
        res.timings["memcheck"] = time.monotonic() - t_mem
        starts = log.of("start")
        res.guest = {"cmd_ids": len(starts), "rounds": len({s["round"] for s in starts}),
                     "bg_stop": bool(log.of("bg_stop")), "used_timeouts": len(log.of("used_timeout")),
                     "error": log.error(), "bad_lines": log.bad_lines}
    finally:
        live.close()
    t_an = time.monotonic()
    res.analyze_exit, doc, res.analyze_error = tools.analyze(res.bundle, fail_on="hazard")
    if doc is not None:
        res.verdict, res.findings = tools.verdict_and_findings(doc)
    res.timings["analyze"] = time.monotonic() - t_an
    live.mark("total")
    (workdir / "result.json").write_text(json.dumps(res.dump(), indent=1, default=str))
    return res


def run(sc: Scenario, workdir: Path, kernel: Path) -> Result:
    live = prepare(sc, workdir, kernel)
    migrate(live)
    return check(live)


def run_many(jobs: list[tuple[Scenario, Path]], kernel: Path) -> Iterator[tuple[Scenario, Result | BaseException]]:
    """Runs the scenarios in order, booting each next one while the previous one is checked and
    analyzed (both are CPU-bound waits on this host; the migrations never overlap). Yields each
    scenario with its Result or the exception that ended it."""
    def boot(i: int) -> tuple[threading.Thread, list]:
        box: list = []
        sc, wd = jobs[i]

        def go() -> None:
            try:
                live = prepare(sc, wd, kernel)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                box.append(e)
                return
            box.append(live)
            # QEMU dies with the thread that started it (PR_SET_PDEATHSIG): stay until it is closed
            live.closed.wait()
        t = threading.Thread(target=go, name=f"boot-{sc.label}", daemon=True)
        t.start()
        return t, box

    def ready(pending: tuple[threading.Thread, list]) -> "Live | BaseException":
        t, box = pending
        while not box:
            t.join(0.1)
        return box[0]

    if not jobs:
        return
    pending: tuple[threading.Thread, list] | None = boot(0)
    try:
        for i, (sc, _wd) in enumerate(jobs):
            assert pending is not None
            live = ready(pending)
            pending = None
            if isinstance(live, BaseException):
                pending = boot(i + 1) if i + 1 < len(jobs) else None
                yield sc, live
                continue
            try:
                migrate(live)
            except BaseException as e:  # noqa: BLE001
                pending = boot(i + 1) if i + 1 < len(jobs) else None
                yield sc, e
                continue
            pending = boot(i + 1) if i + 1 < len(jobs) else None
            try:
                res: Result | BaseException = check(live)
            except BaseException as e:  # noqa: BLE001
                res = e
            yield sc, res
    finally:
        if pending is not None:   # the consumer stopped early: do not leave a booted pair behind
            live = ready(pending)
            if isinstance(live, Live):
                live.close()


# ---- with the tap: were the hinted pages sent again after their apply? ------------------------
def applies(bundle: Path) -> list[tuple[int, int, int]]:
    """(first gfn, pages, return time ns) of every hint apply the probe saw (qemu_events), the HVA
    mapped to a gfn through the probe's memslots table."""
    from hintscope.bundle import read_bundle

    b = read_bundle(bundle)
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


def harvested_after(bundle: Path) -> dict[int, np.ndarray]:
    """gfn -> sorted times (ns) at which a KVM_GET_DIRTY_LOG reported it dirty (probe's bitmap_words)."""
    from hintscope.analysis.harvest import unrun
    from hintscope.bundle import read_bundle

    b = read_bundle(bundle)
    w = b.table("bitmap_words")
    w = unrun(w[w["op"] == "get"])     # schema 2: a row may stand for a run of equal words
    slots = b.table("memslots")
    base = {int(r.slot) | int(r.as_id) << 16: int(r.gpa) >> 12 for r in slots.itertuples(index=False) if r.size}
    out: dict[int, list[int]] = {}
    for r in w.itertuples(index=False):
        if int(r.slot) not in base:
            continue
        m = int(r.mask)
        first = base[int(r.slot)] + int(r.word) * 64
        while m:
            bit = (m & -m).bit_length() - 1
            out.setdefault(first + bit, []).append(int(r.ts_ns))
            m &= m - 1
    return {g: np.sort(np.array(t, np.int64)) for g, t in out.items()}


def resent_after_apply(res: Result) -> dict[str, Any]:
    """Pages of applied hints that the tap saw sent (a RAM page or zero-page record) after the apply
    returned. A send is explained when the guest wrote the page after hinting it and the write
    reached the destination, or when a KVM_GET_DIRTY_LOG after the apply reported the page dirty
    (written between the sync that issued the cmd id and the hint: QEMU's apply clears only the bits
    that sync fetched). Anything else would be a hinted page sent again for no reason.
    lost_resent: pages the memory check found lost although the tap saw them sent after the apply."""
    from hintscope.bundle import read_bundle

    assert res.tap_bundle is not None and res.mem is not None
    sends = read_bundle(res.tap_bundle).table("page_sends")
    sends = sends[(sends["block"] == "pc.ram") & sends["sent"].astype(bool)]
    kept = set(res.mem.written_after_hint) - set(res.mem.lost)
    first = (sends["offset"].to_numpy(np.int64) >> 12)
    last = first + sends["npages"].to_numpy(np.int64)
    start = sends["ts_ns"].to_numpy(np.int64)
    harvest = harvested_after(res.bundle)
    resent: set[int] = set()
    unexplained: set[int] = set()
    checked = 0
    aps = applies(res.bundle)
    for gfn, n, ret_ns in aps:
        sel = (start > ret_ns) & (first < gfn + n) & (last > gfn)
        for f, l in zip(first[sel], last[sel]):
            for g in range(max(int(f), gfn), min(int(l), gfn + n)):
                resent.add(g)
                t = harvest.get(g)
                if g not in kept and (t is None or t[-1] <= ret_ns):
                    unexplained.add(g)
        checked += n
    return {"applies": len(aps), "pages_checked": checked, "send_rows": len(sends),
            "resent": sorted(resent), "unexplained": sorted(unexplained),
            "lost_resent": sorted(set(res.mem.lost) & resent)}
