"""Reruns issue 11's table with the outsider harness: per QEMU version x guest behaviour, the guest's
writes to hinted pages, the pages lost on the destination, and what `hintscope analyze` says.

    sudo .venv/bin/python -m tests.outsider.table [--versions 7.2 10.0.2] [--reps N] [--no-controls] [-o DIR]

(or by path: `python tests/outsider/table.py`). Root, /dev/kvm and BCC are needed. Each run takes
10-15 s here. The bundles and serial logs stay under DIR (default /tmp/hs-outsider-table-TIME).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run by path: make `tests.outsider` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.outsider import tools  # noqa: E402
from tests.outsider.run import CPRIME, Result, Scenario, resent_after_apply, run_many  # noqa: E402
from tests.outsider.vm import qemu_available  # noqa: E402


def scenarios(versions: list[str], behaviours: list[str], controls: bool, tap: bool) -> list[Scenario]:
    out = [Scenario(v, b, tap=tap) for v in versions for b in behaviours]
    if controls:
        out += [Scenario(v, "early-reuse", stale=True, tap=tap) for v in versions]
        out += [Scenario(v, "early-reuse", dirty_ring=65536, tap=tap) for v in versions]
    return out


def _mode(sc: Scenario) -> str:
    return f"dirty ring {sc.dirty_ring}" if sc.dirty_ring else "bitmap (manual protect)"


def _cprime(r: Result) -> str:
    parts = [f"`{k}` {f.get('confidence')} {f.get('gfn_count')}" for k in CPRIME for f in r.by_kind(k)]
    return ", ".join(parts) or "none"


def line(r: Result) -> str:
    sc, m = r.scenario, r.mem
    beh = sc.behaviour + (" (stale id)" if sc.stale else "")
    if m is None:
        return f"| {sc.version} | {_mode(sc)} | {beh} | run failed | | | | | |"
    sends = ""
    # unexplained sends are judged against GET harvests, which ring mode does not have
    if sc.tap and r.tap_bundle is not None and not sc.dirty_ring:
        try:
            s = resent_after_apply(r)
            sends = f"{len(s['resent'])} of {s['pages_checked']}, {len(s['unexplained'])} unexplained"
        except Exception as e:  # noqa: BLE001 - a table row, not a test: show what went wrong
            sends = f"error: {type(e).__name__}: {e}"[:80]
    return (f"| {sc.version} | {_mode(sc)} | {beh} | {len(m.written_after_hint)} | {len(m.lost)} | {len(m.lost_other)} "
            f"| {m.hinted_held} | {r.analyze_error or r.verdict} | {_cprime(r)} | {r.analyze_exit} | {sends or '-'} |")


HEADER = ("| QEMU | mode | guest | writes to hinted pages | lost on destination | other pages lost | hinted pages skipped "
          "| verdict | c' findings (pages) | `--fail-on hazard` exit | hinted pages sent after their apply (tap) |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.outsider.table", description=__doc__.split("\n\n")[0])
    ap.add_argument("--versions", nargs="+", default=["7.2", "10.0.2"])
    ap.add_argument("--behaviours", nargs="*", default=["early-reuse", "late-reuse", "polite"],
                    help="guest behaviours (none: only the controls)")
    ap.add_argument("--reps", type=int, default=1, help="runs per row (default 1)")
    ap.add_argument("--no-controls", action="store_true", help="leave out the stale-id and dirty-ring rows")
    ap.add_argument("-o", "--out", type=Path, help="directory for the runs (default /tmp/hs-outsider-table-TIME)")
    ap.add_argument("--json", type=Path, help="also write every run's numbers to this file")
    a = ap.parse_args(argv)
    from hintscope.lab.build import build_guest  # only to build the guest image

    kernel = Path(build_guest("hintguest"))
    tap_reason = tools.tap_available()
    out = a.out or Path(f"/tmp/hs-outsider-table-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"runs under {out}; tap: {'used' if tap_reason is None else tap_reason}", file=sys.stderr)
    rows, dump = [], []
    jobs = []
    for sc in scenarios(a.versions, a.behaviours, not a.no_controls, tap_reason is None):
        if why := qemu_available(sc.version):
            print(f"skip {sc.label}: {why}", file=sys.stderr)
            continue
        jobs += [(sc, out / f"{sc.label}-{rep}") for rep in range(a.reps)]
    for sc, r in run_many(jobs, kernel):
        if isinstance(r, BaseException):
            print(f"{sc.label}: failed: {type(r).__name__}: {r}", file=sys.stderr)
            rows.append(f"| {sc.version} | {_mode(sc)} | {sc.behaviour} | failed: {str(r)[:80]} |")
            continue
        rows.append(line(r))
        dump.append(r.dump())
        print(f"{sc.label}: {r.row()}", file=sys.stderr)
    print(HEADER)
    print("\n".join(rows))
    if a.json:
        a.json.write_text(json.dumps(dump, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
