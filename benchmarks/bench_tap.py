#!/usr/bin/env python3
"""Cost of recording page sends on a real KVM migration: no tap vs ``hintscope tap`` vs the host probe's
``--page-sends`` uprobe, interleaved in one run.

Each run boots a fresh source and destination QEMU (bare-metal dirtier guest, ``--mem`` MiB) with plain
argv, lets the guest write every page from 4 MiB to the top of RAM once (``rounds=1 rate=0``, so the bulk
pass carries real pages, not zero pages), then migrates over a unix socket with max-bandwidth unlimited:
  * none:   source -> destination directly;
  * tap:    source -> ``hintscope tap`` -> destination (the tap and its decoder process run meanwhile);
  * uprobe: direct, with ``hintscope probe host --pid SRC --page-sends`` attached to the source.
Measured: QMP ``total-time`` (ms) and the wall time from ``migrate`` to ``completed`` (polled every 10 ms).
The modes rotate within each repetition so drifts of the other tenants' load hit all of them; ratios are
per repetition against that repetition's no-tap run, then the median.

    benchmarks/bench_tap.py                       # 5 repetitions, 1 GiB guest, QEMU 7.2, all three modes
    benchmarks/bench_tap.py --quick               # 1 repetition, 128 MiB, none + tap
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as B  # noqa: E402

from qemu.qmp.legacy import QEMUMonitorProtocol  # noqa: E402

from hintscope.bundle import read_bundle  # noqa: E402
from hintscope.lab import build  # noqa: E402
from hintscope.lab.qemu import QemuConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QEMU_L = {"/opt/hintscope/qemu-bpo/usr/bin/qemu-system-x86_64":
          ["-L", "/opt/hintscope/qemu-bpo/usr/share/qemu", "-L", "/usr/share/qemu", "-L", "/usr/share/seabios"]}


def qmp(path: Path, timeout: float = 30) -> QEMUMonitorProtocol:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"QEMU never created {path}")
        time.sleep(0.05)
    m = QEMUMonitorProtocol(str(path))
    m.connect()
    m.settimeout(timeout)
    return m


def wait_serial(path: Path, needle: bytes, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while needle not in (text := path.read_bytes()):
        if b"DIRTIER error" in text:
            raise RuntimeError(f"{path}: {text[text.index(b'DIRTIER error'):][:200]!r}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path}: no {needle!r} within {timeout:.0f} s")
        time.sleep(0.1)


def one_run(mode: str, qemu: str, mem_mb: int, work: Path, k: int) -> dict:
    d = work / f"{k:02d}-{mode}"
    d.mkdir()
    elf = build.build_guest("dirtier")
    # the top 1 MiB is left out: the BIOS keeps a little of it, and the dirtier refuses pages it does not own
    append = f"pages=0x400-0x{(mem_mb << 8) - 0x101:x} rate=0 rounds=1 log_ms=250"
    common = dict(workdir=d, qemu=qemu, accel="kvm", mem_mb=mem_mb, kernel=str(elf), append=append,
                  extra=QEMU_L.get(qemu, []))
    src_cfg, dst_cfg = QemuConfig(name="src", **common), QemuConfig(name="dst", incoming=f"unix:{d}/dst.sock", **common)
    procs: list[subprocess.Popen] = []
    res: dict = {"mode": mode, "rep": k}
    try:
        for cfg in (src_cfg, dst_cfg):
            procs.append(subprocess.Popen(cfg.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        ms, md = qmp(src_cfg.qmp_path), qmp(dst_cfg.qmp_path)
        wait_serial(src_cfg.serial_path, b"DIRTIER done", 120)
        uri = f"unix:{d}/dst.sock"
        helper = None
        if mode == "tap":
            uri = f"unix:{d}/tap.sock"
            helper = subprocess.Popen([sys.executable, "-m", "hintscope", "tap", "--listen", uri, "--forward",
                                       f"unix:{d}/dst.sock", "-o", str(d / "bundle")], cwd=ROOT,
                                      stdout=subprocess.PIPE, text=True)
            line = helper.stdout.readline()
            if not line.startswith("tap: listening"):
                raise RuntimeError(f"tap did not start: {line!r}")
        elif mode == "uprobe":
            helper = subprocess.Popen([sys.executable, "-m", "hintscope", "probe", "host", "--pid", str(procs[0].pid),
                                       "--page-sends", "-o", str(d / "bundle")], cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            t0 = time.monotonic()
            while not (line := helper.stdout.readline()).startswith("ATTACHED"):
                if not line or time.monotonic() - t0 > 180:
                    raise RuntimeError("host probe did not attach")
        ms.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40, "downtime-limit": 300})
        t0 = time.monotonic()
        ms.cmd("migrate", uri=uri)
        while (info := ms.cmd("query-migrate"))["status"] not in ("completed", "failed", "cancelled"):
            time.sleep(0.01)
        res["wall_ms"] = (time.monotonic() - t0) * 1000
        res["status"] = info["status"]
        res["total_time_ms"] = info.get("total-time")
        res["downtime_ms"] = info.get("downtime")
        ram = info.get("ram", {})
        res["normal"], res["duplicate"], res["transferred"] = ram.get("normal"), ram.get("duplicate"), ram.get("transferred")
        if helper is not None:
            if mode == "uprobe":
                helper.send_signal(signal.SIGINT)
            t1 = time.monotonic()
            helper.communicate(timeout=300)
            res["helper_exit_lag_ms"] = (time.monotonic() - t1) * 1000
            b = read_bundle(d / "bundle")
            if mode == "tap":
                src = b.meta["sources"]["tap"]
                res["tap_status"] = src["status"]
                res["tap_pages"] = src["decoder"]["pages"]
                res["tap_rows"] = b.meta["rows"].get("page_sends", 0)
                res["tap_max_backlog_bytes"] = src["proxy"]["max_backlog_bytes"]
                res["tap_copied_bytes"] = src["proxy"].get("copied_bytes")
                res["tap_cpu_s"] = {"proxy": src["proxy"].get("cpu_s"), "decoder": src["decoder"].get("cpu_s")}
            else:
                ev = b.table("qemu_events") if b.has("qemu_events") else None
                res["uprobe_page_sends"] = int((ev["event"] == "page_send").sum()) if ev is not None else 0
                res["uprobe_lost"] = b.meta.get("lost", {})
        ms.close()
        md.close()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(d, ignore_errors=True)
    return res


def valid(r: dict, metric: str) -> float | None:
    """QEMU sometimes reports total-time 0 for a completed migration: not a measurement."""
    v = r.get(metric)
    return float(v) if r.get("status") == "completed" and v else None


def aggregate(res: dict) -> None:
    """Per-repetition ratios against that repetition's no-tap run, then median (min-max); prints the table."""
    runs, modes = res["runs"], res["modes"]
    by = {m: [r for r in runs if r["mode"] == m] for m in modes}
    ratios: dict[str, dict] = {}
    for m in modes:
        for metric in ("total_time_ms", "wall_ms"):
            xs = []
            for base in by.get("none", []):
                cur = next((r for r in by[m] if r["rep"] == base["rep"]), None)
                if cur and valid(base, metric) and valid(cur, metric):
                    xs.append(valid(cur, metric) / valid(base, metric))
            ratios.setdefault(m, {})[metric] = B.summary(xs)
    rows = []
    for m in modes:
        rows.append([m, B.fmt(B.summary([valid(r, "total_time_ms") for r in by[m]]), digits=4),
                     B.fmt(B.summary([valid(r, "wall_ms") for r in by[m]]), digits=4),
                     B.fmt(ratios[m]["total_time_ms"]), B.fmt(ratios[m]["wall_ms"])])
    print(B.table(rows, ["mode", "total-time ms", "wall ms", "ratio total-time", "ratio wall"]))
    res["ratios_vs_none"] = ratios
    res["all_tap_captured"] = all(r.get("tap_status") == "captured" for r in by.get("tap", []))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--mem", type=int, default=1024, metavar="MB")
    ap.add_argument("--qemu", default="/usr/bin/qemu-system-x86_64")
    ap.add_argument("--modes", default="none,tap,uprobe")
    ap.add_argument("--quick", action="store_true", help="1 repetition, 128 MiB, none + tap")
    ap.add_argument("-o", "--output", default=None)
    ap.add_argument("--aggregate", metavar="JSON", help="only recompute the ratios of an earlier result file")
    a = ap.parse_args()
    if a.aggregate:
        res = json.loads(Path(a.aggregate).read_text())
        aggregate(res)
        Path(a.aggregate).write_text(json.dumps(res, indent=1, default=str) + "\n")
        return 0
    if a.quick:
        a.reps, a.mem, a.modes = 1, 128, "none,tap"
    modes = a.modes.split(",")
    work = Path(tempfile.mkdtemp(prefix="hs-bench-tap-", dir="/tmp"))
    runs: list[dict] = []
    try:
        for k in range(a.reps):
            order = modes[k % len(modes):] + modes[:k % len(modes)]
            for mode in order:
                r = one_run(mode, a.qemu, a.mem, work, k)
                print(json.dumps(r), flush=True)
                runs.append(r)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {"bench": "tap", "qemu": a.qemu, "mem_mb": a.mem, "reps": a.reps, "modes": modes, "runs": runs}
    aggregate(res)
    B.write("bench_tap_quick" if a.quick else "bench_tap", res, a.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
