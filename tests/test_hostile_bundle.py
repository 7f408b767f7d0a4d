"""Hostile bundles: meta.json and Parquet parts mutated by hypothesis, plus hand-made worst cases.

Every case must end in a one-line BundleError naming the file, or a load that keeps every row
of the undamaged parts and names each damaged file in ``Bundle.problems``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, strategies as st

from hintscope import limits, schema
from hintscope.bundle import BundleWriter, read_bundle
from hintscope.errors import HintscopeError
from test_hostile_util import FUZZ, assert_problems, clean, ioctl_rows

N_PARTS, ROWS = 4, 5


@pytest.fixture(scope="module")
def base_bundle(tmp_path_factory):
    """A closed bundle with N_PARTS ioctl parts of ROWS rows each (seq 0..19) and a memslots part."""
    p = tmp_path_factory.mktemp("hostile") / "base"
    w = BundleWriter(p, producer="probe host")
    w.set_source("host_ioctl", "captured")
    for i in range(N_PARTS):
        w.append("ioctls", ioctl_rows(ROWS, start=i * ROWS))
        w.flush()
    w.append("memslots", {"ts_ns": np.array([5], np.int64), "tid": np.array([7], np.int32),
                          "seq": np.array([0], np.int64), "slot": np.array([0], np.int32),
                          "as_id": np.array([0], np.int32), "flags": np.array([1], np.uint32),
                          "gpa": np.array([0], np.uint64), "size": np.array([1 << 26], np.uint64),
                          "hva": np.array([0x7f0000000000], np.uint64), "ret": np.array([0], np.int64)})
    w.close("duration")
    return p


def _copy(base: Path) -> tuple[tempfile.TemporaryDirectory, Path]:
    td = tempfile.TemporaryDirectory(prefix="hs-hostile-")
    d = Path(td.name) / "b"
    shutil.copytree(base, d)
    return td, d


def _load_everything(d: Path):
    """Open the bundle and read every registered table, as a consumer would."""
    b = read_bundle(d)
    _ = b.complete, b.tables()
    frames = {name: b.table(name) for name in schema.all_tables()}
    for name, df in frames.items():
        want = schema.get(name).arrow_schema.empty_table().to_pandas().dtypes
        assert list(df.columns) == list(want.index), name
        assert [str(x) for x in df.dtypes] == [str(x) for x in want], f"{name}: dtypes {df.dtypes.to_dict()}"
    return b, frames


# --- meta.json ------------------------------------------------------------------------------

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda c: st.one_of(st.lists(c, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), c, max_size=4)),
                          max_leaves=12)
META_KEYS = ["schema", "schema_version", "status", "producer", "producers", "sources", "lost", "clock_anchors",
             "end_reason", "rows", "host", "vmm", "qemu_trace", "created_realtime_ns"]


@FUZZ
@given(key=st.sampled_from(META_KEYS), value=json_value, extra=st.booleans())
def test_meta_field_replaced_by_any_json(base_bundle, key, value, extra):
    """Any JSON value in any meta field (in meta.json or a joining producer's meta-*.json)."""
    td, d = _copy(base_bundle)
    with td:
        target = d / ("meta-lab_migrate.json" if extra else "meta.json")
        meta = json.loads((d / "meta.json").read_text())
        if extra:
            meta = {"producer": "lab migrate", "status": "complete", "sources": {}, "lost": {}, "clock_anchors": []}
        meta[key] = value
        target.write_text(json.dumps(meta))  # allow_nan: writes NaN / Infinity literals
        r, err = clean(lambda: _load_everything(d), str(target), str(d))
        if r is not None:
            assert_problems(r[0].problems, str(d))
            # Damaged meta never costs rows.
            assert sorted(r[1]["ioctls"]["seq"]) == list(range(N_PARTS * ROWS))


@FUZZ
@given(data=st.binary(max_size=2048))
def test_meta_arbitrary_bytes(base_bundle, data):
    td, d = _copy(base_bundle)
    with td:
        (d / "meta.json").write_bytes(data)
        clean(lambda: _load_everything(d), str(d / "meta.json"))


@FUZZ
@given(cut=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)), max_size=8))
def test_meta_truncated_and_bit_flipped(base_bundle, cut, flips):
    td, d = _copy(base_bundle)
    with td:
        raw = bytearray((d / "meta.json").read_bytes())
        for pos, bit in flips:
            raw[int(pos * (len(raw) - 1))] ^= 1 << bit
        (d / "meta.json").write_bytes(bytes(raw[: max(1, int(cut * len(raw)))] if cut < 1 else raw))
        r, err = clean(lambda: _load_everything(d), str(d / "meta.json"))
        if r is not None:
            assert len(r[1]["ioctls"]) == N_PARTS * ROWS


