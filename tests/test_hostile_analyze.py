"""Hostile bundles through the whole reader stack: ``hintscope analyze`` (in-process CLI) on a simulated
bundle whose meta sections and table values were replaced by hypothesis.  The CLI must answer (exit
0/1) or print one ``hintscope: error:`` line (exit 2): never a traceback."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, strategies as st

from hintscope import cli
from hintscope.bundle import read_bundle
from test_hostile_util import FUZZ, one_line

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**65), 2**65), st.floats(), st.text(max_size=12))
json_value = st.recursive(json_leaf, lambda c: st.one_of(st.lists(c, max_size=3),
                                                         st.dictionaries(st.text(max_size=8), c, max_size=3)),
                          max_leaves=8)


@pytest.fixture(scope="module")
def sim_bundle(tmp_path_factory):
    p = tmp_path_factory.mktemp("hsim") / "b"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = cli.main(["simulate", "--variant", "filter-after-sync", "--pages", "512", "-o", str(p)])
    assert rc == 0
    return p


def run_analyze(d: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["analyze", str(d), "--json"])
    return rc, out.getvalue(), err.getvalue()


def _check(rc: int, out: str, err: str) -> None:
    assert rc in (0, 1, 2), rc
    if rc == 2:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("hintscope: error:") and one_line(lines[0]), err
    else:
        json.loads(out)


@FUZZ
@given(key=st.sampled_from(["vmm", "sources", "lost", "clock_anchors", "qemu_trace", "lab", "host_probe", "memcheck",
                            "sim", "ground_truth", "end_reason", "rows", "host", "guest"]),
       value=json_value)
def test_analyze_survives_any_meta_section(sim_bundle, key, value):
    with tempfile.TemporaryDirectory(prefix="hs-hostile-an-") as td:
        d = Path(td) / "b"
        shutil.copytree(sim_bundle, d)
        meta = json.loads((d / "meta.json").read_text())
        meta[key] = value
        (d / "meta.json").write_text(json.dumps(meta))
        _check(*run_analyze(d))


@FUZZ
@given(table=st.sampled_from(["ioctls", "bitmap_words", "memslots", "guest_hints", "guest_events", "qemu_events",
                              "lost_pages"]),
       col_pick=st.integers(0, 50), how=st.sampled_from(["min", "max", "zero", "neg1", "shuffle", "dup", "empty"]))
def test_analyze_survives_extreme_values(sim_bundle, table, col_pick, how):
    with tempfile.TemporaryDirectory(prefix="hs-hostile-an-") as td:
        d = Path(td) / "b"
        shutil.copytree(sim_bundle, d)
        parts = sorted((d / table).glob("part-*.parquet"))
        if not parts:
            return
        at = pq.read_table(parts[0])
        i = col_pick % at.num_columns
        col = at.column(i)
        n = at.num_rows
        if how == "empty":
            at = at.slice(0, 0)
        elif how == "shuffle":
            at = at.take(pa.array(np.random.default_rng(col_pick).permutation(n)))
        elif how == "dup":
            at = pa.concat_tables([at, at])
        elif pa.types.is_integer(col.type):
            info = np.iinfo(col.type.to_pandas_dtype())
            v = {"min": info.min, "max": info.max, "zero": 0, "neg1": -1 if info.min < 0 else info.max}[how]
            at = at.set_column(i, at.field(i), pa.array(np.full(n, v, col.type.to_pandas_dtype())))
        elif pa.types.is_floating(col.type):
            v = {"min": -np.inf, "max": np.inf, "zero": 0.0, "neg1": np.nan}[how]
            at = at.set_column(i, at.field(i), pa.array(np.full(n, v)))
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            v = {"min": "", "max": "x" * 4000, "zero": "\x00", "neg1": "\u202e"}[how]
            at = at.set_column(i, at.field(i), pa.array([v] * n, col.type))
        pq.write_table(at, parts[0])
        b = read_bundle(d)
        _check(*run_analyze(d))
        assert all(one_line(p) for p in b.problems)


@pytest.mark.parametrize("table", ["ioctls", "qemu_events"])
def test_analyze_ts_at_int64_max(sim_bundle, table):
    """Every ts_ns = 2**63-1: analysis sentinels (t_end + 1) overflowed before the clamp in syncs/hints."""
    with tempfile.TemporaryDirectory(prefix="hs-hostile-an-") as td:
        d = Path(td) / "b"
        shutil.copytree(sim_bundle, d)
        for f in (d / table).glob("part-*.parquet"):
            at = pq.read_table(f)
            i = at.column_names.index("ts_ns")
            at = at.set_column(i, "ts_ns", pa.array(np.full(at.num_rows, np.iinfo(np.int64).max, np.int64)))
            pq.write_table(at, f)
        _check(*run_analyze(d))
