"""``hintscope lab image``: the read-only Debian root the Linux guest lab boots.

Recipe (see docs/guest.md and shared notes guest-lab.md): debootstrap bookworm minbase with
python3-bpfcc and kmod; the guest kernel's headers (copied from the host's identical
``linux-headers-<release>`` package when installed, else apt-get of that exact version in the
chroot); only the virtio modules the root loads itself (the stock Debian initrd loads
block/ext4); docs, locales and foreign-arch headers trimmed; a tiny PID-1 bootstrap that mounts
the per-run payload disk (second virtio disk) and hands over to its ``init.sh``.  The probe and
workload live on that payload disk, so editing them never forces an image rebuild.

The result is a journal-less ext4 shrunk with ``resize2fs -M``, cached under
``$HINTSCOPE_CACHE/images/<hash>/`` (default ``~/.cache/hintscope``) with ``build.json``
(build time, sizes, kernel).  The hash covers the guest kernel's release and package versions
(lab/guest_kernel.py picks the kernel from what dpkg has installed), so a kernel update rebuilds
the image.  Source and destination QEMU open it with ``readonly=on``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from hintscope.errors import HintscopeError
from hintscope.lab import guest_kernel
from hintscope.lab.guest_kernel import GuestKernel

MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
PACKAGES = ["python3-bpfcc", "kmod"]
# The root loads these itself (in order) unless the kernel has them built in; virtio_pci/virtio_blk/ext4
# come from the initrd.
ROOT_MODULES = ["drivers/virtio/virtio_balloon.ko", "drivers/char/virtio_console.ko"]
# Bump when the recipe changes in a way the hash inputs below do not capture.
RECIPE_VERSION = "4"

BOOTSTRAP_INIT = r"""#!/bin/sh
# hintscope PID 1: mount the basics and the per-run payload disk, then hand over to it.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs -o size=64m tmp /run
mount -t tmpfs -o size=64m tmp /var/tmp
mkdir -p /run/hs
mount -o ro /dev/vdb /mnt 2>/dev/null || mount -t ext4 -o ro,noload /dev/vdb /mnt
if [ -x /mnt/init.sh ]; then exec /mnt/init.sh; fi
echo "HINTSCOPE-INIT: no payload disk (/dev/vdb with init.sh)"; sleep 5; echo o > /proc/sysrq-trigger
"""

TRIM_DIRS = ["usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/lintian", "usr/share/bug",
             "usr/share/common-licenses", "var/lib/apt/lists", "var/cache/apt", "var/log", "var/cache/debconf"]


def cache_root() -> Path:
    base = os.environ.get("HINTSCOPE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hintscope")
    return Path(base) / "images"


def recipe(k: GuestKernel) -> dict:
    return {"recipe": RECIPE_VERSION, "suite": SUITE, "mirror": MIRROR, "packages": PACKAGES,
            "kver": k.release, "kernel_version": k.version, "headers_version": k.headers_version or k.version,
            "modules": ROOT_MODULES, "init": BOOTSTRAP_INIT, "trim": TRIM_DIRS}


def image_hash(k: GuestKernel) -> str:
    return hashlib.sha256(json.dumps(recipe(k), sort_keys=True).encode()).hexdigest()[:16]


def image_dir(k: GuestKernel) -> Path:
    return cache_root() / image_hash(k)


def cached_image(k: GuestKernel) -> dict | None:
    """build.json of the cached image for this kernel and the current recipe, or None."""
    d = image_dir(k)
    try:
        info = json.loads((d / "build.json").read_text())
    except (OSError, ValueError):
        return None
    if not (d / info.get("image", "root.ext4")).is_file():
        return None
    info["path"] = str(d / info.get("image", "root.ext4"))
    return info


def _run(cmd: list[str] | str, log, **kw) -> None:
    log.write(f"+ {cmd if isinstance(cmd, str) else ' '.join(cmd)}\n")
    log.flush()
    # Never a shell: argv lists only (tests/test_hostile_static.py).
    r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, **kw)
    if r.returncode != 0:
        raise HintscopeError(f"image build step failed (exit {r.returncode}): "
                             f"{cmd if isinstance(cmd, str) else ' '.join(cmd[:4])}; see {log.name}")


def _du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True).stdout
    return int(out.split()[0]) if out else 0


def build(force: bool = False, progress=print, kernel: str | GuestKernel | None = None) -> dict:
    """Build (or reuse) the cached image for a guest kernel (a series such as "6.12", default 6.1);
    returns build.json (plus ``path``), whose ``guest_kernel`` names the kernel."""
    k = kernel if isinstance(kernel, GuestKernel) else guest_kernel.select(kernel)
    if os.geteuid() != 0:
        raise HintscopeError("lab image: building needs root (debootstrap, chroot)")
    for tool in ("debootstrap", "mkfs.ext4", "resize2fs", "e2fsck", "depmod"):
        if not shutil.which(tool):
            raise HintscopeError(f"lab image: {tool} not found (apt-get install debootstrap e2fsprogs kmod)")
    if why := guest_kernel.problems(k):
        raise HintscopeError(f"lab image: guest kernel {k.package} {k.version}: {'; '.join(why)}")
    if not force and (info := cached_image(k)):
        progress(f"image cached: {info['path']} ({info['image_bytes'] >> 20} MiB, built in {info['build_s']:.0f} s)")
        return info
    d = image_dir(k)
    d.mkdir(parents=True, exist_ok=True)
    root = d / "rootfs"
    t0 = time.monotonic()
    steps: dict[str, float] = {}
    with open(d / "build.log", "w") as log:
        def step(name: str, fn) -> None:
            progress(f"image: {name} ...")
            s = time.monotonic()
            fn()
            steps[name] = round(time.monotonic() - s, 1)

        if root.exists():
            _umount_all(root)
            shutil.rmtree(root)
        step("debootstrap", lambda: _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                                          SUITE, str(root), MIRROR], log))
        step("headers", lambda: _install_headers(root, k, log))
        step("modules", lambda: _install_modules(root, k, log))
        step("trim", lambda: _trim(root, log))
        init = root / "sbin" / "hintscope-init"
        init.write_text(BOOTSTRAP_INIT)
        init.chmod(0o755)
        for sub in ("mnt", "run", "var/tmp", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        content = _du_bytes(root)
        img = d / "root.ext4"
        tmp = d / "root.ext4.tmp"

        def mkfs() -> None:
            if tmp.exists():
                tmp.unlink()
            size_mb = int(content * 1.25 / 2**20) + 128
            _run(["truncate", "-s", f"{size_mb}M", str(tmp)], log)
            # no journal: the image is only ever mounted read-only
            _run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-L", "hsroot", "-d", str(root), str(tmp)], log)
            _run(["e2fsck", "-fy", str(tmp)], log)
            _run(["resize2fs", "-M", str(tmp)], log)
            os.replace(tmp, img)

        step("mkfs", mkfs)
        shutil.rmtree(root)
    info = {
        "image": img.name, "hash": image_hash(k), "recipe": {n: v for n, v in recipe(k).items() if n != "init"},
        "kernel": k.vmlinuz, "initrd": k.initrd, "kver": k.release, "guest_kernel": k.meta(), "content_bytes": content,
        "image_bytes": img.stat().st_size, "build_s": round(time.monotonic() - t0, 1), "steps_s": steps,
        "built_realtime_ns": time.time_ns(),
    }
    (d / "build.json").write_text(json.dumps(info, indent=1))
    info["path"] = str(img)
    progress(f"image built: {img} ({info['image_bytes'] >> 20} MiB, content {content >> 20} MiB, {info['build_s']:.0f} s)")
    return info


def _umount_all(root: Path) -> None:
    for sub in ("dev", "sys", "proc"):
        subprocess.run(["umount", "-l", str(root / sub)], capture_output=True)


def _install_headers(root: Path, k: GuestKernel, log) -> None:
    """Headers matching the guest kernel; without them BCC cannot compile (no IKHEADERS)."""
    host_hdr, common = k.headers_dir, k.headers_common_dir
    if k.headers_version == k.version and host_hdr.is_dir() and common.is_dir():
        # Same Debian package as the archive's; copying it skips gcc/binutils/kbuild (~250 MB).
        for src in (host_hdr, common):
            _run(["cp", "-a", str(src), str(root / "usr/src") + "/"], log)
        log.write(f"headers copied from host {host_hdr} ({k.headers_version})\n")
    else:
        sources = (f"deb {MIRROR} {SUITE} main\ndeb {MIRROR} {SUITE}-updates main\n"
                   f"deb http://deb.debian.org/debian-security {SUITE}-security main\n")
        if k.suite != SUITE:
            sources += f"deb {MIRROR} {k.suite} main\n"
        (root / "etc/apt/sources.list").write_text(sources)
        try:
            for sub in ("proc", "sys", "dev"):
                _run(["mount", "--bind", f"/{sub}", str(root / sub)], log)
            # the exact version of the guest's image package; apt then takes its dependencies from
            # whichever suite has them (backports ones only exist there)
            _run(["chroot", str(root), "sh", "-c", "apt-get update -q && DEBIAN_FRONTEND=noninteractive "
                  f"apt-get install -y --no-install-recommends {k.headers_package}={k.version}"], log)
        finally:
            _umount_all(root)
        build_only = subprocess.run(["chroot", str(root), "dpkg-query", "-W", "-f", "${Package}\n",
                                     "linux-kbuild-*", "linux-compiler-*"], capture_output=True, text=True).stdout.split()
        _run(["chroot", str(root), "dpkg", "--purge", "--force-depends", "gcc-12", "cpp-12", "binutils",
              "binutils-common", "binutils-x86-64-linux-gnu", "libbinutils", "libgprofng0", "libctf0",
              "libctf-nobfd0", "libasan8", "libtsan2", "liblsan0", "libubsan1", "libgcc-12-dev", "libisl23",
              "libmpc3", "libmpfr6", "libcc1-0", "libitm1", "libquadmath0", "libgomp1", "libatomic1",
              *build_only], log)
    for arch in (root / "usr/src").glob("linux-headers-*-common/arch/*"):
        if arch.name != "x86":
            shutil.rmtree(arch)


def _module_file(src: Path, rel: str) -> Path:
    """rel as shipped: plain .ko, or compressed (.ko.xz/.ko.zst) as in newer Debian kernels."""
    for suffix in ("", ".xz", ".zst", ".gz"):
        if (src / "kernel" / (rel + suffix)).is_file():
            return src / "kernel" / (rel + suffix)
    raise HintscopeError(f"lab image: {src}/kernel/{rel} missing (the guest kernel ships no such module)")


def _install_modules(root: Path, k: GuestKernel, log) -> None:
    src = k.modules
    dst = root / "lib/modules" / k.release
    if not src.is_dir():
        raise HintscopeError(f"lab image: {src} missing (reinstall {k.package})")
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.glob("modules.builtin*"):
        shutil.copy2(f, dst)
    shutil.copy2(src / "modules.order", dst)
    builtin = set((src / "modules.builtin").read_text().split()) if (src / "modules.builtin").is_file() else set()
    for rel in ROOT_MODULES:
        if f"kernel/{rel}" in builtin:  # e.g. virtio_console in 6.12; modprobe then finds it built in
            log.write(f"{rel}: built into {k.release}\n")
            continue
        f = _module_file(src, rel)
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, out)
    for link, target in (("build", k.headers_dir), ("source", k.headers_common_dir)):
        os.symlink(target, dst / link)
    _run(["depmod", "-b", str(root), k.release], log)


def _trim(root: Path, log) -> None:
    for rel in TRIM_DIRS:
        p = root / rel
        if p.is_dir():
            shutil.rmtree(p)
            p.mkdir()
    loc = root / "usr/share/locale"
    if loc.is_dir():
        for p in loc.iterdir():
            if p.name != "locale.alias":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    # python's own test suite is ~30 MB and never imported
    for p in (root / "usr/lib").glob("python3*/test"):
        shutil.rmtree(p)


def add_parser(sub) -> None:
    p = sub.add_parser("image", help="build (or reuse) the cached Linux guest root image (root)",
                       description="Build the read-only Debian bookworm guest root (python3-bpfcc + kernel headers), "
                                   "cached by recipe hash; prints its path, size and build time.")
    p.add_argument("--force", action="store_true", help="rebuild even if a cached image exists")
    p.add_argument("--print-path", action="store_true", help="print only the image path (builds if needed)")
    add_kernel_argument(p)
    p.set_defaults(func=_cmd)


def add_kernel_argument(p) -> None:
    if "--guest-kernel" not in p._option_string_actions:  # shared by `lab image` and `lab migrate`
        p.add_argument("--guest-kernel", default=guest_kernel.DEFAULT_SERIES, choices=list(guest_kernel.SERIES_SUITE),
                       metavar="SERIES", help="Debian kernel series the Linux guest boots: "
                       f"{', '.join(guest_kernel.SERIES_SUITE)} (default {guest_kernel.DEFAULT_SERIES}; the newest "
                       "installed package of that series is used, see docs/guest.md)")


def _cmd(args) -> int:
    quiet = args.print_path
    info = build(force=args.force, progress=(lambda *_: None) if quiet else print, kernel=args.guest_kernel)
    if quiet:
        print(info["path"])
    else:
        print(json.dumps({k: info[k] for k in ("path", "image_bytes", "content_bytes", "build_s", "steps_s",
                                               "guest_kernel")}))
    return 0