@pytest.mark.parametrize("text", [
    "[" * 100_000 + "]" * 100_000,                                          # deep nesting
    '{"schema": "hintscope-bundle", "schema_version": "1.0", "x": ' + "[" * 50_000 + "]" * 50_000 + "}",
    '{"schema": "hintscope-bundle", "schema_version": ' + "9" * 5000 + "}",  # > int str digits limit
    '{"schema": "hintscope-bundle", "schema_version": 1e999}',                # inf
    '{"schema": "hintscope-bundle", "schema_version": NaN}',
    '{"schema": "hintscope-bundle", "schema_version": "1.0", "status": "complete", "producers": [1, 2]}',
    '{"schema": "hintscope-bundle", "schema_version": "1.0", "status": "complete", "producers": {"x": 3}}',
    '{"schema": "hintscope-bundle", "schema_version": "1.0", "status": "complete", "producers": "running"}',
    '{"schema": "hintscope-bundle", "schema_version": "1.0", "status": "complete", "clock_anchors": "x"}',
    '{"schema": "hintscope-bundle", "schema_version": "1.0", "status": "complete", "sources": [1]}',
    '\ufeff{"schema": "hintscope-bundle", "schema_version": "1.0"}',
    '{"schema": "hintscope-bundle", "schema_version": "1.0", "schema": "x"}',
])
def test_meta_worst_cases(base_bundle, text):
    td, d = _copy(base_bundle)
    with td:
        (d / "meta.json").write_text(text)
        clean(lambda: _load_everything(d), str(d / "meta.json"))


def test_meta_huge_file_is_refused_without_reading(base_bundle):
    td, d = _copy(base_bundle)
    with td:
        with open(d / "meta.json", "wb") as f:  # sparse: costs no disk
            f.truncate(limits.MAX_META_BYTES + 1)
        _, err = clean(lambda: read_bundle(d), "meta.json")
        assert err and "larger than" in err


def test_hostile_extra_meta_does_not_hide_rows(base_bundle):
    td, d = _copy(base_bundle)
    with td:
        (d / "meta-evil.json").write_text('{"producers": 5, "status": "complete", "sources": "x", "lost": []}')
        (d / "meta-evil2.json").write_text("[" * 10_000)
        b, frames = _load_everything(d)
        assert len(frames["ioctls"]) == N_PARTS * ROWS
        assert any("meta-evil2.json" in p for p in b.problems)
        assert_problems(b.problems, str(d))


# --- Parquet parts --------------------------------------------------------------------------

def _part_files(d: Path) -> list[Path]:
    return sorted((d / "ioctls").glob("part-*.parquet"))


