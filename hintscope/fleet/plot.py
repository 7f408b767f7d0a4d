"""``hintscope fleet plot``: one metric against QEMU version or date, one series per group.

Every run is a point (jittered sideways so repeats do not hide each other), each series' median
per x (or mean, ``--stat mean``, for counts that are mostly zero) is a line and its interquartile range a bar, so the spread over runs stays visible next to
the trend.  The x axis is ordered by version number (``qemu``) or by date, else by name.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from hintscope.errors import HintscopeError
from hintscope.fleet.query import _KEYS, _NUMERIC, load


def _order(values: list[str], x: str) -> list[str]:
    def key(v: str):
        nums = [int(n) for n in re.findall(r"\d+", v)] if x != "date" else []
        return (0, nums, v) if nums else (1, [], v)
    return sorted(values, key=key)


def plot(index: str | Path, metric: str, x: str = "qemu", group: list[str] | None = None,
         out: str | Path = "fleet.png", title: str | None = None, stat: str = "median") -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import polars as pl

    from hintscope.report import plots

    if stat not in ("median", "mean"):
        raise HintscopeError(f"--stat {stat}: median or mean")
    if metric not in _NUMERIC:
        raise HintscopeError(f"--metric {metric}: not a numeric index column (choose from {', '.join(sorted(_NUMERIC))})")
    for k in [x, *(group or [])]:
        if k not in _KEYS | {"date"}:
            raise HintscopeError(f"{k}: not a label column of the index (choose from {', '.join(sorted(_KEYS | {'date'}))})")
    cols = list(dict.fromkeys([x, *(group or []), metric]))
    df = load(index, errors=False).select(cols).drop_nulls(metric).collect()
    if not len(df):
        raise HintscopeError(f"{index}: no run has a value for {metric}")
    df = df.with_columns(pl.col(x).cast(pl.String).fill_null("?").alias("_x"),
                         (pl.concat_str([pl.lit(f"{g}=") + pl.col(g).cast(pl.String).fill_null("?") for g in group],
                                        separator=", ") if group else pl.lit("all runs")).alias("_g"))
    xs = _order(df["_x"].unique().to_list(), x)
    pos = {v: i for i, v in enumerate(xs)}
    groups = sorted(df["_g"].unique().to_list())
    width = 0.8 / max(1, len(groups))
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 1.2 * len(xs) + 3)), 4.5))
    rng = np.random.default_rng(0)
    for gi, g in enumerate(groups):
        sub = df.filter(pl.col("_g") == g)
        off = -0.4 + width * (gi + 0.5)
        color = f"C{gi % 10}"
        px = np.array([pos[v] for v in sub["_x"].to_list()], float) + off
        ax.scatter(px + rng.uniform(-width * 0.3, width * 0.3, len(px)), sub[metric].to_numpy(), s=9, alpha=0.35,
                   color=color, linewidths=0)
        st = sub.group_by("_x").agg(getattr(pl.col(metric), stat)().alias("med"), pl.col(metric).quantile(0.25).alias("q1"),
                                    pl.col(metric).quantile(0.75).alias("q3"), pl.len().alias("n"))
        st = st.with_columns(pl.col("_x").replace_strict(pos, return_dtype=pl.Int64).alias("_p")).sort("_p")
        p = st["_p"].to_numpy() + off
        ax.vlines(p, st["q1"].to_numpy(), st["q3"].to_numpy(), color=color, linewidth=3, alpha=0.8)
        ax.plot(p, st["med"].to_numpy(), "-o", color=color, markersize=4, linewidth=1.2,
                label=f"{g} ({int(st['n'].sum())} runs)")
    ax.set_xticks(range(len(xs)), xs, rotation=45 if len(xs) > 6 else 0, ha="right" if len(xs) > 6 else "center",
                  fontsize=8 if len(xs) > 12 else None)
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} by {x}: every run (points), {stat} (line), interquartile range (bar)",
                 fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    if len(groups) > 1 or group:
        ax.legend(fontsize=7, loc="best", ncol=1 if len(groups) < 8 else 2)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = out.suffix.lstrip(".") or "png"
    return plots.save(fig, out.with_suffix(""), formats=(fmt,))
