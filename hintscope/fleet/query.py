"""``hintscope fleet query INDEX --group K,.. --metric M,..``: per-group numbers over the index (polars).

polars, not DuckDB: it was already in the venv (the test extra), its lazy ``scan_parquet`` reads the
hive ``date=`` partitions and pushes column selection and filters down into the Parquet reader,
and the index is typed columns grouped by labels, which the expression API covers without SQL
strings built from user input.

Per group and metric: runs with a value, mean, median, min, max and ``rate`` (share of those
runs with a value > 0; for ``hazards`` that is the share of runs with a safety hazard).  Error
rows are counted per group (``errors``) and left out of the metrics.
"""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl

from hintscope.errors import HintscopeError
from hintscope.fleet.row import SCHEMA

STATS = ("runs", "mean", "median", "min", "max", "rate")
_NUMERIC = {f.name for f in SCHEMA if str(f.type) in ("int64", "double")}
_KEYS = {f.name for f in SCHEMA if str(f.type) in ("string", "bool")}


def load(index: str | Path, errors: bool = True) -> pl.LazyFrame:
    """The index as a lazy frame, the latest row per bundle path."""
    index = Path(index)
    files = sorted(index.glob("date=*/*.parquet"))
    if not files:
        raise HintscopeError(f"{index}: no fleet index there (run `hintscope fleet index BUNDLES -o {index}`)")
    try:
        lf = pl.scan_parquet([str(f) for f in files], hive_partitioning=True, hive_schema={"date": pl.String})
        lf = lf.sort("indexed_ns").group_by("bundle", maintain_order=True).last()
    except (pl.exceptions.PolarsError, OSError) as e:
        raise HintscopeError(f"{index}: unreadable fleet index ({' '.join(str(e).split())[:200]})") from None
    return lf if errors else lf.filter(pl.col("status") == "ok")


def _check(names: list[str], allowed: set[str], what: str) -> None:
    bad = [n for n in names if n not in allowed]
    if bad:
        raise HintscopeError(f"{what} {','.join(bad)}: not an index column (choose from {', '.join(sorted(allowed))})")


def parse_where(items: list[str]) -> list[pl.Expr]:
    out = []
    for it in items or []:
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(!?=)(.*)", it)
        if not m:
            raise HintscopeError(f"--where {it!r}: expected KEY=VALUE or KEY!=VALUE")
        _check([m.group(1)], _KEYS | {"date"}, "--where")
        e = pl.col(m.group(1)).cast(pl.String) == m.group(3)
        out.append(e if m.group(2) == "=" else ~e)
    return out


def query(index: str | Path, group: list[str], metrics: list[str], where: list[str] | None = None) -> pl.DataFrame:
    """One row per group: runs, errors, and ``<metric>.<stat>`` for each stat in :data:`STATS`."""
    _check(group, _KEYS | {"date"}, "--group")
    _check(metrics, _NUMERIC, "--metric")
    lf = load(index)
    for e in parse_where(where or []):
        lf = lf.filter(e)
    ok = pl.col("status") == "ok"
    aggs = [ok.sum().alias("runs"), (~ok).sum().alias("errors")]
    for m in metrics:
        v = pl.col(m).filter(ok)
        aggs += [v.count().alias(f"{m}.runs"), v.mean().alias(f"{m}.mean"), v.median().alias(f"{m}.median"),
                 v.min().alias(f"{m}.min"), v.max().alias(f"{m}.max"),
                 ((v > 0).sum() / v.count()).alias(f"{m}.rate")]
    keys = [pl.col(g).cast(pl.String).fill_null("?") for g in group]
    try:
        df = lf.group_by(keys).agg(aggs).sort(group).collect() if group else lf.select(aggs).collect()
    except pl.exceptions.PolarsError as e:
        raise HintscopeError(f"{index}: query failed ({' '.join(str(e).split())[:200]})") from None
    return df


def runs(index: str | Path, columns: list[str] | None = None) -> pl.DataFrame:
    """The latest row per bundle (all columns, or those given)."""
    lf = load(index)
    return (lf.select(columns) if columns else lf).collect()