def _bad_table(kind: str, n: int, seed: int) -> pa.Table:
    """A Parquet table that is well-formed Parquet but wrong for the ioctls schema."""
    rng = np.random.default_rng(seed)
    df = ioctl_rows(n, start=1000)
    at = pa.Table.from_pandas(df, preserve_index=False)
    i = at.column_names.index("ts_ns")
    if kind == "float-nan":
        vals = rng.choice([np.nan, np.inf, -np.inf, 1.5, 2.0], n)
        return at.set_column(i, "ts_ns", pa.array(vals, pa.float64()))
    if kind == "huge-uint":
        return at.set_column(i, "ts_ns", pa.array(np.full(n, 2**64 - 1, np.uint64)))
    if kind == "strings":
        return at.set_column(i, "ts_ns", pa.array([str(x) for x in rng.integers(0, 10, n)]))
    if kind == "nulls":
        return at.set_column(i, "ts_ns", pa.array([None if k % 2 else k for k in range(n)], pa.int64()))
    if kind == "nulls-bool-like":
        j = at.column_names.index("cmd")
        return at.set_column(j, "cmd", pa.array([None] * n, pa.uint32()))
    if kind == "missing-col":
        return at.drop_columns(["seq"])
    if kind == "extra-col":
        return at.append_column("evil", pa.array(["x" * 100] * n))
    if kind == "nested":
        return at.set_column(i, "ts_ns", pa.array([[1, 2]] * n, pa.list_(pa.int64())))
    if kind == "struct":
        return at.set_column(i, "ts_ns", pa.array([{"a": 1}] * n))
    if kind == "dictionary":
        j = at.column_names.index("name")
        return at.set_column(j, "name", pa.array(["GET_DIRTY_LOG"] * n).dictionary_encode())
    if kind == "negative-into-unsigned":
        j = at.column_names.index("cmd")
        return at.set_column(j, "cmd", pa.array(np.full(n, -5, np.int64)))
    if kind == "zero-rows":
        return at.slice(0, 0)
    raise AssertionError(kind)


BAD_KINDS = ["float-nan", "huge-uint", "strings", "nulls", "nulls-bool-like", "missing-col", "extra-col", "nested",
             "struct", "dictionary", "negative-into-unsigned", "zero-rows"]

byte_damage = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)), min_size=1, max_size=16)),
    st.tuples(st.just("random"), st.binary(max_size=4096)),
    st.tuples(st.just("zero-run"), st.tuples(st.floats(0, 1), st.integers(1, 512))),
)


def _damage_bytes(raw: bytes, how) -> bytes:
    kind, arg = how
    if kind == "truncate":
        return raw[: int(arg * len(raw))]
    if kind == "flip":
        b = bytearray(raw)
        for pos, bit in arg:
            b[int(pos * (len(b) - 1))] ^= 1 << bit
        return bytes(b)
    if kind == "random":
        return arg
    pos, n = arg
    b = bytearray(raw)
    s = int(pos * len(b))
    b[s:s + n] = bytes(len(b[s:s + n]))
    return bytes(b)


@FUZZ
@given(victims=st.sets(st.integers(0, N_PARTS - 1), min_size=1, max_size=N_PARTS), how=byte_damage)
def test_parts_byte_damage_keeps_other_parts(base_bundle, victims, how):
    td, d = _copy(base_bundle)
    with td:
        parts = _part_files(d)
        for v in victims:
            parts[v].write_bytes(_damage_bytes(parts[v].read_bytes(), how))
        b, frames = _load_everything(d)
        assert_problems(b.problems, str(d))
        got = set(frames["ioctls"]["seq"].tolist())
        intact = {s for i in range(N_PARTS) if i not in victims for s in range(i * ROWS, (i + 1) * ROWS)}
        assert intact <= got, "rows of an undamaged part were lost"
        # A damaged part that is still readable may decode (Parquet has no data checksum), else it is named.
        for v in victims:
            rows_v = set(range(v * ROWS, (v + 1) * ROWS))
            if not rows_v <= got:
                assert any(parts[v].name in p for p in b.problems), (parts[v].name, b.problems)


