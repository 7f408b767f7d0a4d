"""Guest kernel selection (lab/guest_kernel.py) against this machine's real dpkg database and /boot."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from hintscope.errors import HintscopeError
from hintscope.lab import guest_kernel, image

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="needs a Debian host (dpkg-query)")


def _installed_meta_dependency(meta_pkg: str) -> tuple[str, str] | None:
    """(package, version) the installed meta package pins, e.g. linux-image-amd64 -> linux-image-6.1.0-57-amd64."""
    r = subprocess.run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev}\t${Depends}", meta_pkg],
                       capture_output=True, text=True)
    if r.returncode or not r.stdout.startswith("ii"):
        return None
    dep = r.stdout.split("\t", 1)[1].split(",")[0].strip()       # "linux-image-6.1.0-57-amd64 (= 6.1.192-3)"
    name, _, ver = dep.partition(" (= ")
    return name, ver.rstrip(")")


@needs_dpkg
def test_default_kernel_is_the_one_setup_installed():
    dep = _installed_meta_dependency("linux-image-amd64")
    if dep is None or not dep[0].startswith("linux-image-6.1."):
        pytest.skip("linux-image-amd64 (bookworm's 6.1) is not installed: run scripts/setup.sh")
    k = guest_kernel.select()
    # setup.sh installs the meta package; the lab must boot exactly what it pulled in
    assert (k.package, k.version) == dep
    assert k.series == "6.1" and k.release == dep[0].removeprefix("linux-image-")
    assert Path(k.vmlinuz).is_file() and Path(k.initrd).is_file() and k.modules.is_dir()
    assert k.headers_package == f"linux-headers-{k.release}"
    hdr = _installed_meta_dependency("linux-headers-amd64")
    if hdr is not None:  # setup installs both metas in one apt run: the headers are the image's build
        assert hdr == (k.headers_package, k.version) and k.headers_version == k.version
        assert k.headers_dir.is_dir() and k.headers_common_dir.is_dir()
        assert (k.headers_common_dir / "include/uapi/linux/virtio_balloon.h").is_file()
    assert guest_kernel.problems(k) == []
    meta = k.meta()
    assert meta["release"] == k.release and meta["version"] == k.version and meta["vmlinuz"] == k.vmlinuz
    json.dumps(meta)  # goes into meta.json and build.json as is


@needs_dpkg
def test_every_candidate_of_a_series_is_installed_and_newest_first():
    for series in guest_kernel.SERIES_SUITE:
        found = guest_kernel.candidates(series)
        for k in found:
            assert k.release.startswith(series + ".") and k.package == f"linux-image-{k.release}"
            r = subprocess.run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev} ${Version}", k.package],
                               capture_output=True, text=True)
            assert r.stdout == f"ii  {k.version}"
        for newer, older in zip(found, found[1:]):
            assert subprocess.run(["dpkg", "--compare-versions", newer.version, "ge", older.version]).returncode == 0


@needs_dpkg
def test_missing_series_is_a_one_line_error_naming_the_fix():
    if guest_kernel.candidates("6.12"):
        k = guest_kernel.select("6.12")
        assert k.series == "6.12" and Path(k.vmlinuz).is_file()
    else:
        with pytest.raises(HintscopeError, match=r"install-guest-kernel\.sh 6\.12") as e:
            guest_kernel.select("6.12")
        assert "\n" not in str(e.value)
    with pytest.raises(HintscopeError, match="expected one of"):
        guest_kernel.select("2.6")


def _kernel(**kw) -> guest_kernel.GuestKernel:
    base = dict(series="6.1", release="6.1.0-999-amd64", package="linux-image-6.1.0-999-amd64", version="6.1.999-1",
                headers_package="linux-headers-6.1.0-999-amd64", headers_version="6.1.999-1",
                headers_common="linux-headers-6.1.0-999-common", suite="bookworm")
    return guest_kernel.GuestKernel(**{**base, **kw})


def test_a_kernel_not_on_this_machine_is_rejected_with_reasons():
    why = guest_kernel.problems(_kernel(headers_version="6.1.998-1"))
    assert "/boot/vmlinuz-6.1.0-999-amd64 missing" in why and "/lib/modules/6.1.0-999-amd64 missing" in why
    assert any("is 6.1.998-1, the image is 6.1.999-1" in w for w in why)


def test_image_cache_is_keyed_on_the_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("HINTSCOPE_CACHE", str(tmp_path))
    a = _kernel()
    rebuilt_package = dataclasses.replace(a, version="6.1.999-2", headers_version="6.1.999-2")
    new_abi = dataclasses.replace(a, release="6.1.0-1000-amd64")
    hashes = {image.image_hash(k) for k in (a, rebuilt_package, new_abi)}
    assert len(hashes) == 3
    d = image.image_dir(a)
    d.mkdir(parents=True)
    (d / "build.json").write_text(json.dumps({"image": "root.ext4"}))
    (d / "root.ext4").write_bytes(b"")
    assert image.cached_image(a) is not None
    assert image.cached_image(rebuilt_package) is None and image.cached_image(new_abi) is None
