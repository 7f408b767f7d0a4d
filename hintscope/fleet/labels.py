"""What a run was, read from its bundle meta: the labels a fleet index and ``compare`` group by.

Every producer records its configuration in its own place (``lab`` for ``lab migrate`` and
``lab linux``, ``hintguest`` for ``lab hintguest``, ``vmm`` for a probe attached by pid, ``sim``
for the simulator, ``guest`` for the Linux guest's kernel) and a bundle joined by several
producers holds all of them.  :func:`run_labels` reads them in one order, falls back to the
QEMU command line when a producer kept only that, and never guesses: a label is absent when
no part of meta knows it.  Meta is untrusted input, so every value is checked for its type.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

_VERSION_RE = re.compile(r"(\d+\.\d+(?:\.\d+)?)")
_BUILD_RE = re.compile(r"\(([^()]{1,80})\)")
_MAX = 80
BARE_METAL = ("dirtier", "hintguest")    # hintscope's own guests: no kernel to name


def _d(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def _s(x: Any) -> str | None:
    return x[:_MAX] if isinstance(x, str) and x else None


def _argv(meta: dict) -> list[str]:
    """The source QEMU's argv, from whichever producer kept it."""
    for holder in (_d(meta.get("lab")), _d(meta.get("hintguest"))):
        a = holder.get("src_argv")
        if isinstance(a, list) and all(isinstance(x, str) for x in a) and a:
            return a
    cmd = _d(meta.get("vmm")).get("cmdline")
    if isinstance(cmd, str) and cmd:
        try:
            return shlex.split(cmd)
        except ValueError:
            return cmd.split()
    # hintguest keeps only the destination's argv in older bundles; its devices match the source's
    a = _d(meta.get("hintguest")).get("dst_argv")
    return a if isinstance(a, list) and all(isinstance(x, str) for x in a) else []


def _opt(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]


def balloon(argv: list[str]) -> str | None:
    """The source's virtio-balloon device: "free-page-hint=on", "free-page-hint=off", "none";
    None when the command line is unknown."""
    if not argv:
        return None
    devs = [d for d in _opt(argv, "-device") if d.split(",", 1)[0].startswith("virtio-balloon")]
    if not devs:
        return "none"
    on = any(re.search(r"(?:^|,)free-page-hint=(?:on|true|yes)(?:,|$)", d) for d in devs)
    return "free-page-hint=on" if on else "free-page-hint=off"


def _kernel_file(argv: list[str]) -> str:
    k = _opt(argv, "-kernel")
    return k[-1].rsplit("/", 1)[-1] if k else ""


def _guest_kind(meta: dict, argv: list[str]) -> str | None:
    g = _d(meta.get("guest"))
    lab = _d(meta.get("lab"))
    if meta.get("hintguest"):
        return "hintguest"
    if isinstance(meta.get("sim"), dict):
        return "sim"
    if kind := _s(g.get("kind")) or _s(lab.get("guest")):
        return kind
    # a probe attached by pid keeps only the command line: name the guest by its -kernel file
    kf = _kernel_file(argv)
    if kf.startswith("vmlinuz-"):
        return "linux"
    for own in BARE_METAL:
        if kf.startswith(own + "-") and kf.endswith(".elf"):
            return own
    return None


def _guest_kernel(meta: dict, argv: list[str]) -> str | None:
    k = _d(_d(meta.get("guest")).get("kernel"))
    if _s(k.get("release")):
        return _s(k["release"])
    img = _d(_d(meta.get("lab")).get("image"))
    if _s(img.get("kver")):     # Linux-guest bundles written before meta["guest"] existed
        return _s(img["kver"])
    hdr = _d(_d(_d(meta.get("sources")).get("guest_probe")).get("header"))
    if _s(hdr.get("kernel")):
        return _s(hdr["kernel"])
    kf = _kernel_file(argv)
    return _s(kf.removeprefix("vmlinuz-")) if kf.startswith("vmlinuz-") else None


def _driver(kind: str | None) -> bool | None:
    """Whether the guest drives a virtio balloon: the bare-metal dirtier has no driver."""
    if kind in ("linux", "hintguest", "sim"):
        return True
    if kind == "dirtier":
        return False
    return None


def _int(x: Any) -> int | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, int) and 0 < x < 1 << 40:
        return x
    if isinstance(x, str) and re.fullmatch(r"\d{1,12}", x.split(",")[0].strip()):
        return int(x.split(",")[0])
    return None


def _mem_mb(x: str) -> int | None:
    m = re.fullmatch(r"(?:size=)?(\d{1,9})([MmGg]?)", x.split(",")[0])
    if not m:
        return None
    return int(m.group(1)) * (1024 if m.group(2) in ("G", "g") else 1)


def _dirty_ring(lab: dict, argv: list[str]) -> str | None:
    """KVM dirty-ring size ("off" for the bitmap), from the lab or ``-accel kvm,dirty-ring-size=N``."""
    r = lab.get("dirty_ring")
    if isinstance(r, int) and not isinstance(r, bool) and 0 <= r < 1 << 32:
        return str(r) if r else "off"
    for a in _opt(argv, "-accel"):
        if a.split(",")[0] == "kvm":
            m = re.search(r"(?:^|,)dirty-ring-size=(\d{1,10})(?:,|$)", a)
            return m.group(1) if m and int(m.group(1)) else "off"
    return None


