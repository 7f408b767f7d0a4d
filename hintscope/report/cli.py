"""``hintscope report BUNDLE -o report.html [--baseline B]``: the run report as one static HTML page."""

from __future__ import annotations

import argparse
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    from hintscope.report.render import render

    out = render(args.bundle, args.output, baseline=args.baseline, keep_notebook=args.keep_notebook)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="render a run report (HTML) from a bundle",
        description="Execute the report notebook headless on BUNDLE (papermill) and render it to HTML without "
                    "code: summary, timeline of host and guest lanes with findings, per-epoch pages, dirty rate "
                    "per sync, findings with evidence, and an A/B comparison with --baseline.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  hintscope report samples/linux-hint-on -o on.html --baseline samples/linux-hint-off")
    p.add_argument("bundle", help="run bundle directory")
    p.add_argument("-o", "--output", type=Path, default=Path("report.html"), help="HTML file (default report.html)")
    p.add_argument("--baseline", help="second bundle to compare against (A/B)")
    p.add_argument("--keep-notebook", type=Path, metavar="IPYNB", help="also keep the executed notebook here")
    p.set_defaults(func=_run)
