"""The report notebook runs headless on real bundles and the HTML shows the analysis numbers, escaped."""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hintscope.bundle import BundleWriter, read_bundle
from hintscope.cli import main
from hintscope.report import model
from hintscope.report.render import render
from test_report_bundles import write_host_bundle

EVIL = '<script>alert("hs")</script>'
EVIL2 = '<img src=x onerror=alert(2)>'


@pytest.fixture(scope="module")
def sim_bundle(tmp_path_factory) -> Path:
    from hintscope.sim.write import simulate, write_bundle

    p = tmp_path_factory.mktemp("sim") / "filter-after-sync"
    write_bundle(simulate("filter-after-sync", 1), p)
    return p


def _cells(page: str) -> set[str]:
    """Text of every table cell in the page, unescaped."""
    return {html.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", page, re.S)}


def _analysis(bundle: Path) -> dict:
    """What `hintscope analyze --json` reports (summary, per-sync rows, per-epoch accounting, findings)."""
    out = subprocess.run([sys.executable, "-m", "hintscope", "analyze", str(bundle), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_report_shows_analysis_numbers(sim_bundle, tmp_path):
    out = render(sim_bundle, tmp_path / "r.html", progress=False)
    page = out.read_text()
    cells = _cells(page)
    doc = _analysis(sim_bundle)
    nums = {k: v for k, v in model.flatten(doc["summary"]).items()
            if isinstance(v, int) and not isinstance(v, bool)}
    assert len(nums) >= 10
    missing = {k: v for k, v in nums.items() if f"{v:,}" not in cells}
    assert not missing, f"summary numbers not in the report: {missing}"
    # Per sync: pages harvested; per epoch: hinted / skipped / resent pages.
    for row in doc["syncs"]:
        assert f"{row['harvested']:,}" in cells
    for row in doc["accounting"]["per_epoch"]:
        for k in ("applied_pages", "skipped_pages", "resent_pages"):
            assert f"{row[k]:,}" in cells, (row["epoch"], k)
    # Every finding, by kind and sentence.
    found = doc["findings"]
    assert found, "the simulated filter-after-sync run should have findings"
    for f in found:
        assert f["kind"] in cells and f["sentence"] in cells
    assert doc["summary"]["findings"]["verdict"] in cells
    for heading in ("Timeline", "Findings", "Summary", "Pages per hint epoch", "Dirty rate per sync",
                    "Data completeness", "Notes"):
        assert re.search(rf"<h2[^>]*>{re.escape(heading)}", page), heading
    # Figures are embedded images; no code leaks into the page.
    assert page.count("data:image/png;base64,") >= 4
    assert "S.show(" not in page and "import pandas" not in page


def _evil_bundle(path: Path) -> Path:
    write_host_bundle(path, meta_extra={"vmm": {"name": EVIL, "comm": EVIL2}})
    w = BundleWriter(path, producer="guest probe " + EVIL, append=True)
    w.set_source("guest_probe " + EVIL2, "partial", reason=EVIL)
    w.append("guest_reports", pd.DataFrame({
        "guest_ns": np.array([1, 2], np.int64), "side": ["src", "src"], "seq": np.array([1, 2], np.int64),
        "source": ["probe", EVIL2], "word": ["ATTACHED", "LOSTW"], "v0": np.array([0, 5], np.int64),
        "v1": np.array([-1, 7], np.int64), "v2": np.array([-1, -1], np.int64), "text": [EVIL, EVIL2]}))
    w.append("guest_returns", pd.DataFrame({
        "guest_ns": np.array([3], np.int64), "side": ["src"], "tid": np.array([9], np.int32),
        "pfn": np.array([0x1000], np.uint64), "order": np.array([10], np.int32), "reason": [EVIL]}))
    w.close("target-exit")
    return path


def test_guest_strings_are_escaped(tmp_path):
    b = _evil_bundle(tmp_path / "evil")
    page = render(b, tmp_path / "r.html", progress=False).read_text()
    assert EVIL not in page and EVIL2 not in page
    assert "alert(" not in re.sub(r"&[a-z#0-9]+;", "", page).split("<body", 1)[0]  # nothing in <head>
    # The hostile strings are shown, as text: escaped inside cells.
    assert html.escape(EVIL) in page or EVIL.replace("<", "&lt;").replace(">", "&gt;") in page
    assert EVIL in _cells(page) and EVIL2 in _cells(page)
    # No script of any kind can run in the page.
    assert "<script" not in page.lower()
    assert "Content-Security-Policy" in page


def test_baseline_comparison(tmp_path):
    write_host_bundle(tmp_path / "on", applies_per_epoch=(6, 3))
    write_host_bundle(tmp_path / "off", applies_per_epoch=(0, 0))
    page = render(tmp_path / "on", tmp_path / "ab.html", baseline=tmp_path / "off", progress=False).read_text()
    cells = _cells(page)
    on = model.flatten(model.load_summary(read_bundle(tmp_path / "on")))
    off = model.flatten(model.load_summary(read_bundle(tmp_path / "off")))
    assert on["hints.applies"] == 9 and off["hints.applies"] == 0
    assert ">baseline<" in page and ">change<" in page
    assert "hinted pages never sent (this run, from the trace)" in cells   # the analysis' A/B table
    assert "9" in cells and "new" in cells      # applies: 9 vs 0 -> "new"
    assert f"{on['hints.applied_pages']:,}" in cells


def test_cli_report_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing"), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such bundle" in err
    assert not (tmp_path / "r.html").exists()
