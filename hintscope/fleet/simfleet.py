"""A simulated fleet: N bundles from the simulator, labelled as if from a nightly CI over QEMU versions.

Each QEMU version (a label in ``meta["labels"]``, not ``vmm.version``: the analysis reads that to
number migration states, and the simulator's numbering is fixed) runs a mix of simulator
variants, dirty-log modes, guest sizes, vCPU counts and seeds, over consecutive days (newer
versions later).  The simulator's ground truth (``meta["sim"]["truth"]``) is returned per run,
so a fleet query can be checked against it.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

# version -> (first day, variants run on it with their weights).  The "regressions" are the
# simulator's unsafe designs, so the per-version hazard rate differs by construction.
MIX: dict[str, tuple[int, dict[str, float]]] = {
    "7.2.22": (0, {"qemu": 5, "resend-bug": 1, "shrinker-reuse": 2}),
    "8.0.5": (5, {"qemu": 6, "shrinker-reuse": 2}),
    "8.2.2": (10, {"qemu": 5, "clear-on-apply": 2}),
    "9.0.1": (15, {"qemu": 4, "filter-after-sync": 2, "sync-in-io-handler": 1}),
    "9.2.0": (20, {"flush-before-sync": 5, "no-cmd-id": 1}),
    "10.0.2": (25, {"flush-before-sync": 5, "blocking-bulk": 2}),
}
MODES = ("manual", "ring", "get")
PAGES = (1024, 2048, 4096)
DAY_NS = 86_400 * 10**9
T0_NS = 1_796_083_200 * 10**9     # 2026-12-01T00:00Z


def plan(n: int, seed: int = 1) -> list[dict]:
    """n run descriptions, spread evenly over the versions."""
    rng = random.Random(seed)
    versions = list(MIX)
    out = []
    for i in range(n):
        ver = versions[i % len(versions)]
        day0, mix = MIX[ver]
        variant = rng.choices(list(mix), weights=list(mix.values()))[0]
        out.append({"i": i, "qemu": ver, "variant": variant, "mode": rng.choice(MODES), "pages": rng.choice(PAGES),
                    "vcpus": rng.choice((1, 2)), "seed": rng.randrange(1 << 20),
                    "created_ns": T0_NS + (day0 + rng.randrange(5)) * DAY_NS + rng.randrange(DAY_NS)})
    return out


def write_run(run: dict, root: str | Path) -> dict:
    """Simulate and write one run; returns the run with its bundle path and ground truth."""
    from hintscope.sim.model import SimConfig
    from hintscope.sim.write import simulate, write_bundle

    path = Path(root) / f"run-{run['i']:05d}-{run['qemu']}-{run['variant']}-{run['mode']}"
    done = _finished(path, run)
    if done is not None:     # an interrupted generation resumes: the plan is deterministic
        return done
    if path.exists():
        import shutil
        shutil.rmtree(path)
    cfg = replace(SimConfig(), pages=run["pages"], vcpus=run["vcpus"])
    mb = simulate(run["variant"], run["seed"], run["mode"], cfg=cfg)
    write_bundle(mb, path)
    meta_p = path / "meta.json"
    meta = json.loads(meta_p.read_text())
    meta["labels"] = {"qemu": run["qemu"]}
    meta["created_realtime_ns"] = run["created_ns"]
    meta_p.write_text(json.dumps(meta, indent=1))
    return {**run, "bundle": str(path.resolve()), "truth": mb.meta["sim"]["truth"], "safe": mb.meta["sim"]["safe_design"]}


def _finished(path: Path, run: dict) -> dict | None:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    sim = meta.get("sim") or {}
    if (meta.get("status") != "complete" or (meta.get("labels") or {}).get("qemu") != run["qemu"]
            or sim.get("seed") != run["seed"] or "truth" not in sim):
        return None
    return {**run, "bundle": str(path.resolve()), "truth": sim["truth"], "safe": sim["safe_design"]}


def generate(n: int, root: str | Path, jobs: int = 1, seed: int = 1) -> list[dict]:
    Path(root).mkdir(parents=True, exist_ok=True)
    runs = plan(n, seed)
    if jobs <= 1:
        return [write_run(r, root) for r in runs]
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp

    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("forkserver")) as ex:
        return list(ex.map(write_run, runs, [root] * len(runs), chunksize=8))


def truth_rates(runs: list[dict], group: tuple[str, ...] = ("qemu", "mode")) -> dict[tuple, dict]:
    """Per group: runs, runs that lost a write (truth lost > 0), and lost pages, from the generator's record."""
    out: dict[tuple, dict] = {}
    for r in runs:
        g = out.setdefault(tuple(r[k] for k in group), {"runs": 0, "lost_runs": 0, "lost_pages": 0})
        g["runs"] += 1
        g["lost_runs"] += int(r["truth"]["lost"] > 0)
        g["lost_pages"] += int(r["truth"]["lost"])
    return out
