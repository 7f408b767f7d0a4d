import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from hintscope.bundle import BundleWriter, mono_from_wall, read_bundle
from hintscope.errors import BundleError


def _ioctl_rows(n, start=0):
    return pd.DataFrame({
        "ts_ns": np.arange(start, start + n, dtype=np.int64) * 10,
        "enter_ns": np.arange(start, start + n, dtype=np.int64) * 10 - 1,
        "tid": np.full(n, 7, np.int32), "seq": np.arange(start, start + n),
        "fd": np.full(n, 11, np.int32), "cmd": np.full(n, 0x4010AE42, np.uint32),
        "name": ["GET_DIRTY_LOG"] * n, "slot": np.zeros(n, np.int32), "ret": np.zeros(n),
        "first_page": np.full(n, -1), "num_pages": np.full(n, -1), "pages": np.arange(n),
        "cap": np.full(n, -1), "arg0": np.zeros(n, np.uint64),
    })


def test_roundtrip_parts_and_meta(tmp_path):
    w = BundleWriter(tmp_path / "b", producer="test")
    w.set_source("host_ioctl", "captured", events=5)
    w.append("ioctls", _ioctl_rows(3))
    w.flush()
    w.append("ioctls", _ioctl_rows(2, start=3))
    w.add_lost("host_ioctl", 4)
    w.close(end_reason="duration")
    b = read_bundle(tmp_path / "b")
    df = b.table("ioctls")
    assert list(df["seq"]) == [0, 1, 2, 3, 4]
    assert df["cmd"].dtype == np.uint32
    assert b.meta["lost"] == {"host_ioctl": 4}
    assert b.meta["end_reason"] == "duration"
    assert [a["label"] for a in b.meta["clock_anchors"]] == ["start", "end"]
    assert b.complete and b.problems == []
    assert len(list((tmp_path / "b" / "ioctls").glob("part-*.parquet"))) == 2
    # An absent table reads as empty with the declared dtypes.
    assert b.table("memslots").empty and b.table("memslots")["gpa"].dtype == np.uint64


def test_append_writer_merges_meta(tmp_path):
    w = BundleWriter(tmp_path / "b", producer="lab")
    w.close("done")
    w2 = BundleWriter(tmp_path / "b", producer="probe host", append=True)
    w2.set_source("host_ioctl", "captured")
    w2.add_lost("host_ioctl", 1)
    w2.append("ioctls", _ioctl_rows(2))
    w2.close("sigint")
    b = read_bundle(tmp_path / "b")
    assert b.meta["sources"]["host_ioctl"]["status"] == "captured"
    assert b.meta["producers"]["probe host"]["end_reason"] == "sigint"
    assert len(b.table("ioctls")) == 2


def test_killed_writer_keeps_flushed_parts(tmp_path):
    code = f"""
import os, sys
sys.path.insert(0, {os.getcwd()!r})
from tests.test_bundle import _ioctl_rows
from hintscope.bundle import BundleWriter
w = BundleWriter({str(tmp_path / 'b')!r}, producer='victim')
w.append('ioctls', _ioctl_rows(4)); w.flush()
w.append('ioctls', _ioctl_rows(4, start=4))
os.kill(os.getpid(), 9)
"""
    subprocess.run([sys.executable, "-c", code], check=False)
    b = read_bundle(tmp_path / "b")
    assert len(b.table("ioctls")) == 4
    assert not b.complete
    assert any("did not finish" in p for p in b.problems)


