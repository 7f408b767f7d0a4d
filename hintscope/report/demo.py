"""``hintscope demo [-o DIR]``: report, regression plots and Perfetto traces from the bundled samples.

Needs no root, BPF or KVM: it reads the real run bundles committed under ``samples/``.  Only
when that directory holds no bundle does it simulate two runs instead, and it says so.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from hintscope.errors import HintscopeError

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = Path("hintscope-demo")


def sample_bundles(samples: Path) -> list[Path]:
    if not samples.is_dir():
        return []
    return sorted(p for p in samples.iterdir() if (p / "meta.json").is_file())


def _baseline_for(b: Path, all_: list[Path]) -> Path | None:
    """``x-hint-on`` is compared with ``x-hint-off`` when both are there."""
    m = re.fullmatch(r"(.*)-on", b.name)
    if not m:
        return None
    other = b.with_name(f"{m.group(1)}-off")
    return other if other in all_ else None


def simulate_samples(out: Path) -> list[Path]:
    from hintscope.sim.write import simulate, write_bundle

    made = []
    for variant in ("qemu", "filter-after-sync"):
        p = out / f"sim-{variant}"
        if not (p / "meta.json").exists():
            write_bundle(simulate(variant, 1), p)
        made.append(p)
    return made


def run(out: Path, samples: Path) -> dict:
    from rich.console import Console
    from rich.table import Table

    from hintscope.bundle import read_bundle
    from hintscope.report import compare, model, perfetto
    from hintscope.report.progress import steps
    from hintscope.report.render import execute, to_html

    console = Console(soft_wrap=True)
    if not console.is_terminal:
        console.width = 160   # a log or a pipe: do not cut the summary table at 80 columns
    out.mkdir(parents=True, exist_ok=True)
    bundles = sample_bundles(samples)
    source = f"sample bundles in {samples}"
    if not bundles:
        console.print(f"[yellow]{samples} holds no bundle: using simulator bundles instead "
                      f"(hintscope simulate), written to {out / 'bundles'}[/yellow]")
        bundles = simulate_samples(out / "bundles")
        source = "simulator bundles (samples/ is empty)"
    files: dict[str, list[Path]] = {"reports": [], "perfetto": [], "regression": []}
    rows = []
    with steps() as step:
        for b in bundles:
            base = _baseline_for(b, bundles)
            html = out / f"report-{b.name}.html"
            with step(f"report {b.name}" + (f" (baseline {base.name})" if base else "")) as update:
                nb = out / f".report-{b.name}.ipynb"
                execute(b, nb, base, on_cell=update)
                to_html(nb, html, title=f"hintscope report: {b.name}")
                nb.unlink()
            files["reports"].append(html)
            with step(f"Perfetto trace {b.name}"):
                tr = out / f"trace-{b.name}.pftrace"
                perfetto.export(b, tr)
            files["perfetto"].append(tr)
            bb = read_bundle(b)
            s = model.flatten(model.load_summary(bb, []))
            rows.append((b.name, s, len(model.load_findings(bb, []))))
        with step(f"regression plots over {len(bundles)} runs"):
            df = compare.collect([str(b) for b in bundles])
            files["regression"] = compare.write(df, out / "regression")

    t = Table(title=f"hintscope demo: {source}")
    keys = {"migration.outcome": "outcome", "migration.total_time_ms": "ms", "syncs": "syncs", "epochs": "epochs",
            "hints.applied_pages": "hinted", "hints.skipped_pages": "skipped", "hints.resent_pages": "resent"}
    shown = [k for k in keys if any(k in s for _, s, _ in rows)]
    t.add_column("run")
    for k in shown:
        t.add_column(keys[k], justify="right")
    t.add_column("findings", justify="right")
    for name, s, nf in rows:
        t.add_row(name, *[_cell(s.get(k)) for k in shown], str(nf))
    console.print(t)
    console.print(f"[bold]files in {out.resolve()}[/bold]")
    for kind, fs in files.items():
        shown_files = [f.name for f in fs if f.suffix != ".svg"]
        console.print(f"  {kind}: {', '.join(shown_files)}")
    console.print("open a report-*.html in a browser; load a trace-*.pftrace at https://ui.perfetto.dev")
    return files


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _run(args: argparse.Namespace) -> int:
    samples = Path(args.samples) if args.samples else REPO / "samples"
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise HintscopeError(f"{out}: exists and is not a directory")
    run(out, samples)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="report, plots and Perfetto traces from the bundled samples (no root)",
                       description=__doc__.split("\n\n", 1)[1])
    p.add_argument("-o", "--output", default=str(DEFAULT_OUT), help=f"output directory (default ./{DEFAULT_OUT})")
    p.add_argument("--samples", help="directory of sample bundles (default: samples/ of this checkout)")
    p.set_defaults(func=_run)
