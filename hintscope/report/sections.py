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
from hintscope.report import model, plots
from hintscope.report import timeline as tl

# Summary keys shown first, in this order, when the analysis provides them.
KEY_ORDER = ["outcome", "status", "duration_s", "total_time_ms", "transferred_bytes", "bytes", "syncs", "epochs",
             "hint_applies", "hinted_pages", "skipped_pages", "resent_pages", "bytes_saved"]


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
            rows.append((k, "; ".join(f"{a}={v}" for a, v in m[k].items())))
    return pd.DataFrame(rows, columns=["run", "value"])


def summary_table(d: model.ReportData, base: model.ReportData | None = None) -> pd.DataFrame:
    flat = model.flatten(d.summary)
    keys = [k for k in KEY_ORDER if k in flat] + [k for k in flat if k not in KEY_ORDER]
    df = pd.DataFrame({"metric": keys, "value": [_fmt(flat[k]) for k in keys]})
    if base is not None:
        bflat = model.flatten(base.summary)
        df["baseline"] = [_fmt(bflat.get(k)) for k in keys]
        df["change"] = [_delta(flat.get(k), bflat.get(k)) for k in keys]
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


def findings_by_kind(d: model.ReportData) -> pd.DataFrame:
    f = d.findings
    if f.empty or "kind" not in f.columns:
        return pd.DataFrame({"kind": [], "findings": []})
    return f.groupby("kind").size().rename("findings").reset_index()


def findings_table(d: model.ReportData, limit: int = 200) -> pd.DataFrame:
    """Findings with their evidence chains (one line per step), strongest first."""
    f = d.findings
    if f.empty:
        return f
    cols = [c for c in ["kind", "confidence", "sentence", "evidence", "gfns"] if c in f.columns]
    extra = [c for c in ("epoch", "sync", "ts_ns") if c in f.columns]
    out = f[cols + extra].copy()
    if "evidence" in out:
        out["evidence"] = out["evidence"].map(_chain)
    if "gfns" in out:
        out["gfns"] = out["gfns"].map(_gfns)
    if "confidence" in out and pd.api.types.is_numeric_dtype(out["confidence"]):
        out = out.sort_values("confidence", ascending=False, kind="stable")
    return out.head(limit).reset_index(drop=True)


def _chain(ev: Any) -> str:
    if isinstance(ev, (list, tuple, np.ndarray)):
        return "\n".join(f"{i + 1}. {_text(x) if isinstance(x, dict) else x}" for i, x in enumerate(ev))
    if isinstance(ev, dict):
        return "\n".join(f"{k}: {v}" for k, v in ev.items())
    return str(ev)


def _gfns(v: Any, show: int = 6) -> str:
    if isinstance(v, (list, tuple, np.ndarray)):
        vals = [hex(int(x)) if isinstance(x, (int, np.integer)) else str(x) for x in list(v)[:show]]
        more = f" … (+{len(v) - show})" if len(v) > show else ""
        return ", ".join(vals) + more
    return str(v)


def epoch_pages(d: model.ReportData) -> pd.DataFrame:
    """Per epoch: hinted / skipped / resent pages (analysis accounting when present, else hinted only)."""
    fn = model._optional("hintscope.analysis.hints", "epoch_table")
    if fn is not None:
        try:
            e = fn(d.bundle)
            keep = ["epoch"] + [c for c in ("hinted_pages", "skipped_pages", "resent_pages", "late_pages")
                                if c in e.columns]
            if len(keep) > 1:
                return e[keep].rename(columns=lambda c: c.replace("_pages", ""))
        except Exception as ex:  # noqa: BLE001
            d.notes.append(f"hint accounting per epoch failed: {type(ex).__name__}: {ex}")
    ep = d.timeline.lane("epochs")
    ap = d.timeline.lane("applies")
    if ep.empty:
        return pd.DataFrame(columns=["epoch", "hinted"])
    starts = ep["start_ns"].to_numpy()
    k = np.searchsorted(starts, ap["start_ns"].to_numpy(), side="right") - 1
    pages = np.array([a.get("pages", 0) for a in ap["args"]], dtype=np.int64)
    ok = k >= 0
    hinted = np.bincount(k[ok], weights=pages[ok], minlength=len(ep)).astype(np.int64)
    return pd.DataFrame({"epoch": [a.get("epoch") for a in ep["args"]], "hinted": hinted})


def dirty_per_sync(d: model.ReportData) -> pd.DataFrame:
    """Pages harvested by each sync's GET_DIRTY_LOG / ring reset, and the rate since the previous sync."""
    s = tl.host_syncs(d.bundle.table("qemu_events"))
    io = d.bundle.table("ioctls")
    get = io[io["name"].isin(["GET_DIRTY_LOG", "RESET_DIRTY_RINGS"]) & (io["pages"] >= 0)]
    if s.empty:
        return pd.DataFrame(columns=["sync", "pages", "mib_s"])
    before = s["before_ns"].to_numpy()
    k = np.searchsorted(before, get["ts_ns"].to_numpy(), side="right") - 1
    ok = k >= 0
    pages = np.bincount(k[ok], weights=get["pages"].to_numpy()[ok], minlength=len(s)).astype(np.int64)
    gap = np.diff(before, prepend=np.nan) / 1e9
    rate = pages * tl.PAGE / (1 << 20) / gap
    return pd.DataFrame({"sync": s["sync"], "pages": pages, "mib_s": rate})


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


def notes_table(d: model.ReportData) -> pd.DataFrame:
    return pd.DataFrame({"note": list(dict.fromkeys(d.notes))})
