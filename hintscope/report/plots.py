"""Matplotlib figures shared by the report notebook and ``hintscope compare``.

Every ``plot_*`` takes data frames (never a bundle), returns the Figure, and draws guest
strings only as text inside the image, where they cannot become markup.
"""

from __future__ import annotations

from typing import Iterable

import matplotlib

matplotlib.use("Agg")  # headless: report and compare run without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from hintscope.report import timeline as tl  # noqa: E402

HOST_C = "#3465a4"
GUEST_C = "#4e9a06"
FIND_C = "#cc0000"
COLORS = {
    "syncs": "#f57900", "fetch": "#a40000", "get": "#75507b", "clear": "#c17d11", "applies": HOST_C,
    "guest_cmd": GUEST_C, "guest_hints": "#73d216", "guest_reuse": "#8f5902", "findings": FIND_C,
}
STATE_C = {"setup": "#d3d7cf", "active": "#cfe2f3", "device": "#f4cccc", "completed": "#d9ead3",
           "failed": "#ea9999", "cancelled": "#eeeeee", "pre-switchover": "#fce5cd"}
EPOCH_C = ("#e8f0fb", "#c9daf8")


def _unit(span_ns: float) -> tuple[float, str]:
    return (1e9, "s") if span_ns > 20e9 else (1e6, "ms")


