"""Which Debian kernel the Linux guest lab boots, chosen from what dpkg has installed.

The ABI name is never pinned in code. Debian's security archive keeps only the newest kernel ABI
(``linux-image-6.1.0-56-amd64`` disappears when ``-57`` arrives), so a pinned name breaks every
fresh machine at the next kernel update, and so would a pinned package version. ``scripts/setup.sh``
installs the meta packages ``linux-image-amd64`` and ``linux-headers-amd64`` in one apt run, so the
image and headers it gets always belong together. The lab takes the newest installed kernel of the
requested series whose image, initrd, modules and matching headers are all present. A machine
that has not been upgraded keeps building from what it has (no network needed), and an upgraded one
rebuilds, because the image cache is keyed on the release and the package version.

Series: ``6.1`` is bookworm's own kernel (the default); ``6.12`` comes from bookworm-backports
(``scripts/install-guest-kernel.sh 6.12`` installs it next to 6.1 without touching the meta packages).
"""

from __future__ import annotations

import functools
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from hintscope.errors import HintscopeError

DEFAULT_SERIES = "6.1"
# Series the lab knows how to install (scripts/install-guest-kernel.sh) and where they come from.
SERIES_SUITE = {"6.1": "bookworm", "6.12": "bookworm-backports"}
# linux-image-6.1.0-57-amd64, linux-image-6.12.95+deb12-amd64; not -cloud-/-rt- flavours or -unsigned.
IMAGE_PKG_RE = re.compile(r"^linux-image-(?P<release>(?P<series>\d+\.\d+)\.\d+[-+][0-9a-z]+-amd64)$")


@dataclass(frozen=True)
class GuestKernel:
    series: str             # "6.1"
    release: str            # `uname -r` inside the guest: "6.1.0-57-amd64"
    package: str            # "linux-image-6.1.0-57-amd64"
    version: str            # its Debian package version: "6.1.192-3"
    headers_package: str    # "linux-headers-6.1.0-57-amd64"
    headers_version: str | None  # installed version on the host; None: fetched into the image by apt
    headers_common: str     # "linux-headers-6.1.0-57-common" (arch-independent half, /usr/src/<name>)
    suite: str              # where the series comes from: "bookworm", "bookworm-backports"

    @property
    def vmlinuz(self) -> str:
        return f"/boot/vmlinuz-{self.release}"

    @property
    def initrd(self) -> str:
        return f"/boot/initrd.img-{self.release}"

    @property
    def headers_dir(self) -> Path:
        return Path("/usr/src") / self.headers_package

    @property
    def headers_common_dir(self) -> Path:
        return Path("/usr/src") / self.headers_common

    @property
    def modules(self) -> Path:
        return Path("/lib/modules") / self.release

    def meta(self) -> dict:
        """What a bundle or build.json records about the guest kernel."""
        return {**asdict(self), "vmlinuz": self.vmlinuz, "initrd": self.initrd}


def _dpkg_query(fmt: str, *patterns: str) -> list[list[str]]:
    try:
        r = subprocess.run(["dpkg-query", "-W", "-f", fmt, *patterns], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise HintscopeError("guest kernel: dpkg-query not found (the Linux guest lab needs a Debian host)") from None
    # exit 1 only means some pattern matched nothing
    return [line.split("\t") for line in r.stdout.splitlines() if line]


def installed_packages(*patterns: str) -> dict[str, str]:
    """{package: version} of the fully installed packages matching the dpkg-query patterns."""
    return {p[0]: p[2] for p in _dpkg_query("${Package}\t${db:Status-Abbrev}\t${Version}\n", *patterns)
            if len(p) == 3 and p[1].startswith("ii")}


def _version_cmp(a: str, b: str) -> int:
    if a == b:
        return 0
    r = subprocess.run(["dpkg", "--compare-versions", a, "gt", b], capture_output=True, timeout=30)
    return 1 if r.returncode == 0 else -1


def _headers_common(headers_package: str) -> str:
    for dep in _dpkg_query("${Depends}\n", headers_package)[:1]:
        for alt in dep[0].split(","):
            name = alt.strip().split(" ")[0]
            if name.startswith("linux-headers-") and name.endswith("-common"):
                return name
    # not installed: Debian names the common half after the release without its flavour
    return f"linux-headers-{headers_package.removeprefix('linux-headers-').removesuffix('-amd64')}-common"


def candidates(series: str) -> list[GuestKernel]:
    """Installed kernels of a series, newest package version first, whether or not they are complete."""
    if series not in SERIES_SUITE:
        raise HintscopeError(f"--guest-kernel {series}: expected one of {', '.join(SERIES_SUITE)}")
    images = {}
    for pkg, ver in installed_packages(f"linux-image-{series}.*-amd64").items():
        m = IMAGE_PKG_RE.match(pkg)
        if m and m["series"] == series:
            images[pkg] = (m["release"], ver)
    headers = installed_packages(*(f"linux-headers-{rel}" for rel, _ in images.values())) if images else {}
    out = []
    for pkg, (rel, ver) in images.items():
        hp = f"linux-headers-{rel}"
        out.append(GuestKernel(series=series, release=rel, package=pkg, version=ver, headers_package=hp,
                               headers_version=headers.get(hp), headers_common=_headers_common(hp),
                               suite=SERIES_SUITE[series]))
    return sorted(out, key=functools.cmp_to_key(lambda a, b: _version_cmp(b.version, a.version)))


def problems(k: GuestKernel) -> list[str]:
    """Why this installed kernel cannot be the guest's (empty: usable)."""
    out = [f"{p} missing" for p in (k.vmlinuz, k.initrd) if not Path(p).is_file()]
    if not k.modules.is_dir():
        out.append(f"{k.modules} missing")
    if k.headers_version is not None and k.headers_version != k.version:
        # BCC compiles the guest probe against these headers: a different build may lay structs out differently
        out.append(f"{k.headers_package} is {k.headers_version}, the image is {k.version}")
    return out


def select(series: str | None = None) -> GuestKernel:
    """The newest usable installed kernel of ``series`` (default 6.1); a one-line error naming the fix."""
    series = series or DEFAULT_SERIES
    found = candidates(series)
    rejected = []
    for k in found:
        why = problems(k)
        if not why:
            return k
        rejected.append(f"{k.package} {k.version}: {'; '.join(why)}")
    fix = ("bash scripts/setup.sh" if series == DEFAULT_SERIES
           else f"bash scripts/install-guest-kernel.sh {series}")
    if rejected:
        raise HintscopeError(f"guest kernel {series}: no usable kernel ({' | '.join(rejected)}); run {fix}")
    raise HintscopeError(f"guest kernel {series}: no linux-image-{series}.*-amd64 package installed; run {fix}")