@FUZZ
@given(kind=st.sampled_from(BAD_KINDS), n=st.integers(0, 50), seed=st.integers(0, 2**16), slot=st.integers(0, 5))
def test_parts_wrong_types_and_values(base_bundle, kind, n, seed, slot):
    td, d = _copy(base_bundle)
    with td:
        at = _bad_table(kind, n, seed)
        pq.write_table(at, d / "ioctls" / f"part-evil-{slot:05d}.parquet")
        b, frames = _load_everything(d)
        assert_problems(b.problems, str(d))
        df = frames["ioctls"]
        assert set(range(N_PARTS * ROWS)) <= set(df["seq"].tolist())
        assert df["ts_ns"].notna().all() and df["cmd"].notna().all()


@FUZZ
@given(ts=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=200), dup=st.integers(0, 5))
def test_duplicated_out_of_order_and_clock_jumps(base_bundle, ts, dup):
    """Events in any order, repeated, with clock jumps anywhere in int64: loaded as they are, sorted."""
    td, d = _copy(base_bundle)
    with td:
        df = ioctl_rows(len(ts), start=100)
        df["ts_ns"] = np.array(ts, np.int64)
        df = pd.concat([df] * (dup + 1), ignore_index=True)
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), d / "ioctls" / "part-evil-00000.parquet")
        b, frames = _load_everything(d)
        out = frames["ioctls"]
        assert len(out) == N_PARTS * ROWS + len(df)
        assert out["ts_ns"].is_monotonic_increasing


def test_part_that_is_not_a_regular_file(base_bundle):
    """A FIFO or a symlink named like a part must be skipped, not opened (a FIFO would block forever)."""
    td, d = _copy(base_bundle)
    with td:
        os.mkfifo(d / "ioctls" / "part-evil-00000.parquet")
        os.symlink("/dev/zero", d / "ioctls" / "part-evil-00001.parquet")
        (d / "ioctls" / "part-evil-00002.parquet").mkdir()
        pq.write_table(pa.Table.from_pandas(ioctl_rows(3, 500)), d / "ioctls" / "part-evil-00002.parquet" / "x.parquet")
        code = f"""
from hintscope.bundle import read_bundle
b = read_bundle({str(d)!r})
df = b.table('ioctls')
print(len(df)); print(len(b.problems))
for p in b.problems: print(p)
"""
        r = limits.run_capped(code, timeout=60)
        assert not r.timed_out, "reader blocked on a FIFO part"
        assert r.returncode == 0 and not r.traceback, r.stderr[-2000:]
        lines = r.stdout.splitlines()
        assert int(lines[0]) == N_PARTS * ROWS
        assert int(lines[1]) == 3 and all("not a regular file" in p for p in lines[2:])


def test_many_tiny_parts_are_capped(base_bundle):
    """10**4 one-row parts with a cap of 2000: the first 2000 load, the rest are named as skipped."""
    td, d = _copy(base_bundle)
    with td:
        one = d / "ioctls" / "part-probe_host-00000.parquet"
        for i in range(10_000):
            os.link(one, d / "ioctls" / f"part-evil-{i:05d}.parquet")
        with limits.override(MAX_PARTS_PER_TABLE=2000):
            b = read_bundle(d)
            df = b.table("ioctls")
        assert len(df) == 2000 * ROWS
        assert any("parts" in p and "not read" in p for p in b.problems), b.problems
        assert_problems(b.problems, str(d))


def test_million_rows_one_part_loads(base_bundle):
    td, d = _copy(base_bundle)
    with td:
        pq.write_table(pa.Table.from_pandas(ioctl_rows(1_000_000, 100), preserve_index=False),
                       d / "ioctls" / "part-evil-00000.parquet")
        b = read_bundle(d)
        assert len(b.table("ioctls")) == 1_000_000 + N_PARTS * ROWS and b.problems == []