def plot_timeline(t: tl.Timeline, title: str = "", width: float = 14.0,
                  window: tuple[int, int] | None = None) -> plt.Figure:
    """Host and guest lanes on one time axis; syncs shaded across all lanes, findings as red lines.

    ``window`` (host ns) zooms in; the axis keeps the run's origin so times match the full view.
    """
    ev = t.events
    lanes = [(lane, label, group) for lane, group, label in tl.LANES if (ev["lane"] == lane).any()]
    has_counter = bool(t.counters)
    if ev.empty:
        fig, ax = plt.subplots(figsize=(width, 1.5))
        ax.text(0.5, 0.5, "no timeline events in this bundle", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    origin = int(min(ev["start_ns"].min(), t.t0_ns or ev["start_ns"].min()))
    view = (origin, int(ev["end_ns"].max())) if window is None else (int(window[0]), int(window[1]))
    if window is not None:
        ev = ev[(ev["end_ns"] >= view[0]) & (ev["start_ns"] <= view[1])]
    span = max(view[1] - view[0], 1)
    div, unit = _unit(max(view[1] - origin, 1))
    x = lambda ns: (np.asarray(ns, dtype=np.float64) - origin) / div  # noqa: E731
    min_w = span / div * 0.0012   # narrower than this is invisible at report width

    heights = ([1.2] if has_counter else []) + [max(0.45 * len(lanes), 1.5)]
    fig, axes = plt.subplots(len(heights), 1, figsize=(width, sum(heights) + 1.2), sharex=True,
                             gridspec_kw={"height_ratios": heights, "hspace": 0.06}, squeeze=False)
    axes = axes[:, 0]
    ax = axes[-1]
    ypos = {lane: len(lanes) - 1 - i for i, (lane, _, _) in enumerate(lanes)}

    # Syncs shaded over every lane: what happens inside [BEFORE, AFTER] is what the checks are about.
    syncs = ev[(ev["lane"] == "syncs") & (ev["depth"] == 0)]
    for a in axes:
        for s, e in zip(x(syncs["start_ns"]), x(syncs["end_ns"])):
            a.axvspan(s, max(e, s + min_w), color=COLORS["syncs"], alpha=0.12, lw=0)
    # Host/guest separation line.
    guest_rows = [ypos[lane] for lane, _, g in lanes if g == "guest"]
    if guest_rows:
        ax.axhline(max(guest_rows) + 0.5, color="#555753", lw=0.8, ls="--")

    for lane, label, group in lanes:
        y = ypos[lane]
        rows = ev[ev["lane"] == lane]
        if lane == "migration":
            for _, r in rows.iterrows():
                s, e = float(x(r["start_ns"])), float(x(r["end_ns"]))
                ax.broken_barh([(s, max(e - s, min_w))], (y - 0.4, 0.8),
                               facecolor=STATE_C.get(r["name"], "#eeeeec"), edgecolor="#888a85", lw=0.5)
                cs, ce = max(s, float(x(view[0]))), min(e, float(x(view[1])))
                if ce - cs > span / div * 0.04:
                    ax.text((cs + ce) / 2, y, r["name"], ha="center", va="center", fontsize=8, clip_on=True)
            continue
        if lane == "epochs":
            for i, (_, r) in enumerate(rows.iterrows()):
                s, e = float(x(r["start_ns"])), float(x(r["end_ns"]))
                ax.broken_barh([(s, max(e - s, min_w))], (y - 0.4, 0.8), facecolor=EPOCH_C[i % 2],
                               edgecolor="#3465a4", lw=0.5)
                a = r["args"]
                txt = f"e{a.get('epoch', i + 1)} {a.get('cmd_id', '')}"
                cs, ce = max(s, float(x(view[0]))), min(e, float(x(view[1])))
                if ce - cs > span / div * 0.05:
                    ax.text((cs + ce) / 2, y, txt, ha="center", va="center", fontsize=7.5, clip_on=True)
            continue
        sl = rows[rows["end_ns"] > rows["start_ns"]]
        inst = rows[rows["end_ns"] == rows["start_ns"]]
        for depth, part in sl.groupby("depth"):
            color = COLORS["fetch"] if (lane == "syncs" and depth == 1) else COLORS.get(lane, HOST_C)
            s = x(part["start_ns"])
            w = np.maximum(x(part["end_ns"]) - s, min_w)
            h = 0.8 if depth == 0 else 0.4
            ax.broken_barh(list(zip(s, w)), (y - h / 2, h), facecolor=color, edgecolor="none",
                           alpha=0.55 if (lane == "syncs" and depth == 0) else 0.9)
        if lane == "syncs":
            top = sl[sl["depth"] == 0]
            last = -np.inf
            for _, r in top.iterrows():
                xs = float(x(r["start_ns"]))
                if xs - last < span / div * 0.025:   # labels closer than this would overprint
                    continue
                last = xs
                ax.text(xs, y + 0.45, str(r["name"]).replace("sync ", "S"), fontsize=7,
                        va="bottom", ha="left", color="#ce5c00", clip_on=True)
        if not inst.empty:
            if lane == "findings":
                xs = x(inst["start_ns"])
                for a in axes:
                    lo_y, hi_y = (-0.5, len(lanes) - 0.5) if a is ax else a.get_ylim()
                    a.vlines(xs, lo_y, hi_y, color=FIND_C, lw=0.8, alpha=0.5, zorder=5)
                ax.scatter(xs, np.full(len(xs), y + 0.3), marker="v", s=40, color=FIND_C, zorder=6)
                # Numbered like the findings table; a label goes on the first of three rows where it
                # does not overprint the previous one (text width estimated from the axis width).
                char_w = span / div / (width * 72 * 0.8) * 5.0
                row_end = [-np.inf] * 3
                order = np.argsort(xs, kind="stable")
                xs_sorted = xs[order]
                for j, i in enumerate(order):
                    xi = float(xs[i])
                    gap = (xs_sorted[j + 1] - xi) if j + 1 < len(order) else np.inf
                    label = str(inst["args"].iloc[i].get("id", ""))
                    full = f"{label} {inst['name'].iloc[i]}"
                    if gap > len(full) * char_w * 1.2:
                        label = full
                    right = xi > float(x(view[1])) - len(label) * char_w   # keep labels inside the axes
                    x0 = xi - len(label) * char_w if right else xi
                    level = next((k for k in range(3) if row_end[k] < x0), int(np.argmin(row_end)))
                    row_end[level] = x0 + (len(label) + 1) * char_w
                    ax.text(xi, y + 0.14 - 0.26 * level, label, fontsize=7.5, color=FIND_C, va="top",
                            ha="right" if right else "left", clip_on=True)
            else:
                ax.vlines(x(inst["start_ns"]), y - 0.35, y + 0.35, color=COLORS.get(lane, HOST_C), lw=1.0)

    ax.set_yticks([ypos[lane] for lane, _, _ in lanes])
    ax.set_yticklabels([("guest: " if g == "guest" else "") + lab for _, lab, g in lanes], fontsize=9)
    for lab, (_, _, g) in zip(ax.get_yticklabels(), lanes):
        lab.set_color(GUEST_C if g == "guest" else (FIND_C if g == "finding" else "#2e3436"))
    ax.set_ylim(-0.6, len(lanes) - 0.4)
    ax.set_xlim(x(view[0]) - span / div * 0.01, x(view[1]) + span / div * 0.01)
    ax.set_xlabel(f"host time since first event ({unit})")
    ax.grid(axis="x", color="#d3d7cf", lw=0.5)
    if has_counter:
        ca = axes[0]
        series = {n: (tl.rate(t.samples[n], window=view) if n in t.samples else c) for n, c in t.counters.items()}
        for name, c in series.items():
            if c.empty:
                continue
            ca.fill_between(x(c["ts_ns"]), c["value"].to_numpy(), step="post", alpha=0.5, label=name, color="#729fcf")
        first = next(iter(series.values()))
        bucket = float(np.diff(first["ts_ns"].to_numpy()[:2])[0]) / 1e6 if len(first) > 1 else 0.0
        ca.set_ylabel(f"per {bucket:.3g} ms", fontsize=8)
        ca.legend(loc="upper right", fontsize=8, frameon=False)
        ca.grid(axis="x", color="#d3d7cf", lw=0.5)
    legend = [Patch(color=COLORS["syncs"], alpha=0.3, label="sync BEFORE→AFTER"),
              Patch(color=COLORS["fetch"], label="dirty-log fetch"),
              Patch(color=COLORS["applies"], label="hint apply")]
    if (ev["lane"] == "findings").any():
        legend.append(Patch(color=FIND_C, label="finding"))
    axes[0].legend(handles=legend, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=len(legend), fontsize=8,
                   frameon=False)
    if title:
        axes[0].set_title(title, fontsize=11, loc="left", pad=24)   # above the legend row
    fig.subplots_adjust(left=0.16, right=0.99, top=0.93, bottom=0.08)
    return fig


def plot_epoch_pages(epochs: pd.DataFrame, title: str = "pages per hint epoch") -> plt.Figure:
    """Grouped bars per epoch: every numeric column except ``epoch`` (e.g. hinted, skipped, resent)."""
    cols = [c for c in epochs.columns
            if c not in ("epoch", "applies") and pd.api.types.is_numeric_dtype(epochs[c])]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(epochs) + 3), 3.2))
    if epochs.empty or not cols:
        ax.text(0.5, 0.5, "no hint epochs", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    n = len(cols)
    w = 0.8 / n
    pos = np.arange(len(epochs))
    palette = ["#3465a4", "#73d216", "#cc0000", "#f57900", "#75507b"]
    for i, c in enumerate(cols):
        ax.bar(pos + (i - (n - 1) / 2) * w, epochs[c].to_numpy(dtype=float), w, label=c, color=palette[i % 5])
    ax.set_xticks(pos)
    ax.set_xticklabels([str(e) for e in epochs["epoch"]])
    ax.set_xlabel("epoch")
    ax.set_ylabel("pages (4 KiB)")
    ax.set_title(title, fontsize=10, loc="left")
    ax.legend(fontsize=8, frameon=False)
    ax.grid(axis="y", color="#d3d7cf", lw=0.5)
    fig.tight_layout()
    return fig


def plot_dirty_rate(rate: pd.DataFrame, title: str = "dirty pages per sync") -> plt.Figure:
    """Bars of pages harvested per sync with the dirty rate (MiB/s) as a line; columns sync, pages, mib_s."""
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rate) + 3), 3.2))
    if rate.empty:
        ax.text(0.5, 0.5, "no dirty-log syncs", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    ax.bar(rate["sync"].astype(str), rate["pages"], color="#75507b", alpha=0.8, label="pages harvested")
    ax.set_xlabel("sync")
    ax.set_ylabel("dirty pages harvested")
    if "mib_s" in rate and rate["mib_s"].notna().any():
        a2 = ax.twinx()
        a2.plot(rate["sync"].astype(str), rate["mib_s"], color="#f57900", marker="o", label="dirty rate")
        a2.set_ylabel("dirty rate (MiB/s since previous sync)")
    ax.set_title(title, fontsize=10, loc="left")
    fig.tight_layout()
    return fig


def _wrap_label(group: str, width: int = 16) -> str:
    lines = []
    for part in group.split(", "):
        line = ""
        for w in part.split(" "):
            if line and len(line) + 1 + len(w) > width:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}" if line else w
        lines.append(line)
    return "\n".join(lines)


