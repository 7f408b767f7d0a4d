"""Shared helpers of the benchmarks: summary statistics, the results table, JSON output, machine facts.

Every benchmark measures against a baseline in the same run (interleaved), because the machine is
2 cores shared with other jobs: absolute wall times mostly measure the other tenants.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def summary(xs: list[float]) -> dict:
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return {"n": 0, "median": None, "min": None, "max": None}
    return {"n": len(xs), "median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def fmt(s: dict, scale: float = 1.0, digits: int = 3) -> str:
    if not s["n"]:
        return "-"
    return (f"{s['median'] * scale:.{digits}g} ({s['min'] * scale:.{digits}g}-{s['max'] * scale:.{digits}g})")


def cpu_s(pid: int) -> float:
    """utime + stime of a process (and its waited-for children are not included), in seconds."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    f = raw[raw.rindex(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> dict:
    def first(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return None
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(), "cpu_model": model,
            "python": platform.python_version(), "loadavg_at_write": os.getloadavg(),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "mem_total_kb": next((int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines()
                                  if l.startswith("MemTotal")), None),
            "uptime_load": first(["uptime"])}


def table(rows: list[list[str]], head: list[str]) -> str:
    w = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w[i]) for i, c in enumerate(r))
    return "\n".join([line(head), line(["-" * x for x in w])] + [line(r) for r in rows])


def write(name: str, res: dict, out: str | None = None) -> Path:
    res.setdefault("machine", machine())
    res["argv"] = sys.argv
    p = Path(out) if out else RESULTS / f"{name}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(f"-> {p}")
    return p
