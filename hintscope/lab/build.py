"""Builds the bare-metal lab guests from source with gcc/as/ld into a cache directory.

The cache key is a hash of every source file (and every header beside one or in guests/common/),
the flags and the compiler version, so an edited source (or another compiler) gives a fresh build and
an unchanged one is reused. The cache lives in $HINTSCOPE_CACHE, else ~/.cache/hintscope.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from hintscope.errors import HintscopeError

GUESTS_DIR = Path(__file__).parent / "guests"

CFLAGS = ["-m32", "-march=i686", "-ffreestanding", "-nostdlib", "-fno-pic", "-fno-pie", "-fno-stack-protector",
          "-fno-asynchronous-unwind-tables", "-fno-builtin", "-O2", "-Wall", "-Werror", "-std=gnu11"]
LDFLAGS = ["-m", "elf_i386", "-nostdlib", "-static", "-z", "max-page-size=0x1000", "--build-id=none"]

# guest name -> (sources in link order, linker script), paths relative to guests/. common/ holds the
# multiboot entry (it calls the guest's guest_main), the linker script and baremetal.{h,c}; it is on
# the include path. The guest's own source links before baremetal.c: its page-aligned .bss then keeps
# the addresses (and image end) it had before the common code was split out.
GUESTS = {
    "dirtier": (["common/boot.S", "dirtier/dirtier.c", "common/baremetal.c"], "common/link.ld"),
    # free page hinting guest (lab/hintguest.py)
    "hintguest": (["common/boot.S", "hintguest/hintguest.c", "common/baremetal.c"], "common/link.ld"),
}
COMMON_DIR = GUESTS_DIR / "common"


def cache_dir() -> Path:
    env = os.environ.get("HINTSCOPE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "hintscope"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise HintscopeError(f"cannot build the lab guest: {name} not found (apt-get install build-essential)")
    return path


def _cache_key(paths: list[Path]) -> str:
    # headers are not listed: take every one beside a listed file, and the common ones
    headers = {h for d in {p.parent for p in paths} | {COMMON_DIR} for h in d.glob("*.h")}
    h = hashlib.sha256()
    for p in paths + sorted(headers - set(paths)):
        h.update(str(p.relative_to(GUESTS_DIR)).encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    h.update(subprocess.run([_tool("gcc"), "--version"], capture_output=True, text=True).stdout.encode())
    return h.hexdigest()[:16]


def _run(cmd: list[str], cwd: Path) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise HintscopeError(f"guest build failed: {' '.join(cmd[:2])} ...: {msg[0] if msg else r.returncode}")


def build_guest(name: str = "dirtier", force: bool = False) -> Path:
    """Path to the built multiboot ELF of guest ``name``, building it if sources changed."""
    if name not in GUESTS:
        raise HintscopeError(f"unknown lab guest {name!r} (known: {', '.join(GUESTS)})")
    sources, script = GUESTS[name]
    srcs, lds = [GUESTS_DIR / s for s in sources], GUESTS_DIR / script
    key = _cache_key(srcs + [lds])
    out = cache_dir() / "guests" / f"{name}-{key}.elf"
    if out.is_file() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    gcc, ld = _tool("gcc"), _tool("ld")
    _tool("as")
    with tempfile.TemporaryDirectory(prefix=f"hs-build-{name}-") as tmp:
        t = Path(tmp)
        objs = []
        for i, s in enumerate(srcs):
            o = t / f"{i:02d}-{s.stem}.o"
            _run([gcc, *CFLAGS, "-I", str(COMMON_DIR), "-c", str(s), "-o", str(o)], t)
            objs.append(str(o))
        elf = t / f"{name}.elf"
        _run([ld, *LDFLAGS, "-T", str(lds), "-o", str(elf), *objs], t)
        _check_multiboot(elf)
        tmp_out = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        shutil.copyfile(elf, tmp_out)
        os.replace(tmp_out, out)
    return out


def _check_multiboot(elf: Path) -> None:
    """The multiboot v1 header must be 4-aligned within the first 8 KiB of the file."""
    head = elf.read_bytes()[:8192]
    magic = (0x1BADB002).to_bytes(4, "little")
    off = head.find(magic)
    while off >= 0 and off % 4:
        off = head.find(magic, off + 1)
    if off < 0:
        raise HintscopeError(f"{elf}: no multiboot header in the first 8 KiB; check link.ld")


if __name__ == "__main__":
    print(build_guest())
