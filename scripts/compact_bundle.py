#!/usr/bin/env python3
"""Make a lab run bundle small enough to commit as a sample.

The QEMU trace log is the bulk of a run (one line per page sent). This parses it into the
``qemu_trace`` table, which the analysis reads in preference to the log, and drops the raw log.
Usage: scripts/compact_bundle.py SRC_BUNDLE DST_BUNDLE
"""

import shutil
import sys
from pathlib import Path

from hintscope.bundle import BundleWriter, read_bundle
from hintscope.parse import qemu_trace

src, dst = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
if dst.exists():
    sys.exit(f"{dst}: exists")
shutil.copytree(src, dst)
b = read_bundle(dst)
log = qemu_trace.trace_log_path(b)
if log is not None and not b.has(qemu_trace.TABLE):
    w = BundleWriter(dst, "compact", append=True)
    r = qemu_trace.write_to_bundle(w, log)
    w.meta["compacted"] = {"dropped": str(log.relative_to(dst)), "qemu_trace_rows": len(r.frame)}
    w.close("compacted")
    log.unlink()
print(f"{dst}: {sum(f.stat().st_size for f in dst.rglob('*') if f.is_file()) / 1e6:.2f} MB")
