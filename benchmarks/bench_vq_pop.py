#!/usr/bin/env python3
"""Cost of the host probe's virtqueue_pop uprobe pair per call, as a ratio to the bare call.

Source: ``benchmarks/src/vq_pop_loop.c`` (compiled here), a process that exports its own
``virtqueue_pop`` (in .dynsym, QEMU's VirtQueueElement layout) and calls it N times per request,
returning an element of one of three shapes: ``cmd`` and ``hint`` (the free page vq's two shapes:
the probe emits a record) and ``other`` (dropped by the BPF shape filter: what every other virtio
device's pops cost).  Three builds of the stand-in (BUILDS below) show where the cost comes from:
the probed instruction, emulated by the kernel or single-stepped.  Per repetition: the three
shapes without the probe, then the same with ``HostProbe(pid, qemu="on")`` attached (entry
uprobe + uretprobe), then the probe stops; the bundle's vq_pop_* row counts are checked against
the calls made.

    benchmarks/bench_vq_pop.py            # 3 reps, 20000 probed calls per shape
    benchmarks/bench_vq_pop.py --quick    # 1 rep, 2000 calls
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as B  # noqa: E402

from hintscope.bundle import read_bundle  # noqa: E402
from hintscope.probes.host import HostProbe  # noqa: E402

HERE = Path(__file__).resolve().parent
SHAPES = ("cmd", "hint", "other")
EVENT = {"cmd": "vq_pop_cmd", "hint": "vq_pop_hint", "other": None}
BASE_CALLS = 2_000_000   # the bare call is a few ns: many calls for a stable figure


# The stand-in's virtqueue_pop (vq_pop_loop.c): QEMU's dispatcher code, which the probe attaches at its
# tail jumps (emulated jmp: what runs on QEMU 7.2/10.0); QEMU's first instruction probed at the entry
# (movabs, single-stepped: what a probe at virtqueue_pop's entry would cost); a push probed at the entry
# (emulated, like qemu_guest_free_page_hint's first instruction).
BUILDS = {"qemu-dispatch": ["-DQEMU_DISPATCH"], "movabs-entry": [], "push-entry": ["-DPUSH_FIRST"]}


def build(work: Path, kind: str) -> Path:
    exe = work / f"vq_pop_loop-{kind}"
    subprocess.run(["gcc", "-O2", "-rdynamic", *BUILDS[kind], "-o", str(exe), str(HERE / "src" / "vq_pop_loop.c")],
                   check=True)
    return exe


def measure(src: subprocess.Popen, shape: str, n: int) -> float:
    src.stdin.write(f"{shape} {n}\n")
    src.stdin.flush()
    line = src.stdout.readline()
    assert line.startswith("ns_per_call="), line
    return float(line.split("=", 1)[1])


def run(reps: int, calls: int, work: Path, kind: str) -> dict:
    exe = build(work, kind)
    src = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = src.stdout.readline()
        assert line.startswith("READY") and "kvm=1" in line, line
        base: dict[str, list[float]] = {s: [] for s in SHAPES}
        probed: dict[str, list[float]] = {s: [] for s in SHAPES}
        counts = []
        for k in range(reps):
            for s in SHAPES:
                base[s].append(measure(src, s, BASE_CALLS))
            p = HostProbe(src.pid, work / f"{kind}-{k}", qemu="on")
            p.start()
            try:
                for s in SHAPES:
                    probed[s].append(measure(src, s, calls))
                    p.poll()
                time.sleep(0.1)
            finally:
                p.stop("sigint")
            b = read_bundle(work / f"{kind}-{k}")
            qe = b.table("qemu_events")
            got = {s: int((qe["event"] == EVENT[s]).sum()) if EVENT[s] else
                   int(qe["event"].isin(["vq_pop_cmd", "vq_pop_hint"]).sum()) - 2 * calls for s in SHAPES}
            counts.append({"rows": got, "lost": b.meta.get("lost") or {},
                           "sites": b.meta["sources"]["qemu_uprobes"].get("vq_pop_sites"),
                           "symbols": {k2: v for k2, v in b.meta["sources"]["qemu_uprobes"]["symbols"].items()
                                       if k2.startswith("virtqueue_pop")}})
            # every probed call of a free-page shape is one row; the other shape none
            assert got == {"cmd": calls, "hint": calls, "other": 0}, got
    finally:
        src.stdin.close()
        src.wait(timeout=30)
    res = {"reps": reps, "calls_probed": calls, "calls_base": BASE_CALLS, "shapes": {}, "counts": counts}
    for s in SHAPES:
        bs, ps = B.summary(base[s]), B.summary(probed[s])
        res["shapes"][s] = {"base_ns": bs, "probed_ns": ps,
                            "added_us": (ps["median"] - bs["median"]) / 1e3,
                            "ratio": ps["median"] / bs["median"]}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--calls", type=int, default=20_000)
    ap.add_argument("--builds", default=",".join(BUILDS), help=f"comma list of {', '.join(BUILDS)}")
    ap.add_argument("-o", "--output")
    a = ap.parse_args(argv)
    builds = a.builds.split(",")
    if not set(builds) <= set(BUILDS):
        ap.error(f"--builds {a.builds}: expected names from {', '.join(BUILDS)}")
    reps, calls = (1, 2_000) if a.quick else (a.reps, a.calls)
    with tempfile.TemporaryDirectory(prefix="hs-bench-vq-") as d:
        res = {"builds": {kind: run(reps, calls, Path(d), kind) for kind in builds}}
    res["machine"] = B.machine()
    print(f"virtqueue_pop uprobe pair, {reps} rep(s), {calls} probed calls per shape (median (min-max)):")
    print(f"{'stand-in':13s} {'shape':6s} {'bare ns/call':>22s} {'probed us/call':>24s} {'added us':>9s} "
          f"{'ratio':>8s}")
    for kind, rb in res["builds"].items():
        for s, r in rb["shapes"].items():
            print(f"{kind:13s} {s:6s} {B.fmt(r['base_ns']):>22s} {B.fmt(r['probed_ns'], 1e-3):>24s} "
                  f"{r['added_us']:9.2f} {r['ratio']:8.0f}")
    out = Path(a.output) if a.output else B.RESULTS / ("bench_vq_pop_quick.json" if a.quick else "bench_vq_pop.json")
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
