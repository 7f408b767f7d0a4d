#!/usr/bin/env python3
"""Capture capacity: events/s a tracer keeps with zero loss, and what its consumer costs in CPU.

Source: ``benchmarks/src/ioctl_loop.c`` (compiled here), a process with one KVM VM issuing
KVM_RESET_DIRTY_RINGS in a loop at a set rate (or flat out).  Every call is one event on
``syscalls:sys_exit_ioctl`` (the host probe also uses sys_enter), and the loop's own call count is
the ground truth.  Tracers, each on the same source and alternating order per repetition:

* ``hintscope``: ``python -m hintscope probe host --pid P`` (BPF ring buffer, bulk numpy decode,
  Parquet bundle);
* ``bpftrace``: ``tracepoint:syscalls:sys_exit_ioctl /pid == P && args->ret == -22/ { printf(...) }`` to a
  file (per-event output through its perf buffer; the ret filter drops the loop's one KVM_CREATE_VM);
* ``perf``: ``perf record -e syscalls:sys_exit_ioctl --filter 'ret == -22' -p P`` (per-CPU perf ring,
  raw samples to perf.data);
* ``none``: the loop alone (its achieved rate is the producer's ceiling).

Per run: events seen / calls made, lost events as the tool reports them, achieved producer rate,
consumer CPU seconds (utime+stime from ``wait4`` rusage minus the reading at attach time) per
second of capture and per million events.

    benchmarks/bench_capture.py                       # rates 50k,150k,max; 3 reps; 3 s each
    benchmarks/bench_capture.py --quick               # 30k/s, 1 s, 1 rep
    benchmarks/bench_capture.py --overload            # --ring-mb 1, flat out: what loss looks like
    benchmarks/bench_capture.py --load 2 --rates 150000,0 --tools hintscope,perf,none \
        --ring-sweep 1,4,16,64 -o benchmarks/results/bench_capture_load.json
                                                      # while 2 busy processes load both cores, plus
                                                      # loss per BPF ring size and rate (hintscope only)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as B  # noqa: E402

from hintscope.bundle import read_bundle  # noqa: E402

HERE = Path(__file__).resolve().parent
PY = sys.executable


def build(work: Path) -> Path:
    exe = work / "ioctl_loop"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(HERE / "src" / "ioctl_loop.c")], check=True)
    return exe


def wait_for(pred, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = pred()
        if r:
            return r
        time.sleep(0.05)
    raise RuntimeError(f"timeout waiting for {what}")


def reap(p: subprocess.Popen, sig=signal.SIGINT, timeout=60.0) -> float:
    """Stop a tracer and return its total CPU seconds (rusage)."""
    # not p.poll(): it would reap the child and lose its rusage
    try:
        os.kill(p.pid, sig)
    except ProcessLookupError:
        pass
    end = time.monotonic() + timeout
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            return ru.ru_utime + ru.ru_stime
        if time.monotonic() > end:
            p.kill()
        time.sleep(0.05)


def run_one(tool: str, exe: Path, work: Path, secs: float, rate: int, ring_mb: int, k: int) -> dict:
    go = work / f"go-{k}"
    src = subprocess.Popen([str(exe), str(secs), str(rate), str(go)], stdout=subprocess.PIPE, text=True)
    line = src.stdout.readline()
    assert line.startswith("READY"), line
    pid = src.pid
    out = work / f"{tool}-{k}"
    tr = None
    log = open(work / f"{tool}-{k}.log", "w")
    if tool == "hintscope":
        tr = subprocess.Popen([PY, "-m", "hintscope", "probe", "host", "--pid", str(pid), "-o", str(out),
                               "--ring-mb", str(ring_mb), "--qemu", "off"],
                              stdout=subprocess.PIPE, stderr=log, text=True)
        assert tr.stdout.readline().strip() == "ATTACHED"
    elif tool == "bpftrace":
        prog = ('BEGIN { printf("BEGIN\\n"); } tracepoint:syscalls:sys_exit_ioctl /pid == %d && args->ret == -22/ '
                '{ printf("%%d %%d %%llu\\n", tid, args->ret, nsecs); }' % pid)
        tr = subprocess.Popen(["bpftrace", "-e", prog], stdout=open(out, "w"), stderr=log)
        wait_for(lambda: out.exists() and "BEGIN\n" in out.read_text(errors="replace"), 60, "bpftrace BEGIN")
    elif tool == "perf":
        tr = subprocess.Popen(["perf", "record", "-q", "-e", "syscalls:sys_exit_ioctl", "--filter", "ret == -22", "-p", str(pid), "-o", str(out)],
                              stdout=log, stderr=log)
        time.sleep(3.0)   # perf prints nothing once attached; at load ~9, 1.5 s was sometimes too short
    cpu0 = B.cpu_s(tr.pid) if tr else 0.0
    go.touch()
    o, _ = src.communicate(timeout=secs + 60)
    m = re.search(r"DONE calls=(\d+) seconds=([\d.]+)", o)
    calls, dur = int(m.group(1)), float(m.group(2))
    r = {"tool": tool, "rate_target": rate, "calls": calls, "seconds": dur, "producer_rate": calls / dur}
    if tr is None:
        return r
    time.sleep(0.3)   # the probe/bpftrace poll periodically: let them take the tail
    cpu = reap(tr) - cpu0
    log.close()
    logtext = (work / f"{tool}-{k}.log").read_text(errors="replace")
    if tool == "hintscope":
        b = read_bundle(out)
        io = b.table("ioctls")
        seen = int((io["name"] == "RESET_DIRTY_RINGS").sum()) if len(io) else 0
        lost = int((b.meta.get("lost") or {}).get("host_ioctl", 0))
        r["meta_lost"] = b.meta.get("lost")
        r["decode_rate_per_s"] = (b.meta.get("host_probe") or {}).get("decode_rate_per_s")
        r["writer"] = (b.meta.get("host_probe") or {}).get("writer")
    elif tool == "bpftrace":
        text = out.read_text(errors="replace")
        seen = sum(1 for l in text.splitlines() if l[:1].isdigit())
        lost = sum(int(x) for x in re.findall(r"Lost (\d+) events", text + logtext))
    else:
        rep = subprocess.run(["perf", "report", "-i", str(out), "--stats"], capture_output=True, text=True)
        st = rep.stdout
        sm = re.search(r"SAMPLE events:\s+(\d+)", st)
        if sm:
            seen = int(sm.group(1))
        else:   # --stats output differs on some files: count the samples themselves
            r["perf_report_stats"] = (st + rep.stderr)[-800:]
            sc = subprocess.run(["perf", "script", "-i", str(out), "-F", "tid"], capture_output=True, text=True)
            seen = sum(1 for l in sc.stdout.splitlines() if l.strip()[:1].isdigit())
        lm = re.search(r"LOST events:\s+(\d+)", st)
        ls = re.search(r"LOST_SAMPLES events:\s+(\d+)", st)
        # PERF_RECORD_LOST records each carry a count of lost samples: read them from the raw dump.
        lost = 0
        if lm and int(lm.group(1)):
            dump = subprocess.run(["perf", "script", "-i", str(out), "--show-lost-events", "-F", "event"],
                                  capture_output=True, text=True).stdout
            lost = sum(int(x) for x in re.findall(r"LOST (\d+)", dump)) or int(lm.group(1))
        r["perf_lost_records"] = int(lm.group(1)) if lm else 0
        r["perf_lost_samples_records"] = int(ls.group(1)) if ls else 0
    r.update({"seen": seen, "lost_reported": lost, "missing": calls - seen, "consumer_cpu_s": round(cpu, 3),
              "consumer_cpu_per_s": cpu / dur, "consumer_cpu_s_per_M": cpu / max(seen, 1) * 1e6,
              "out_bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.is_dir() else out.stat().st_size})
    shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
    return r


def start_load(n: int) -> tuple[list[subprocess.Popen], str]:
    """n CPU-bound processes competing with the tracer at normal priority."""
    if n <= 0:
        return [], "none"
    if shutil.which("stress-ng"):
        return [subprocess.Popen(["stress-ng", "--cpu", str(n), "--quiet"])], f"stress-ng --cpu {n}"
    return ([subprocess.Popen([PY, "-c", "while 1: pass"]) for _ in range(n)],
            f"{n} x python -c 'while 1: pass' (stress-ng not installed)")


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--overload", action="store_true", help="hintscope only, --ring-mb 1, flat out")
    ap.add_argument("--rates", default="50000,150000,0", help="calls/s, 0 = flat out")
    ap.add_argument("--tools", default="hintscope,bpftrace,perf,none")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ring-mb", type=int, default=16)
    ap.add_argument("--load", type=int, default=0, metavar="N",
                    help="run N CPU-bound processes for the whole benchmark (stress-ng --cpu N, else N python loops)")
    ap.add_argument("--ring-sweep", default="", metavar="MB,..",
                    help="then hintscope alone at every rate with each of these ring sizes (1 rep): loss or not")
    ap.add_argument("-o", "--output")
    a = ap.parse_args()
    rates = [int(x) for x in a.rates.split(",")]
    tools = a.tools.split(",")
    secs, reps, ring_mb = a.seconds, a.reps, a.ring_mb
    if a.quick:
        rates, secs, reps = [30000], 1.0, 1
    if a.overload:
        rates, tools, ring_mb = [0], ["hintscope"], 1
    work = Path(tempfile.mkdtemp(prefix="hs-perf-cap-", dir="/tmp"))
    runs = []
    sweep = []
    load_procs, load_what = start_load(a.load)
    try:
        exe = build(work)
        k = 0
        for rep in range(reps):
            for rate in rates:
                order = tools if rep % 2 == 0 else list(reversed(tools))
                for tool in order:
                    k += 1
                    r = run_one(tool, exe, work, secs, rate, ring_mb, k)
                    r["rep"] = rep
                    r["loadavg"] = os.getloadavg()[0]
                    runs.append(r)
                    print(json.dumps({x: r.get(x) for x in ("tool", "rate_target", "calls", "producer_rate", "seen",
                                                             "lost_reported", "missing", "consumer_cpu_per_s", "loadavg")}),
                          flush=True)
        for mb in [int(x) for x in a.ring_sweep.split(",") if x]:
            for rate in rates:
                k += 1
                r = run_one("hintscope", exe, work, secs, rate, mb, k)
                r.update({"ring_mb": mb, "loadavg": os.getloadavg()[0]})
                sweep.append(r)
                print(json.dumps({x: r.get(x) for x in ("ring_mb", "rate_target", "producer_rate", "missing",
                                                         "lost_reported", "loadavg")}), flush=True)
    finally:
        stop_load(load_procs)
        shutil.rmtree(work, ignore_errors=True)
    res = {"benchmark": "capture", "ring_mb": ring_mb, "seconds": secs, "reps": reps, "load": load_what,
           "runs": runs, "summary": {}}
    rows = []
    for rate in rates:
        none = {r["rep"]: r["producer_rate"] for r in runs if r["tool"] == "none" and r["rate_target"] == rate}
        for tool in tools:
            # perf prints nothing when attached: a run where it saw nothing at all never attached in time
            rs = [r for r in runs if r["tool"] == tool and r["rate_target"] == rate
                  and not (tool == "perf" and r.get("seen") == 0)]
            prod = B.summary([r["producer_rate"] for r in rs])
            slow = B.summary([r["producer_rate"] / none[r["rep"]] for r in rs if r["rep"] in none])
            s = {"producer_rate": prod, "producer_rate_vs_untraced": slow}
            if tool != "none":
                s.update({"missing": [r["missing"] for r in rs], "lost_reported": [r["lost_reported"] for r in rs],
                          "captured_fraction": B.summary([r["seen"] / r["calls"] for r in rs]),
                          "consumer_cpu_per_s": B.summary([r["consumer_cpu_per_s"] for r in rs]),
                          "consumer_cpu_s_per_M": B.summary([r["consumer_cpu_s_per_M"] for r in rs])})
            res["summary"][f"{tool}@{rate}"] = s
            rows.append([rate or "max", tool, B.fmt(prod, 1e-3), B.fmt(slow) if none else "-",
                         "-" if tool == "none" else ",".join(str(x) for x in s["missing"]),
                         "-" if tool == "none" else ",".join(str(x) for x in s["lost_reported"]),
                         "-" if tool == "none" else B.fmt(s["consumer_cpu_per_s"]),
                         "-" if tool == "none" else B.fmt(s["consumer_cpu_s_per_M"])])
    print(f"{secs} s per run, {reps} reps, ring {ring_mb} MiB, load: {load_what} (median (min-max))")
    print(B.table(rows, ["target/s", "tracer", "achieved k ev/s", "vs untraced", "missing (per run)",
                         "lost reported", "consumer CPU s/s", "consumer CPU s per M ev"]))
    if "hintscope" in tools and "perf" in tools:
        # CPU per event against perf record's in the same repetition (same load, same minute)
        vs = []
        for rate in rates:
            pairs = [(h["consumer_cpu_s_per_M"], p["consumer_cpu_s_per_M"])
                     for h in runs if h["tool"] == "hintscope" and h["rate_target"] == rate
                     for p in runs if p["tool"] == "perf" and p["rate_target"] == rate and p["rep"] == h["rep"]
                     and p.get("seen")]
            s = B.summary([x / y for x, y in pairs])
            res["summary"][f"cpu_per_event_hintscope_vs_perf@{rate}"] = s
            vs.append([rate or "max", B.fmt(s), len(pairs)])
        print(B.table(vs, ["target/s", "hintscope / perf CPU per event", "pairs"]))
    if sweep:
        res["ring_sweep"] = sweep
        srows = [[r["ring_mb"], r["rate_target"] or "max", f"{r['producer_rate'] / 1e3:.0f}", r["missing"],
                  r["lost_reported"], f"{r['loadavg']:.1f}"] for r in sweep]
        print(B.table(srows, ["ring MiB", "target/s", "achieved k ev/s", "missing", "lost reported", "load"]))
    name = "bench_capture" + ("_overload" if a.overload else "") + ("_quick" if a.quick else "") + \
        ("_load" if a.load else "")
    B.write(name, res, a.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