def plot_metric_spread(df: pd.DataFrame, metric: str, group: str, title: str | None = None,
                       ax: plt.Axes | None = None) -> plt.Figure:
    """One metric over repeated runs per group: box plot with every run drawn as a jittered point."""
    groups = [g for g in sorted(df[group].astype(str).unique())]
    data = [df.loc[df[group].astype(str) == g, metric].dropna().to_numpy(dtype=float) for g in groups]
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(4.5, 1.4 * len(groups) + 2), 3.6 + 0.25 * max(_wrap_label(g).count("\n") for g in groups)))
    else:
        fig = ax.figure
    # One label per line keeps multi-label groups ("qemu=7.2, vcpus=2, hint=on") readable; a long
    # value ("qemu=patched (1770bc3effab)", "qemu=stock 10.0.2 (source build)") wraps at its spaces.
    ax.boxplot(data, tick_labels=[_wrap_label(g) for g in groups], widths=0.5, showfliers=False,
               medianprops={"color": "#cc0000"}, boxprops={"color": "#555753"})
    rng = np.random.default_rng(0)   # fixed jitter: the same runs give the same picture
    for i, d in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(d)), d, s=22, color="#3465a4", alpha=0.8, zorder=3)
    ax.set_xlabel(group)
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} by {group} (n = {', '.join(str(len(d)) for d in data)})", fontsize=10,
                 loc="left")
    ax.grid(axis="y", color="#d3d7cf", lw=0.5)
    if ax is fig.axes[0] and len(fig.axes) == 1:
        fig.tight_layout()
    return fig


