"""The compact data layer (analysis/pagestate.py, pagefacts.py) against the per-page ORACLE.

tests/oracle_perpage is the detector as it was before issue 14: every harvest, re-arm, hinted page
and send expanded to one row per page, answered with per-page as-of joins.  Both run on the same
simulated bundles and must give the same findings (kind, confidence, gfn_count, gfn_first,
gfn_last) and the same verdict.  The 1 GiB guests (262,144 pages) run under HINTSCOPE_LAB=1 (about
15 s of simulation each); a 64 MiB set always runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hintscope.analysis import detector  # noqa: E402
from hintscope.analysis.context import Context  # noqa: E402
from hintscope.bundle import read_bundle  # noqa: E402
from oracle_perpage import detector as oracle  # noqa: E402

KEYS = ("kind", "confidence", "gfn_count", "gfn_first", "gfn_last")
CASES = [("qemu", "manual"), ("qemu", "ring"), ("clear-on-apply", "manual"), ("clear-on-apply", "ring"),
         ("resend-bug", "get"), ("shrinker-reuse", "manual"), ("sync-in-io-handler", "manual"),
         ("filter-after-sync", "manual")]


def _rows(res) -> list[tuple]:
    return sorted(tuple(r[k] for k in KEYS) for r in res.frame.to_dict("records"))


def _simulate(tmp: Path, variant: str, mode: str, pages: int, *extra: str) -> Path:
    out = tmp / f"{variant}-{mode}-{pages}"
    subprocess.run([sys.executable, "-m", "hintscope", "simulate", "--variant", variant, "--mode", mode,
                    "--seed", "3", "--pages", str(pages), *extra, "-o", str(out)], check=True,
                   capture_output=True)
    return out


def _same(path: Path) -> None:
    new = detector.run(Context(read_bundle(path)))
    old = oracle.run(Context(read_bundle(path)))
    assert _rows(new) == _rows(old), (path.name, _rows(new), _rows(old))
    assert new.verdict == old.verdict
    if old.exposure is not None and len(old.exposure):
        assert new.exposure.reset_index(drop=True).equals(old.exposure.reset_index(drop=True))


@pytest.mark.parametrize("variant,mode", CASES)
def test_same_findings_as_per_page_oracle_64mib(tmp_path, variant, mode):
    _same(_simulate(tmp_path, variant, mode, 16384))


def test_same_findings_with_per_page_send_rows(tmp_path):
    """The older bundle shape: one page_send uprobe row per page instead of tap runs."""
    _same(_simulate(tmp_path, "clear-on-apply", "manual", 16384, "--page-send-events"))


@pytest.mark.lab
@pytest.mark.parametrize("variant,mode", CASES[:5])
def test_same_findings_as_per_page_oracle_1gib(tmp_path, variant, mode):
    _same(_simulate(tmp_path, variant, mode, 262144))


@pytest.mark.lab
@pytest.mark.parametrize("variant,mode", [("qemu", "manual"), ("clear-on-apply", "manual"), ("clear-on-apply", "ring")])
def test_same_findings_as_per_page_oracle_scale_preset(tmp_path, variant, mode):
    """The realistic preset (order-10 hint blocks, 1 GiB clear chunks, slots split around 4 GiB)."""
    _same(_simulate(tmp_path, variant, mode, 1048576, "--preset", "scale"))


def test_committed_samples_same_as_oracle():
    samples = sorted(p for p in (Path(__file__).resolve().parent.parent / "samples").iterdir()
                     if (p / "meta.json").exists())
    assert samples
    for p in samples:
        _same(p)