def test_corrupt_part_is_skipped_and_named(tmp_path):
    w = BundleWriter(tmp_path / "b", producer="t")
    w.append("ioctls", _ioctl_rows(2)); w.flush()
    w.append("ioctls", _ioctl_rows(2, start=2)); w.close("x")
    parts = sorted((tmp_path / "b" / "ioctls").glob("part-*"))
    data = parts[1].read_bytes()
    parts[1].write_bytes(data[: len(data) // 2])
    b = read_bundle(tmp_path / "b")
    assert list(b.table("ioctls")["seq"]) == [0, 1]
    assert len(b.problems) == 1 and parts[1].name in b.problems[0] and "\n" not in b.problems[0]


@pytest.mark.parametrize("content, needle", [
    (None, "not a hintscope bundle"),
    ("{", "unreadable meta"),
    ("[]", "expected an object"),
    (json.dumps({"schema": "other"}), "schema is"),
    (json.dumps({"schema": "hintscope-bundle", "schema_version": "9.0"}), "not supported"),
])
def test_bad_meta_is_one_line_error(tmp_path, content, needle):
    d = tmp_path / "b"
    d.mkdir()
    if content is not None:
        (d / "meta.json").write_text(content)
    with pytest.raises(BundleError) as ei:
        read_bundle(d)
    assert needle in str(ei.value) and "\n" not in str(ei.value)


def test_wrong_columns_rejected_at_write(tmp_path):
    w = BundleWriter(tmp_path / "b", producer="t")
    with pytest.raises(ValueError):
        w.append("ioctls", {"ts_ns": [1]})


def test_mono_from_wall_interpolates():
    meta = {"clock_anchors": [
        {"monotonic_ns": 1_000, "realtime_ns": 10_000},
        {"monotonic_ns": 2_010, "realtime_ns": 11_000},  # 10 ns of slew over 1000 ns
    ]}
    out = mono_from_wall(meta, np.array([10_000, 10_500, 11_000]))
    assert list(out) == [1_000, 1_505, 2_010]


def test_mono_from_wall_is_exact_at_real_epoch_values():
    # 2026 wall clock (~1.8e18 ns): float64 steps there are 256 ns; the mapping must be exact
    r0, m0 = 1_795_641_808_000_000_123, 5_000_000_001
    meta = {"clock_anchors": [{"monotonic_ns": m0, "realtime_ns": r0},
                              {"monotonic_ns": m0 + 10**12 + 7, "realtime_ns": r0 + 10**12}]}  # 7 ns slew
    w = np.array([r0 - 5, r0, r0 + 1, r0 + 333_333_333_333, r0 + 10**12, r0 + 10**12 + 999], dtype=np.int64)
    want = [m0 + (x - r0) + min(max(x - r0, 0), 10**12) * 7 // 10**12 for x in w.tolist()]
    want[3] = m0 + 333_333_333_333 + 2      # 7 * 1/3 = 2.33 rounds to 2
    assert mono_from_wall(meta, w).tolist() == want



def test_schema_1_bundle_reads_with_word_runs_of_one():
    """Committed samples are schema 1.0: their bitmap words upgrade to runs of length 1."""
    from pathlib import Path
    b = read_bundle(Path(__file__).parent.parent / "samples" / "lab-bitmap")
    assert b.meta["schema_version"].startswith("1.") and b.major == 1
    w = b.table("bitmap_words")
    assert len(w) and (w["nwords"] == 1).all() and not b.damaged


def test_word_runs_expand_to_the_same_pages(tmp_path):
    from hintscope.analysis import harvest
    run = pd.DataFrame({"ts_ns": [5], "seq": [1], "op": ["get"], "slot": [0], "word": [10],
                        "mask": np.array([2**64 - 1], np.uint64), "nwords": [3]})
    w = BundleWriter(tmp_path / "b", producer="t")
    w.append("bitmap_words", run)
    w.close("test")
    got = read_bundle(tmp_path / "b").table("bitmap_words")
    assert got["nwords"].tolist() == [3] and harvest.run_popcount(got).tolist() == [192]
    rows = harvest.unrun(got)
    assert rows["word"].tolist() == [10, 11, 12] and (rows["nwords"] == 1).all()
    _, pages = harvest.expand_words(rows["word"].to_numpy(), rows["mask"].to_numpy())
    assert pages.tolist() == list(range(640, 832))