def plot_overview(df: pd.DataFrame, metrics: list[str], group: str, cols: int = 3) -> plt.Figure:
    """Small multiples of :func:`plot_metric_spread` for the headline metrics (one figure for docs)."""
    n = max(len(metrics), 1)
    rows = (n + cols - 1) // cols
    ngroups = df[group].nunique()
    fig, axes = plt.subplots(rows, cols, figsize=(cols * max(4.0, 1.2 * ngroups + 1.5), rows * 3.2),
                             squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        plot_metric_spread(df, m, group, title=m, ax=ax)
        ax.set_xlabel("")
        ax.tick_params(axis="x", labelsize=8)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_axis_off()
    fig.suptitle(f"runs by {group}: box = spread over repeated runs, dots = runs", fontsize=11, x=0.01, ha="left")
    fig.tight_layout()
    return fig


def save(fig: plt.Figure, base, formats: Iterable[str] = ("png", "svg"), dpi: int = 110) -> list:
    """Write ``base.<fmt>`` for each format and close the figure."""
    from pathlib import Path

    out = []
    for fmt in formats:
        p = Path(f"{base}.{fmt}")
        fig.savefig(p, dpi=dpi, bbox_inches="tight", metadata={"Date": None} if fmt == "svg" else None)
        out.append(p)
    plt.close(fig)
    return out
