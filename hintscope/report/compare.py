"""``hintscope compare BUNDLE... [--label ...] -o DIR``: regression plots across runs.

Each bundle is one run.  Its labels come from its meta (hint on/off, QEMU version, guest,
vCPUs, accelerator, simulator variant, and any ``meta["labels"]``) and from ``--label``:
``KEY=VALUE`` labels every run, ``BUNDLE:KEY=VALUE`` (BUNDLE a path or glob) labels the runs
it matches and wins over meta.  Runs are grouped by the labels whose values differ (or by
``--group``); each metric is drawn as a box of the group's runs with every run as a point, so
the spread over repeated runs is visible, and all numbers go to ``runs.csv``.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hintscope.bundle import read_bundle
from hintscope.errors import HintscopeError
from hintscope.report import model

# Metrics drawn when present (summary keys after flattening), in this order; others stay in the CSV.
PLOT_METRICS = [
    "migration.total_time_ms", "migration.downtime_ms", "migration.transferred", "migration.normal",
    "syncs", "epochs", "harvested_pages", "hints.applies", "hints.applied_pages", "hints.skipped_pages",
    "hints.late_pages", "hints.resent_pages", "hints.bytes_saved_upper_bound", "memcheck.lost_writes", "findings",
]
# The small multiples of overview.png/svg.
OVERVIEW = ["migration.total_time_ms", "migration.transferred", "syncs", "hints.applied_pages",
            "hints.skipped_pages", "hints.resent_pages", "findings"]
# Labels that differ between runs without making them a different configuration (or that repeat
# another label: qemu_build refines qemu, balloon explains hint); --group can still name them.
NOT_AUTO_GROUPED = ("seed", "producer", "qemu_build", "balloon", "workload")
_LABEL_RE = re.compile(r"^(?:(?P<bundle>.+):)?(?P<key>[A-Za-z0-9_.-]+)=(?P<value>.*)$")


def meta_labels(meta: dict[str, Any]) -> dict[str, str]:
    """Labels a bundle carries about itself (QEMU, kernels, guest, vCPUs, accelerator, hint, workload,
    simulator variant, meta['labels']): :func:`hintscope.fleet.labels.run_labels`, shared with the fleet index."""
    from hintscope.fleet.labels import run_labels

    return run_labels(meta)


def parse_labels(items: list[str], bundles: list[str]) -> dict[str, dict[str, str]]:
    """``--label`` values -> labels per bundle path."""
    per: dict[str, dict[str, str]] = {b: {} for b in bundles}
    for item in items:
        m = _LABEL_RE.match(item)
        if not m:
            raise HintscopeError(f"--label {item!r}: expected KEY=VALUE or BUNDLE:KEY=VALUE")
        pat = m.group("bundle")
        hit = [b for b in bundles if pat is None or fnmatch.fnmatch(b, pat) or fnmatch.fnmatch(Path(b).name, pat)
               or Path(b).resolve() == Path(pat).resolve()]
        if not hit:
            raise HintscopeError(f"--label {item!r}: {pat} matches none of the bundles given")
        for b in hit:
            per[b][m.group("key")] = m.group("value")
    return per


def collect(bundles: list[str], labels: dict[str, dict[str, str]] | None = None, progress: bool | None = None
            ) -> pd.DataFrame:
    """One row per run: bundle, labels (``label.KEY``), numeric summary metrics, findings count."""
    from hintscope.report.progress import steps

    rows = []
    with steps(progress) as step:
        with step(f"analysing {len(bundles)} runs") as update:
            for i, path in enumerate(bundles):
                b = read_bundle(path)
                notes: list[str] = []
                flat = model.flatten(model.load_summary(b, notes))
                row: dict[str, Any] = {"bundle": str(path), "run": Path(path).name}
                lab = meta_labels(b.meta) | (labels or {}).get(path, {})
                row.update({f"label.{k}": v for k, v in lab.items()})
                row.update({k: v for k, v in flat.items()
                            if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)})
                f = model.load_findings(b, notes)
                row["findings"] = int(len(f))
                if "kind" in f.columns:   # the analysis summary has them as findings.by_kind.*
                    for kind, n in f.groupby("kind").size().items():
                        row.setdefault(f"findings.by_kind.{kind}", int(n))
                row["notes"] = " | ".join(notes)
                rows.append(row)
                update(i + 1, len(bundles))
    df = pd.DataFrame(rows)
    return df


def group_column(df: pd.DataFrame, keys: list[str] | None = None) -> pd.Series:
    """The group of each run: the given label keys, else every label whose value differs across runs."""
    label_cols = [c for c in df.columns if c.startswith("label.")]
    if keys:
        cols = [f"label.{k}" for k in keys]
        missing = [c[6:] for c in cols if c not in df.columns]
        if missing:
            raise HintscopeError(f"--group {','.join(missing)}: no run has that label "
                                 f"(labels: {', '.join(c[6:] for c in label_cols) or 'none'})")
    else:
        cols = [c for c in label_cols if df[c].fillna("?").nunique() > 1 and c[6:] not in NOT_AUTO_GROUPED]
    if not cols:
        return pd.Series("all runs", index=df.index)
    return df[cols].fillna("?").astype(str).apply(
        lambda r: ", ".join(f"{c[6:]}={v}" for c, v in zip(cols, r)), axis=1)


def write(df: pd.DataFrame, out: Path, group_keys: list[str] | None = None) -> list[Path]:
    from hintscope.report import plots

    out.mkdir(parents=True, exist_ok=True)
    df = df.copy()
    df["group"] = group_column(df, group_keys)
    files = [out / "runs.csv"]
    df.to_csv(files[0], index=False)
    metrics = [m for m in PLOT_METRICS if m in df.columns and df[m].notna().any()]
    metrics += sorted(c for c in df.columns if c.startswith("findings.") and c not in metrics)
    stats = []
    for m in metrics:
        fig = plots.plot_metric_spread(df, m, "group")
        files += plots.save(fig, out / f"{_slug(m)}")
        g = df.groupby("group")[m]
        stats.append(pd.DataFrame({"metric": m, "runs": g.count(), "median": g.median(), "min": g.min(),
                                   "max": g.max(), "mean": g.mean(), "std": g.std()}).reset_index())
    headline = [m for m in OVERVIEW if m in metrics]
    if headline:
        files += plots.save(plots.plot_overview(df, headline, "group"), out / "overview")
    if stats:
        files.append(out / "groups.csv")
        pd.concat(stats, ignore_index=True)[["metric", "group", "runs", "median", "min", "max", "mean", "std"]] \
            .to_csv(files[-1], index=False)
    return files


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def _run(args: argparse.Namespace) -> int:
    bundles = [str(b) for b in args.bundles]
    df = collect(bundles, parse_labels(args.label or [], bundles))
    files = write(df, Path(args.output), args.group.split(",") if args.group else None)
    groups = df.assign(group=group_column(df, args.group.split(",") if args.group else None))["group"]
    print(f"{len(df)} runs in {groups.nunique()} groups ({', '.join(sorted(groups.unique()))})")
    print(f"wrote {len(files)} files to {args.output}: runs.csv, groups.csv, overview and "
          f"{(len(files) - 4) // 2} per-metric plots (PNG + SVG)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="regression plots across runs (PNG, SVG, CSV)",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  hintscope compare runs/on-* runs/off-* --label 'on-*:hint=on' --label 'off-*:hint=off' -o plots")
    p.add_argument("bundles", nargs="+", help="run bundles (repeat runs of each configuration)")
    p.add_argument("--label", action="append", metavar="[BUNDLE:]KEY=VALUE",
                   help="label runs (all, or those BUNDLE matches); repeatable")
    p.add_argument("--group", metavar="KEY[,KEY]", help="group by these labels (default: labels that differ)")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.set_defaults(func=_run)