def run_labels(meta: dict[str, Any]) -> dict[str, str]:
    """Labels of one run: qemu, qemu_build, host_kernel, guest, guest_kernel, guest_mb, vcpus, accel,
    dirty_ring, balloon, hint, workload, variant, seed, producer; then meta["labels"] (which wins)."""
    meta = _d(meta)
    lab, hg, vmm, sim = (_d(meta.get(k)) for k in ("lab", "hintguest", "vmm", "sim"))
    argv = _argv(meta)
    out: dict[str, str] = {}

    ver = _s(lab.get("qemu_version")) or _s(hg.get("qemu_version")) or _s(vmm.get("version"))
    # scripts/build-qemu.sh binaries carry their own label ("patched (<hash>)"), see lab.qemu.qemu_label
    label = _s(lab.get("qemu_label")) or _s(hg.get("qemu_label"))
    if label:
        out["qemu"] = label
    elif ver:
        m = _VERSION_RE.search(ver)
        out["qemu"] = m.group(1) if m else ver[:40]
    build = _s(_d(lab.get("qmp_version")).get("package")) or (
        _BUILD_RE.search(ver).group(1) if ver and _BUILD_RE.search(ver) else None)
    if build:
        out["qemu_build"] = build
    if _s(_d(meta.get("host")).get("kernel")):
        out["host_kernel"] = _s(meta["host"]["kernel"])

    kind = _guest_kind(meta, argv)
    if kind:
        out["guest"] = kind
    if gk := _guest_kernel(meta, argv):
        out["guest_kernel"] = gk
    elif kind in BARE_METAL:
        out["guest_kernel"] = "bare-metal"

    mem = _int(lab.get("mem_mb"))
    if mem is None and _opt(argv, "-m"):
        mem = _mem_mb(_opt(argv, "-m")[-1])
    if mem is None and sim:
        pages = _int(_d(sim.get("config")).get("pages"))
        mem = (pages * 4096) >> 20 if pages else None
    if mem:
        out["guest_mb"] = str(mem)

    vcpus = _int(lab.get("smp")) or (_int(_opt(argv, "-smp")[-1]) if _opt(argv, "-smp") else None)
    if vcpus is None and sim:
        vcpus = _int(_d(sim.get("config")).get("vcpus"))
    if vcpus:
        out["vcpus"] = str(vcpus)

    accel = _s(lab.get("accel")) or (_opt(argv, "-accel")[-1].split(",")[0][:20] if _opt(argv, "-accel") else None)
    if accel is None and ("-enable-kvm" in argv):
        accel = "kvm"
    if accel is None and sim:
        accel = "sim"
    if accel:
        out["accel"] = accel

    ring = _dirty_ring(lab, argv)
    if ring is None and accel in ("tcg", "hvf", "whpx", "xen"):
        ring = "none"                    # no KVM dirty log at all
    if ring:
        out["dirty_ring"] = ring

    dev = balloon(argv)
    if dev:
        out["balloon"] = dev
    driver = _driver(kind)
    if sim:
        hint = True                      # the simulator models the hinting protocol in every run
    elif dev is not None:
        # hinting needs the device with free-page-hint=on AND a guest driver that uses it
        hint = dev == "free-page-hint=on" and driver is not False
    elif isinstance(lab.get("hint"), bool):
        hint = lab["hint"]               # no command line kept: the lab's own flag
    else:
        hint = None
    if hint is not None:
        out["hint"] = "on" if hint else "off"

    work = None
    if _s(hg.get("behaviour")):
        work = hg["behaviour"]
    elif _s(sim.get("variant")):
        work = sim["variant"]
    elif isinstance(lab.get("workload"), dict):
        w = lab["workload"]
        work = " ".join(f"{k}={w[k]}" for k in ("fill_mb", "writer_mb", "pressure_mb") if isinstance(w.get(k), int))
    elif _s(_d(lab.get("guest_params")).get("append")):
        work = _d(lab["guest_params"])["append"]
    elif kind == "hintguest" and _opt(argv, "-append"):
        m = re.search(r"(?:^|\s)behaviour=(\S+)", _opt(argv, "-append")[-1])
        work = m.group(1) if m else None
    if work:
        out["workload"] = str(work)[:_MAX]
    for k in ("variant", "seed"):
        if k in sim and isinstance(sim[k], (str, int)) and not isinstance(sim[k], bool):
            out[k] = str(sim[k])[:_MAX]

    prods = sorted(p for p in _d(meta.get("producers")) if isinstance(p, str))
    first = _s(meta.get("producer"))
    names = sorted({*prods, *([first] if first else [])})
    if names:
        out["producer"] = "+".join(names)[:_MAX]

    for k, v in _d(meta.get("labels")).items():
        if isinstance(v, (str, int, float)) and not isinstance(v, bool):
            out[str(k)[:40]] = str(v)[:_MAX]
    return out
