"""Finding BCC and the kernel pieces it needs, with one-line reasons when something is missing.

BCC's Python package ships with Debian's python3-bpfcc for /usr/bin/python3; it is pure ctypes
over libbcc, so any CPython 3.11 can import it once its dist-packages directory is on sys.path.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

from hintscope.errors import HintscopeError

BCC_DIST = "/usr/lib/python3/dist-packages"
TRACEFS = Path("/sys/kernel/tracing")


def load_bcc():
    """Return the ``bcc.BPF`` class or raise a one-line HintscopeError saying why not."""
    try:
        import bcc  # noqa: F401
    except ImportError:
        if BCC_DIST not in sys.path and os.path.isdir(os.path.join(BCC_DIST, "bcc")):
            sys.path.append(BCC_DIST)
        try:
            import bcc  # noqa: F401,F811
        except ImportError as e:
            raise HintscopeError(f"BCC is not installed (apt-get install python3-bpfcc): {e}") from None
    from bcc import BPF

    return BPF


def bpf_unavailable_reason() -> str | None:
    """Why BPF probes cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (CAP_BPF and CAP_PERFMON) to load BPF programs"
    try:
        load_bcc()
    except HintscopeError as e:
        return str(e)
    build = Path(f"/lib/modules/{platform.release()}/build")
    if not (build / "include").is_dir() and not Path("/sys/kernel/kheaders.tar.xz").exists():
        return (f"kernel headers missing ({build} does not exist); run scripts/setup.sh, "
                "which installs linux-headers-amd64 and links them")
    if not ensure_tracefs():
        return f"tracefs is not mounted at {TRACEFS} and could not be mounted"
    return None


def ensure_tracefs() -> bool:
    """Mount tracefs if it is not (BCC reads tracepoint formats from it)."""
    if (TRACEFS / "events").is_dir():
        return True
    if os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
    return (TRACEFS / "events").is_dir()


def compile_error(e: Exception) -> HintscopeError:
    """Turn BCC's compile/load exceptions into a one-line reason."""
    msg = str(e)
    if "kernel headers" in msg.lower():
        return HintscopeError("BCC cannot find kernel headers; run scripts/setup.sh (installs linux-headers-amd64 "
                              "and links /lib/modules/$(uname -r)/build)")
    if "Operation not permitted" in msg or "EPERM" in msg:
        return HintscopeError("no permission to load BPF programs (run as root)")
    return HintscopeError(f"BPF program failed to compile or load: {msg.splitlines()[0] if msg else type(e).__name__}")
