"""``hintscope fleet index|query|plot``: regression analysis over many runs (docs/fleet.md)."""

from __future__ import annotations

import argparse
import json
import sys

from hintscope.errors import HintscopeError


def _csv_list(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def _index(args: argparse.Namespace) -> int:
    from hintscope.fleet.engines import Engine
    from hintscope.fleet.index import build

    if args.scheduler and args.dask_local:
        raise HintscopeError("--scheduler and --dask-local exclude each other")
    if args.scheduler:
        eng = Engine("dask", scheduler=args.scheduler)
    elif args.dask_local:
        eng = Engine("dask", jobs=args.dask_local)
    elif args.jobs == 1:
        eng = Engine("serial")
    else:
        eng = Engine("processes", jobs=args.jobs)
    st = build(args.bundles, args.output, eng, progress=None if not args.quiet else False, force=args.force)
    print(st.line())
    for p in st.error_rows[:10]:
        print(f"  error row: {p}")
    if len(st.error_rows) > 10:
        print(f"  ... and {len(st.error_rows) - 10} more (query with --where status=error)")
    return 0


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e6 else f"{v:.4g}"
    return str(v)


def _query(args: argparse.Namespace) -> int:
    from hintscope.fleet.query import query

    group, metrics = _csv_list(args.group), _csv_list(args.metric) or ["hazards"]
    df = query(args.index, group, metrics, args.where)
    if args.csv:
        df.write_csv(args.csv)
    if args.json:
        json.dump(df.to_dicts(), sys.stdout, indent=1, default=str)
        print()
        return 0
    # compact text: per metric "median [min..max] rate"
    head = group + ["runs", "errors"] + [f"{m} median [min..max] (>0 share)" for m in metrics]
    rows = []
    for r in df.to_dicts():
        cells = [str(r[g]) for g in group] + [str(r["runs"]), str(r["errors"])]
        for m in metrics:
            cells.append(f"{_fmt(r[f'{m}.median'])} [{_fmt(r[f'{m}.min'])}..{_fmt(r[f'{m}.max'])}] "
                         f"({_fmt(r[f'{m}.rate'])})")
        rows.append(cells)
    w = [max(len(h), *(len(c[i]) for c in rows)) if rows else len(h) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w[i]) for i, h in enumerate(head)))
    for c in rows:
        print("  ".join(x.ljust(w[i]) for i, x in enumerate(c)))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from hintscope.fleet.plot import plot

    files = plot(args.index, args.metric, args.x, _csv_list(args.group), args.output, stat=args.stat)
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fleet", help="index many runs into Parquet; query and plot them by label",
                       description=__doc__)
    fs = p.add_subparsers(dest="fleet_command", metavar="WHAT", required=True)

    i = fs.add_parser("index", help="analyse bundles into a Parquet index (incremental)",
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      description="One row per run (labels, summary metrics, verdict, findings per kind, path, "
                                  "content hash) in a Parquet dataset partitioned by date.  Bundles whose hash is "
                                  "already indexed are skipped; a bundle that cannot be analysed becomes an error row.",
                      epilog="examples:\n  hintscope fleet index runs/ -o fleet.idx            # local processes\n"
                             "  hintscope fleet index runs/ -o fleet.idx --dask-local 4\n"
                             "  hintscope fleet index runs/ -o fleet.idx --scheduler tcp://10.0.0.5:8786")
    i.add_argument("bundles", nargs="+", help="bundle directories, or directories holding bundles")
    i.add_argument("-o", "--output", required=True, metavar="INDEX", help="index directory (created or extended)")
    i.add_argument("-j", "--jobs", type=int, default=None, help="local worker processes (default: all cores; 1 = "
                   "serial in this process)")
    i.add_argument("--dask-local", type=int, metavar="N", help="run on a dask.distributed LocalCluster of N processes")
    i.add_argument("--scheduler", metavar="tcp://HOST:PORT", help="run on an existing Dask scheduler")
    i.add_argument("--force", action="store_true", help="re-analyse bundles even when their hash is indexed")
    i.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    i.set_defaults(func=_index)

    q = fs.add_parser("query", help="per-group statistics of metrics over the index")
    q.add_argument("index")
    q.add_argument("--group", default="qemu,dirty_mode,hint", help="label columns (default qemu,dirty_mode,hint)")
    q.add_argument("--metric", default="lost_writes,bytes_saved_upper_bound,hazards",
                   help="numeric columns (default lost_writes,bytes_saved_upper_bound,hazards)")
    q.add_argument("--where", action="append", metavar="KEY=VALUE", help="keep rows with KEY=VALUE (or KEY!=VALUE)")
    q.add_argument("--csv", metavar="FILE", help="also write the full table (mean, median, min, max, rate) as CSV")
    q.add_argument("--json", action="store_true", help="print the full table as JSON")
    q.set_defaults(func=_query)

    pl_ = fs.add_parser("plot", help="a metric against QEMU version or date, one series per group")
    pl_.add_argument("index")
    pl_.add_argument("--metric", default="bytes_saved_upper_bound")
    pl_.add_argument("--x", default="qemu", help="x axis: qemu (version order), date, or another label")
    pl_.add_argument("--group", default="dirty_mode", help="series: label columns (default dirty_mode)")
    pl_.add_argument("--stat", default="median", choices=["median", "mean"], help="the line per series (default median)")
    pl_.add_argument("-o", "--output", default="fleet.png", help="image file (.png or .svg)")
    pl_.set_defaults(func=_plot)
