"""Regression plots across runs: CSV rows, groups from meta and --label, PNG + SVG per metric; the demo."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from hintscope.cli import main
from hintscope.errors import HintscopeError
from hintscope.report import compare
from test_report_bundles import write_host_bundle


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    for i in range(3):
        write_host_bundle(root / f"on-{i}", applies_per_epoch=(4 + i, 2), meta_extra={"lab": {"hint": True}})
        write_host_bundle(root / f"off-{i}", applies_per_epoch=(0, 0), meta_extra={"lab": {"hint": False}})
    return root


def test_compare_groups_from_meta(runs, tmp_path, capsys):
    bundles = sorted(str(p) for p in runs.iterdir())
    assert main(["compare", *bundles, "-o", str(tmp_path / "out")]) == 0
    assert "6 runs in 2 groups (hint=off, hint=on)" in capsys.readouterr().out
    df = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert len(df) == 6
    assert sorted(df["group"].unique()) == ["hint=off", "hint=on"]
    on = df[df["group"] == "hint=on"].sort_values("run")
    # Applies per run as written: (4+i) + 2 applies of 4 MiB = 1024 pages each.
    assert on["hints.applies"].tolist() == [6, 7, 8]
    assert on["hints.applied_pages"].tolist() == [6144, 7168, 8192]
    assert (df.loc[df["group"] == "hint=off", "hints.applies"] == 0).all()
    g = pd.read_csv(tmp_path / "out" / "groups.csv")
    row = g[(g["metric"] == "hints.applied_pages") & (g["group"] == "hint=on")].iloc[0]
    assert (row["runs"], row["median"], row["min"], row["max"]) == (3, 7168, 6144, 8192)
    for ext in ("png", "svg"):
        assert (tmp_path / "out" / f"hints.applied_pages.{ext}").stat().st_size > 1000
        assert (tmp_path / "out" / f"overview.{ext}").stat().st_size > 1000


def test_label_option_overrides_meta(runs, tmp_path):
    bundles = sorted(str(p) for p in runs.iterdir())
    labels = compare.parse_labels(["on-*:qemu=10.0", "off-*:qemu=7.2", "guest=dirtier", f"{bundles[0]}:hint=maybe"],
                                  bundles)
    df = compare.collect(bundles, labels, progress=False)
    assert set(df["label.guest"]) == {"dirtier"}
    assert df.set_index("run").loc["off-0", "label.hint"] == "maybe"   # bundles[0] is off-0
    groups = compare.group_column(df, ["qemu"])
    assert sorted(groups.unique()) == ["qemu=10.0", "qemu=7.2"]
    files = compare.write(df, tmp_path / "o", ["qemu"])
    assert (tmp_path / "o" / "runs.csv") in files


def test_bad_labels(runs):
    bundles = sorted(str(p) for p in runs.iterdir())
    with pytest.raises(HintscopeError, match="expected KEY=VALUE"):
        compare.parse_labels(["nonsense"], bundles)
    with pytest.raises(HintscopeError, match="matches none"):
        compare.parse_labels(["zzz*:a=b"], bundles)
    df = compare.collect(bundles[:2], progress=False)
    with pytest.raises(HintscopeError, match="no run has that label"):
        compare.group_column(df, ["vcpus"])


def test_demo_on_samples(runs, tmp_path, capsys):
    samples = tmp_path / "samples"
    samples.mkdir()
    for name in ("x-on", "x-off"):
        (samples / name).symlink_to(runs / name.replace("x-", "") .replace("on", "on-0").replace("off", "off-0"))
    assert main(["demo", "-o", str(tmp_path / "d"), "--samples", str(samples)]) == 0
    out = capsys.readouterr().out
    assert "x-on" in out and "x-off" in out and "simulator" not in out
    d = tmp_path / "d"
    assert (d / "report-x-on.html").stat().st_size > 10_000
    assert "baseline" in (d / "report-x-on.html").read_text()
    assert (d / "trace-x-off.pftrace").stat().st_size > 0
    assert len(pd.read_csv(d / "regression" / "runs.csv")) == 2


def test_demo_falls_back_to_simulator(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["demo", "-o", str(tmp_path / "d"), "--samples", str(empty)]) == 0
    out = capsys.readouterr().out
    assert "holds no bundle: using simulator bundles" in out
    assert sorted(p.name for p in (tmp_path / "d").glob("report-*.html")) == [
        "report-sim-filter-after-sync.html", "report-sim-qemu.html"]
