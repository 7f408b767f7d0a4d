"""The c' fix (patches/0001-*): scripts/build-qemu.sh, the QEMU label of source builds, the
hintguest's zero-before-hint option, and (HINTSCOPE_LAB=1) the patched QEMU keeping every
early-reuse write that stock QEMU 10.0.2 loses, with the detector's c' hazard on stock only."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hintscope.lab import hintguest as hg
from hintscope.lab.qemu import qemu_label
from hintscope.report.compare import meta_labels

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "scripts" / "build-qemu.sh"
PATCHES = sorted((REPO / "patches").glob("[0-9][0-9][0-9][0-9]-*.patch"))
lab, needs_kvm, needs_root = pytest.mark.lab, pytest.mark.needs_kvm, pytest.mark.needs_root


def _build(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(BUILD), *args], capture_output=True, text=True, timeout=timeout)


def test_build_script_rejects_bad_arguments(tmp_path):
    for args, msg in [(["--patch", str(tmp_path / "missing.patch")], "no such patch file"),
                      (["--version", "9.9"], "unsupported --version"),
                      (["--frobnicate"], "unknown argument")]:
        r = _build(*args, timeout=60)
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)
    junk = tmp_path / "junk.patch"
    junk.write_text("this is not a diff\n")
    r = _build("--patch", str(junk), timeout=60)
    assert r.returncode == 2 and "holds no diff" in r.stderr, r.stderr


def test_patches_are_format_patch_without_signoff():
    assert PATCHES, "no patches/NNNN-*.patch"
    for p in PATCHES:
        text = p.read_text()
        assert text.startswith("From ") and "\nSubject: [PATCH" in text and "\n---\n" in text, p
        assert "Signed-off-by" not in text, p
        assert "5.5.6.5" in text and "docs/findings.md" in text, p   # spec text and evidence cited


def test_label_from_build_info(tmp_path):
    """A build-qemu.sh prefix labels its binary from BUILD-INFO; hostile or missing info falls back
    to the version string given."""
    (tmp_path / "bin").mkdir()
    q = tmp_path / "bin" / "qemu-system-x86_64"
    q.write_text("")
    v = "QEMU emulator version 10.0.2"
    assert qemu_label(str(q), v) == "10.0.2"
    (tmp_path / "BUILD-INFO").write_text("source=x\nlabel=patched (0123456789ab)\nbuild_seconds=5\n")
    assert qemu_label(str(q), v) == "patched (0123456789ab)"
    (tmp_path / "BUILD-INFO").write_bytes(b"label=\xff\xfe\x00garbage\n")
    assert qemu_label(str(q), v) == "10.0.2"
    (tmp_path / "BUILD-INFO").write_text("label=" + "x" * 500 + "\n")
    assert qemu_label(str(q), v) == "10.0.2"


def test_compare_uses_the_label():
    meta = {"hintguest": {"qemu_version": "QEMU emulator version 10.0.2", "qemu_label": "patched (0123456789ab)"}}
    assert meta_labels(meta)["qemu"] == "patched (0123456789ab)"
    assert meta_labels({"hintguest": {"qemu_version": "QEMU emulator version 7.2.22 (Debian)"}})["qemu"] == "7.2.22"
    assert meta_labels({"lab": {"qemu_version": "QEMU emulator version 10.0.2", "qemu_label": "10.0.2 (source)"}})[
        "qemu"] == "10.0.2 (source)"


def test_zero_before_hint_option(tmp_path):
    o = hg.HintguestOptions(bundle=tmp_path / "b", zero_before_hint=True)
    assert o.append().endswith(" zero=1")
    assert "zero" not in hg.HintguestOptions(bundle=tmp_path / "b").append()
    from hintscope import cli
    a = cli.build_parser().parse_args(["lab", "migrate", "--guest", "hintguest", "--zero-before-hint", "-o", "x"])
    assert a.zero_before_hint
    a = cli.build_parser().parse_args(["lab", "hintguest", "--zero-before-hint", "-o", "x"])
    assert a.zero_before_hint


def test_migrate_hint_off_is_refused_for_hintguest(tmp_path):
    from hintscope import cli
    rc = cli.main(["lab", "migrate", "--guest", "hintguest", "--hint", "off", "-o", str(tmp_path / "b")])
    assert rc == 2 and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------
# real: stock vs patched QEMU 10.0.2 built from source (first build ~5-10 min here, then cached)


def _qemu(*patches: Path) -> str:
    args = ["--version", "10.0"] + [a for p in patches for a in ("--patch", str(p))]
    r = _build(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


def _analyze(bundle: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "hintscope", "analyze", str(bundle), "--json"], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    j = json.loads(r.stdout)
    inner = j.get("findings") if isinstance(j.get("findings"), dict) else {}
    fl = j["findings"] if isinstance(j.get("findings"), list) else (inner.get("findings") or {})
    return {"findings": fl.get("findings", []) if isinstance(fl, dict) else fl}


def _early_reuse(tmp_path: Path, name: str, qemu: str) -> tuple[dict, dict]:
    o = hg.HintguestOptions(bundle=tmp_path / name, behaviour="early-reuse", qemu=qemu, probe="on")
    s = asyncio.run(hg.run_hintguest(o))
    return s, _analyze(tmp_path / name)


@lab
@needs_kvm
@needs_root
def test_lab_patched_keeps_early_reuse_writes(tmp_path):
    stock, patched = _qemu(), _qemu(*PATCHES)
    assert "patched (" in qemu_label(patched)

    s, a = _early_reuse(tmp_path, "patched", patched)
    assert s["migration"]["status"] == "completed" and s["qemu_label"].startswith("patched (")
    assert s["reuse_writes_in_source_ram"] > 0
    assert s["result"]["lost_reuse_writes"] == 0 and s["result"]["lost_other"] == 0
    assert s["result"]["classes"].get("hinted-held", 0) > 0          # hints still took effect
    kinds = [f["kind"] for f in a["findings"]]
    assert "rearm-in-apply" not in kinds and "rearm-wipe" not in kinds, kinds

    s, a = _early_reuse(tmp_path, "stock", stock)
    assert s["migration"]["status"] == "completed"
    assert s["result"]["lost_reuse_writes"] > 0, "stock 10.0.2 did not lose the early-reuse writes"
    kinds = [f["kind"] for f in a["findings"]]
    assert "rearm-in-apply" in kinds, kinds
