"""The report notebook's sections as functions: tables (escaped Stylers) and figures.

The notebook only calls these, so every section is importable and testable without Jupyter.
Every string that reaches HTML goes through :func:`table`, which escapes cell values, the
index and the header (a guest controls much of what a bundle holds).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from hintscope.bundle import Bundle, read_bundle
from hintscope.analysis import summary
from hintscope.report import model, plots
from hintscope.report import timeline as tl



def table(df: pd.DataFrame, precision: int = 3, wrap: list[str] | None = None):
    """A Styler that HTML-escapes everything it shows."""
    df = df.copy()
    # Object columns may hold lists/dicts from the analysis; show them as text (escaped below).
    for c in df.columns:
        if df[c].dtype == object:
            df[c] = df[c].map(_text)
    st = (df.style.format(escape="html", precision=precision, thousands=",", na_rep="–")
          .format_index(escape="html", axis=0).format_index(escape="html", axis=1))
    text_cols = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if text_cols:
        st = st.set_properties(subset=text_cols, **{"text-align": "left"})
    st = st.set_table_styles([{"selector": "th", "props": [("text-align", "left")]}], overwrite=False)
    if wrap:
        st = st.set_properties(subset=[c for c in wrap if c in df.columns],
                               **{"white-space": "pre-wrap", "text-align": "left", "max-width": "60em"})
    return st.hide(axis="index") if isinstance(df.index, pd.RangeIndex) else st


def _text(v: Any) -> Any:
    if isinstance(v, (list, tuple, np.ndarray)):
        return "\n".join(_text(x) if not isinstance(x, (int, float, str)) else str(x) for x in v) \
            if any(isinstance(x, (dict, list)) for x in v) else ", ".join(map(str, v))
    if isinstance(v, dict):
        return "; ".join(f"{k}={w}" for k, w in v.items())
    return v


def load(bundle: str, baseline: str | None = None) -> tuple[model.ReportData, model.ReportData | None]:
    d = model.load(read_bundle(bundle))
    base = model.load(read_bundle(baseline)) if baseline else None
    return d, base


HEADLINE = [("migration.outcome", "outcome"), ("migration.total_time_ms", "time (ms)"),
            ("migration.transferred", "bytes sent"), ("syncs", "syncs"), ("epochs", "epochs"),
            ("hints.applied_pages", "hinted pages"), ("hints.skipped_pages", "skipped"),
            ("hints.resent_pages", "resent"), ("findings.verdict", "verdict")]


def headline(d: model.ReportData, base: model.ReportData | None = None) -> pd.DataFrame:
    """One row per run (and baseline): the numbers a reader looks at first."""
    rows = []
    for name, x in (("this run", d), ("baseline", base)):
        if x is None:
            continue
        flat = model.flatten(x.summary)
        row = {"run": name}
        row.update({label: _fmt(flat.get(k)) for k, label in HEADLINE if any(k in model.flatten(y.summary)
                                                                          for y in (d, base) if y is not None)})
        row["findings"] = len(x.findings)
        rows.append(row)
    return pd.DataFrame(rows)


def ab_table(d: model.ReportData, base: model.ReportData) -> pd.DataFrame:
    """The analysis' A/B: QEMU's counters side by side, and pages saved by the trace vs by QMP."""
    c = summary.compare({"summary": d.summary, "accounting": d.accounting},
                        {"summary": base.summary, "accounting": base.accounting})
    rows = [(k, _fmt(v.get("this")), _fmt(v.get("baseline")), _fmt(v.get("diff")))
            for k, v in c.get("metrics", {}).items() if v.get("this") is not None or v.get("baseline") is not None]
    rows.append(("hinted pages never sent (this run, from the trace)", _fmt(c.get("skipped_pages_estimate")), "", ""))
    if c.get("guest_hinted_pages") is not None:
        rows.append(("pages the guest hinted (guest probe)", _fmt(c.get("guest_hinted_pages")), "", ""))
    rows.append(("normal pages saved (QMP: baseline - this run)", _fmt(c.get("qmp_normal_pages_saved")), "", ""))
    if c.get("note"):
        d.notes.append("A/B: " + str(c["note"]))
    return pd.DataFrame(rows, columns=["metric", "this run", "baseline", "difference"])


def run_facts(b: Bundle) -> pd.DataFrame:
    """Who/what/when of the run, from meta (escaped by :func:`table`)."""
    m = b.meta
    vmm = m.get("vmm", {}) if isinstance(m.get("vmm"), dict) else {}
    rows = [
        ("bundle", str(b.path)),
        ("producer", m.get("producer", "")),
        ("status / end", f"{m.get('status', '?')} / {m.get('end_reason', '?')}"),
        ("host", "; ".join(f"{k}={v}" for k, v in (m.get("host") or {}).items())),
        ("VMM", "; ".join(f"{k}={v}" for k, v in vmm.items()) or "–"),
    ]
    for k in ("guest", "labels", "lab", "sim"):
        if isinstance(m.get(k), dict):
            # Scalars only: nested configs (argv, knobs) belong to the bundle, not the headline.
            flat = {a: v for a, v in m[k].items() if not isinstance(v, (dict, list))}
            rows.append((k, "; ".join(f"{a}={v}" for a, v in flat.items())))
    rows = [(k, v if len(str(v)) <= 400 else str(v)[:400] + " …") for k, v in rows]
    return pd.DataFrame(rows, columns=["run", "value"])


# Summary rows: (flattened key, label).  Keys absent from a bundle's summary are left out.
SUMMARY_ROWS = [
    ("migration.outcome", "migration outcome"), ("migration.total_time_ms", "total time (ms)"),
    ("migration.downtime_ms", "downtime (ms)"), ("migration.transferred", "bytes transferred"),
    ("migration.normal", "normal pages sent"), ("migration.duplicate", "zero pages sent"),
    ("migration.dirty_sync_count", "QEMU dirty-sync-count"), ("migration.source", "migration numbers from"),
    ("syncs", "syncs"), ("sync_source", "sync boundaries from"), ("epochs", "hint epochs"),
    ("harvested_pages", "dirty pages harvested"), ("hints.applies", "hint applies"),
    ("hints.applied_pages", "hinted pages"),
    ("hints.skipped_pages", "skipped pages (never sent after the hint)"),
    ("hints.late_pages", "late hints (page already sent this epoch)"),
    ("hints.resent_pages", "resent pages (sent again after the hint)"),
    ("hints.bytes_saved_upper_bound", "bytes saved (upper bound)"),
    ("hints.applies_outside_epochs", "applies outside any epoch"), ("hints.send_source", "page sends from"),
    ("findings.verdict", "verdict"), ("findings.basis", "verdict basis"),
]


def summary_table(d: model.ReportData, base: model.ReportData | None = None) -> pd.DataFrame:
    """The headline numbers, labelled; with a baseline, its values and the relative change."""
    flat = model.flatten(d.summary)
    bflat = model.flatten(base.summary) if base is not None else {}
    rows = []
    for key, label in SUMMARY_ROWS:
        if key in flat or key in bflat:
            rows.append((label, key, flat.get(key), bflat.get(key)))
    for k in sorted(x for x in set(flat) | set(bflat) if x.startswith("findings.by_kind.")):
        rows.append((f"findings: {k.rsplit('.', 1)[1]}", k, flat.get(k, 0), bflat.get(k, 0)))
    if d.clock:
        c = d.clock
        w = c.get("width_ns")
        rows.append(("guest clock band (host - guest)",
                     "clock", f"[{_fmt(c.get('delta_lo_ns'))}, {_fmt(c.get('delta_hi_ns'))}] ns, width "
                              f"{_fmt(w / 1e3) + ' µs' if w is not None else 'unknown'}", None))
    shown = {r[1] for r in rows}
    known = {k for k, _ in SUMMARY_ROWS}
    # Anything else the analysis reports (not the data-completeness section, shown on its own).
    for k in [x for x in flat if x not in shown and x not in known and not x.startswith(("data.", "findings.", "bundle"))]:
        rows.append((k, k, flat[k], bflat.get(k)))
    df = pd.DataFrame({"metric": [r[0] for r in rows], "value": [_fmt(r[2]) for r in rows]})
    if base is not None:
        df["baseline"] = [_fmt(r[3]) for r in rows]
        df["change"] = [_delta(r[2], r[3]) for r in rows]
    return df


def _fmt(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        return f"{v:,.4g}" if abs(v) < 1e6 else f"{v:,.0f}"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return f"{int(v):,}"
    return "–" if v is None else v


def _delta(a: Any, b: Any) -> str:
    if isinstance(a, bool) or isinstance(b, bool):
        return ""
    if isinstance(a, (int, float, np.number)) and isinstance(b, (int, float, np.number)):
        if b == 0:
            return "" if a == 0 else "new"
        return f"{(a - b) / abs(b) * 100:+.1f}%"
    return "" if a == b else "differs"


def capture_facts(d: model.ReportData) -> pd.DataFrame:
    """Whether the capture finished, and where the analysis took memslots and page sends from."""
    data = d.summary.get("data", {}) if isinstance(d.summary.get("data"), dict) else {}
    rows = [("bundle complete", "yes" if d.bundle.complete else "no (a producer never closed it)"),
            ("end reason", str(d.bundle.meta.get("end_reason", "?")))]
    for k, label in (("memslot_source", "memslots from"), ("send_source", "page sends from")):
        if k in data:
            rows.append((label, str(data[k])))
    if isinstance(data.get("tables"), dict):
        rows.append(("tables present", ", ".join(k for k, v in data["tables"].items() if v) or "none"))
        rows.append(("tables absent", ", ".join(k for k, v in data["tables"].items() if not v) or "none"))
    return pd.DataFrame(rows, columns=["capture", "value"])


def findings_by_kind(d: model.ReportData) -> pd.DataFrame:
    f = d.findings
    if f.empty or "kind" not in f.columns:
        return pd.DataFrame({"kind": [], "findings": []})
    return f.groupby("kind").size().rename("findings").reset_index()


def findings_table(d: model.ReportData, limit: int = 200) -> pd.DataFrame:
    """Findings with their evidence chains (one timed step per line, ms on the timeline's axis)."""
    f = d.findings
    if f.empty:
        return f
    cols = [c for c in ["kind", "confidence", "severity", "sentence", "evidence", "gfn_count", "gfns"]
            if c in f.columns]
    out = f[cols].copy()
    out.insert(0, "id", [f"F{i + 1}" for i in range(len(out))])
    t0 = d.timeline.t0_ns
    if "evidence" in out:
        out["evidence"] = out["evidence"].map(lambda e: _chain(e, t0))
    if "gfns" in out:
        out["gfns"] = out["gfns"].map(_gfns)
    return out.head(limit).reset_index(drop=True)


def _chain(ev: Any, t0: int = 0) -> str:
    steps = tl.evidence_steps(ev)
    return "\n".join(f"{i + 1}. " + (f"{(t - t0) / 1e6:.3f} ms " if t >= 0 else "") + (f"[{side}] " if side else "")
                     + text for i, (t, side, text) in enumerate(steps))


def _gfns(v: Any, show: int = 6) -> str:
    if isinstance(v, (list, tuple, np.ndarray)):
        vals = [hex(int(x)) if isinstance(x, (int, np.integer)) else str(x) for x in list(v)[:show]]
        more = f" … (+{len(v) - show})" if len(v) > show else ""
        return ", ".join(vals) + more
    return str(v)


def epoch_pages(d: model.ReportData) -> pd.DataFrame:
    """Per epoch: hinted (applied) / skipped / late / resent pages - the analysis' accounting.

    Without the analysis package only hinted pages (from the apply lengths) can be shown.
    """
    e = d.epochs
    if d.analysed and len(e):
        cols = {"applied_pages": "hinted", "skipped_pages": "skipped", "late_pages": "late",
                "resent_pages": "resent"}
        out = e[["epoch", "applies"] + list(cols)].rename(columns=cols)
        out = out.assign(epoch=out["epoch"].map(lambda k: "outside" if k < 0 else str(k)))
        if (out["late"] < 0).all():   # the send source cannot tell late hints
            out = out.drop(columns="late")
        return out.reset_index(drop=True)
    ep = d.timeline.lane("epochs")
    ap = d.timeline.lane("applies")
    if ep.empty:
        return pd.DataFrame(columns=["epoch", "applies", "hinted"])
    starts = ep["start_ns"].to_numpy()
    k = np.searchsorted(starts, ap["start_ns"].to_numpy(), side="right") - 1
    pages = np.array([a.get("pages", 0) for a in ap["args"]], dtype=np.int64)
    ok = k >= 0
    hinted = np.bincount(k[ok], weights=pages[ok], minlength=len(ep)).astype(np.int64)
    applies = np.bincount(k[ok], minlength=len(ep)).astype(np.int64)
    return pd.DataFrame({"epoch": [str(a.get("epoch")) for a in ep["args"]], "applies": applies, "hinted": hinted})


def dirty_per_sync(d: model.ReportData) -> pd.DataFrame:
    """Pages each sync harvested (the analysis' sync table when present) and the rate since the previous sync."""
    s = d.syncs
    if s.empty:
        return pd.DataFrame(columns=["sync", "pages", "mib_s"])
    start, _, _, _ = tl.sync_windows(s)
    if "harvested" in s.columns:
        pages = s["harvested"].to_numpy(np.int64)
        extra = {c: s[c].to_numpy() for c in ("rearmed", "rearmed_by_hint") if c in s.columns}
    else:
        io = d.bundle.table("ioctls")
        get = io[io["name"].isin(["GET_DIRTY_LOG", "RESET_DIRTY_RINGS"]) & (io["pages"] >= 0)]
        k = np.searchsorted(start, get["ts_ns"].to_numpy(), side="right") - 1
        ok = k >= 0
        pages = np.bincount(k[ok], weights=get["pages"].to_numpy()[ok], minlength=len(s)).astype(np.int64)
        extra = {}
    gap = np.diff(start.astype(np.float64), prepend=np.nan) / 1e9
    rate = np.where(pages >= 0, np.maximum(pages, 0) * tl.PAGE / (1 << 20) / gap, np.nan)
    return pd.DataFrame({"sync": s["sync"].to_numpy(), "pages": pages, "mib_s": rate, **extra})


def guest_reports(b: Bundle, limit: int = 50) -> pd.DataFrame:
    """Status lines from the guest (probe attach, drop counts, lost-write reports): guest text, escaped."""
    r = b.table("guest_reports")
    if r.empty:
        return r
    keep = r[r["word"].isin(["ATTACHED", "STATS", "READY", "LOSTW", "PRESSURE"])]
    return keep[["side", "source", "word", "v0", "v1", "v2", "text"]].head(limit).reset_index(drop=True)


def show(fig, alt: str = "figure", dpi: int = 100):
    """Display a figure as an embedded PNG (works under any matplotlib backend) and close it."""
    import io

    import matplotlib.pyplot as plt
    from IPython.display import Image, display

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    display(Image(data=buf.getvalue(), format="png", alt=alt))


def timeline_figure(d: model.ReportData, title: str = ""):
    return plots.plot_timeline(d.timeline, title=title)


def zoom_window(d: model.ReportData) -> tuple[tuple[int, int], str] | None:
    """A host-time window worth a second look, and what it shows.

    Around the findings when they sit in a small part of the run; else around the syncs after
    the bulk round (where epochs are short and applies race syncs) when the bulk round dominates.
    """
    ev = d.timeline.events
    if ev.empty:
        return None
    lo, hi = int(ev["start_ns"].min()), int(ev["end_ns"].max())
    span = max(hi - lo, 1)
    for lane, what in (("findings", "the findings"), ("syncs", "the syncs after the bulk round")):
        rows = d.timeline.lane(lane)
        if lane == "syncs":
            rows = rows[rows["depth"] == 0].iloc[1:]
        if rows.empty:
            continue
        a, b = int(rows["start_ns"].min()), int(rows["end_ns"].max())
        margin = max((b - a) // 3, span // 1000, 1)
        a, b = max(lo, a - margin), min(hi, b + margin)
        if (b - a) < 0.6 * span:
            return (a, b), what
    return None


def zoom_figure(d: model.ReportData):
    z = zoom_window(d)
    if z is None:
        return None
    (a, b), what = z
    t0 = d.timeline.t0_ns
    return plots.plot_timeline(d.timeline, window=(a, b),
                               title=f"zoom on {what}: {(a - t0) / 1e6:.3f} – {(b - t0) / 1e6:.3f} ms")


def notes_table(d: model.ReportData) -> pd.DataFrame:
    return pd.DataFrame({"note": list(dict.fromkeys(d.notes))})