def test_part_declaring_too_many_rows_is_skipped_by_footer(base_bundle):
    td, d = _copy(base_bundle)
    with td:
        pq.write_table(pa.Table.from_pandas(ioctl_rows(2000, 100), preserve_index=False),
                       d / "ioctls" / "part-evil-00000.parquet")
        with limits.override(MAX_PART_ROWS=1000):
            b = read_bundle(d)
            df = b.table("ioctls")
        assert len(df) == N_PARTS * ROWS
        assert any("part-evil-00000.parquet" in p and "rows" in p for p in b.problems), b.problems


# --- memory bound -----------------------------------------------------------------------------

BOMB = """
import numpy as np, pyarrow as pa, pyarrow.parquet as pq, sys
sys.path.insert(0, {tests!r})
from test_hostile_util import ioctl_rows
from hintscope.bundle import BundleWriter
w = BundleWriter({path!r}, producer='victim')
w.append('ioctls', ioctl_rows(5)); w.close('duration')
n = {rows}
cols = {{c: pa.array(np.zeros(n, np.int64)) for c in ['ts_ns','enter_ns','seq','ret','first_page','num_pages','pages','cap']}}
cols.update(tid=pa.array(np.zeros(n, np.int32)), fd=pa.array(np.zeros(n, np.int32)), slot=pa.array(np.zeros(n, np.int32)),
            cmd=pa.array(np.zeros(n, np.uint32)), arg0=pa.array(np.zeros(n, np.uint64)),
            name=pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array(['X' * 4096])))
pq.write_table(pa.table(cols), {path!r} + '/ioctls/part-evil-00000.parquet', compression='zstd', row_group_size=1 << 22)
"""


def test_compression_bomb_part_is_bounded(tmp_path):
    """A ~1 MB part that decodes to ~50 GB (zeros + one 4 KiB string repeated): loaded under 1.5 GiB AS."""
    d = tmp_path / "bomb"
    rows = 12_000_000
    import subprocess
    import sys
    subprocess.run([sys.executable, "-c", BOMB.format(tests=str(Path(__file__).parent), path=str(d), rows=rows)],
                   check=True, timeout=120)
    assert (d / "ioctls" / "part-evil-00000.parquet").stat().st_size < 64 << 20
    code = f"""
from hintscope.bundle import read_bundle
b = read_bundle({str(d)!r})
print(len(b.table('ioctls')))
for p in b.problems: print(p)
"""
    r = limits.run_capped(code, timeout=120)
    assert not r.timed_out and not r.traceback, r.stderr[-2000:]
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout.splitlines()
    assert int(out[0]) == 5, out
    assert any("part-evil-00000.parquet" in p for p in out[1:]), out


@pytest.mark.lab
def test_million_tiny_parts_default_cap(base_bundle):
    """10**6 one-part hard links with the default cap: bounded time, the cap's parts load, the rest are named."""
    import time

    td, d = _copy(base_bundle)
    with td:
        one = d / "ioctls" / "part-probe_host-00000.parquet"
        srcs = []
        for k in range(20):  # a file takes at most 65000 links
            c = d / f"src-{k}.parquet"
            shutil.copyfile(one, c)
            srcs.append(c)
        for i in range(1_000_000):
            os.link(srcs[i // 60_000], d / "ioctls" / f"part-evil-{i:07d}.parquet")
        code = f"""
from hintscope.bundle import read_bundle
b = read_bundle({str(d)!r})
print(len(b.table('ioctls')))
for p in b.problems: print(p)
"""
        t0 = time.monotonic()
        r = limits.run_capped(code, timeout=600)
        print(f"\nMILLION-PARTS: {time.monotonic() - t0:.1f} s, {r.stdout.splitlines()[:2]}")
        assert not r.timed_out and not r.traceback and r.returncode == 0, r.stderr[-2000:]
        lines = r.stdout.splitlines()
        assert int(lines[0]) == limits.MAX_PARTS_PER_TABLE * ROWS
        assert any("not read" in ln for ln in lines[1:])
