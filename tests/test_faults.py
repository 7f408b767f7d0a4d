"""Faults during a real probed migration: the probe or a QEMU dies, the migration is cancelled, the disk fills.

Real everything: a KVM QEMU (SeaBIOS, no boot device) migrating at 32 KiB/s with a 1 ms downtime
limit (so the migration is active for ~10 s and every fault lands mid-migration), a destination
QEMU on a unix socket, and ``python -m hintscope probe host`` attached to the
source.  After each fault:

* the bundle opens (read_bundle) and every part that was on disk before the fault is still there
  with at least as many rows (flushed = kept);
* meta says what ended the capture (end_reason), or the bundle is marked unfinished (SIGKILL);
* ``hintscope analyze`` runs without a traceback and never gives the clean verdict
  ("no unsafe ordering found") for a capture that a fault cut short.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest


from hintscope.bundle import read_bundle
from tests.qmp_sync import QMP

ROOT = Path(__file__).resolve().parents[1]
QEMU = os.environ.get("HINTSCOPE_QEMU", "/usr/bin/qemu-system-x86_64")
ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
SAFE = "no unsafe ordering found"
REAL = [pytest.mark.needs_root, pytest.mark.needs_bpf, pytest.mark.needs_kvm, pytest.mark.needs_qemu]


class Rig:
    """Source + destination QEMU, the probe on the source, a never-converging migration."""

    def __init__(self, work: Path, out: Path):
        self.work, self.out = work, out
        # SeaBIOS with no boot device: a running KVM guest; the bandwidth cap (not the guest's
        # dirty rate) keeps the migration active for ~10 s, so faults land mid-migration.
        common = ["-accel", "kvm", "-m", "64", "-display", "none", "-nodefaults", "-no-user-config"]
        self.mig = work / "mig.sock"
        self.procs: list[subprocess.Popen] = []
        self.src = self._qemu("src", common)
        self.dst = self._qemu("dst", common + ["-incoming", f"unix:{self.mig}"])
        self.src_qmp = QMP(work / "src.qmp")
        self.dst_qmp = QMP(work / "dst.qmp")
        self.probe = subprocess.Popen([sys.executable, "-m", "hintscope", "probe", "host", "--pid",
                                       str(self.src.pid), "-o", str(out), "--flush-interval", "0.2"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                                      cwd=str(work))
        self.procs.append(self.probe)
        r, _, _ = select.select([self.probe.stdout], [], [], 180)
        line = self.probe.stdout.readline() if r else ""
        if line.strip() != "ATTACHED":
            self.close()
            raise AssertionError(f"probe did not attach: {self.probe.stderr.read()[-2000:]}")

    def _qemu(self, name: str, args: list[str]) -> subprocess.Popen:
        p = subprocess.Popen([QEMU, "-name", f"hs-fault-{name}", *args, "-serial", f"file:{self.work / name}.serial",
                              "-qmp", f"unix:{self.work / name}.qmp,server=on,wait=off"],
                             stdout=subprocess.DEVNULL, stderr=open(self.work / f"{name}.stderr", "wb"))
        self.procs.append(p)
        return p

    def start_migration(self, min_active_s: float = 1.5) -> dict:
        self.src_qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 32 << 10, "downtime-limit": 1})
        self.src_qmp.cmd("migrate", uri=f"unix:{self.mig}")
        t0 = time.monotonic()
        while True:
            st = self.src_qmp.cmd("query-migrate")
            parts = list((self.out / "ioctls").glob("part-*.parquet")) if (self.out / "ioctls").is_dir() else []
            if st.get("status") == "active" and time.monotonic() - t0 >= min_active_s and parts:
                return st
            assert st.get("status") in ("setup", "active"), st
            assert time.monotonic() - t0 < 60, st
            time.sleep(0.1)

    def flushed(self) -> dict[str, int]:
        """Rows per part file on disk now (these are flushed: parts are renamed into place)."""
        import pyarrow.parquet as pq

        out = {}
        for f in self.out.glob("*/part-*.parquet"):
            out[str(f.relative_to(self.out))] = pq.ParquetFile(f).metadata.num_rows
        return out

    def wait_probe(self, timeout: float = 60) -> tuple[int | None, str]:
        try:
            _, err = self.probe.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.probe.kill()
            _, err = self.probe.communicate()
            return None, err
        return self.probe.returncode, err

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def rig():
    work = Path(tempfile.mkdtemp(prefix="hs-fault-", dir="/tmp"))
    made: list[Rig] = []

    def make(out: Path | None = None) -> Rig:
        r = Rig(work, out or work / "b")
        made.append(r)
        return r

    try:
        yield make
    finally:
        for r in made:
            r.close()
        subprocess.run(["umount", "-l", str(work / "small")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def analyze(bundle: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "hintscope", "analyze", str(bundle), "--json"], capture_output=True,
                       text=True, env=ENV, timeout=300)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.returncode in (0, 1), r.stderr[-2000:]
    return json.loads(r.stdout)


def check_after(out: Path, before: dict[str, int], end_reasons: tuple[str, ...] | None) -> dict:
    b = read_bundle(out)
    for p in b.problems:
        assert "\n" not in p
    for rel, n in before.items():
        assert (out / rel).is_file(), f"flushed part {rel} disappeared"
    for table in {rel.split("/")[0] for rel in before}:
        want = sum(n for rel, n in before.items() if rel.startswith(table + "/"))
        got = len(b.table(table))
        assert got >= want, f"{table}: {got} rows after the fault, {want} were flushed before it"
    assert not any("unreadable" in p for p in b.problems), b.problems
    if end_reasons is None:
        assert not b.complete and any("did not finish" in p for p in b.problems)
    else:
        reason = b.meta.get("end_reason")
        assert b.complete and reason is not None and reason.startswith(end_reasons), reason
        rows = b.meta.get("rows", {})
        for t, n in rows.items():  # what the probe says it wrote is what reads back
            assert len(b.table(t)) == n, (t, n, len(b.table(t)))
    res = analyze(out)
    verdict = res["verdict"]
    # Recorded for docs/reliability.md (pytest -s shows it).
    print(f"\nFAULT-RESULT {out.name}: complete={b.complete} end={b.meta.get('end_reason')!r} "
          f"flushed_before={sum(before.values())} rows_after={ {t: len(b.table(t)) for t in b.tables()} } "
          f"problems={len(b.problems)} verdict={verdict!r}")
    assert verdict != SAFE, f"a faulted capture got the clean verdict: {res['coverage']}"
    return res


@pytest.mark.parametrize("sig, reason", [(signal.SIGINT, "sigint"),
                                         pytest.param(signal.SIGTERM, "sigterm", marks=pytest.mark.lab)])
@pytest.mark.parametrize("_m", [pytest.param(0, marks=REAL)])
def test_probe_signal_mid_migration(rig, sig, reason, _m):
    r = rig()
    r.start_migration()
    before = r.flushed()
    r.probe.send_signal(sig)
    rc, err = r.wait_probe()
    assert rc == 0 and "Traceback" not in err, err[-2000:]
    assert r.src.poll() is None, "the probe's signal must not reach QEMU"
    check_after(r.out, before, (reason,))


@pytest.mark.parametrize("_m", [pytest.param(0, marks=REAL)])
def test_probe_sigkill_mid_migration(rig, _m):
    r = rig()
    r.start_migration()
    time.sleep(0.5)
    before = r.flushed()
    r.probe.kill()
    r.wait_probe()
    assert r.src.poll() is None
    check_after(r.out, before, None)


@pytest.mark.lab
@pytest.mark.parametrize("_m", [pytest.param(0, marks=REAL)])
def test_source_qemu_killed_mid_migration(rig, _m):
    r = rig()
    r.start_migration()
    before = r.flushed()
    r.src.kill()
    r.src.wait()
    rc, err = r.wait_probe()
    assert rc == 0 and "Traceback" not in err, err[-2000:]
    check_after(r.out, before, ("target-exit",))


@pytest.mark.lab
@pytest.mark.parametrize("_m", [pytest.param(0, marks=REAL)])
def test_migration_cancelled(rig, _m):
    r = rig()
    r.start_migration()
    r.src_qmp.cmd("migrate_cancel")
    deadline = time.monotonic() + 30
    while r.src_qmp.cmd("query-migrate").get("status") != "cancelled":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.5)
    before = r.flushed()
    r.probe.send_signal(signal.SIGINT)
    rc, err = r.wait_probe()
    assert rc == 0, err[-2000:]
    check_after(r.out, before, ("sigint",))


@pytest.mark.lab
@pytest.mark.parametrize("_m", [pytest.param(0, marks=REAL)])
def test_destination_dies_mid_migration(rig, _m):
    r = rig()
    r.start_migration()
    r.dst.kill()
    r.dst.wait()
    deadline = time.monotonic() + 30
    while (st := r.src_qmp.cmd("query-migrate").get("status")) not in ("failed", "cancelled"):
        assert time.monotonic() < deadline, st
        time.sleep(0.1)
    assert r.src.poll() is None, "source QEMU must survive its destination"
    before = r.flushed()
    r.probe.send_signal(signal.SIGINT)
    rc, err = r.wait_probe()
    assert rc == 0, err[-2000:]
    check_after(r.out, before, ("sigint",))


@pytest.mark.parametrize("_m", [pytest.param(0, marks=REAL)])
def test_disk_fills_during_capture(rig, _m, tmp_path):
    """Probe output on a 2 MiB tmpfs: the capture ends in a one-line error, the bundle stays readable."""
    small = Path(tempfile.mkdtemp(prefix="hs-fault-small-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        r = rig(small / "b")
        r.start_migration(min_active_s=0.5)
        filler = small / "filler"
        # Leave ~32 KiB so the fault comes within seconds, mid-capture (a flush writes a few KB).
        free = shutil.disk_usage(small).free
        with open(filler, "wb") as f:
            f.write(b"\0" * max(0, free - (32 << 10)))
        before = r.flushed()
        deadline = time.monotonic() + 30
        while r.probe.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if r.probe.poll() is None:
            r.probe.send_signal(signal.SIGINT)
        rc, err = r.wait_probe()
        print(f"\nDISK-FULL probe rc={rc} stderr tail: {err.strip().splitlines()[-2:] if err.strip() else ''}")
        assert "Traceback" not in err, err[-3000:]
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc != 0 and lines and lines[-1].startswith("hintscope: error:") and "No space" in lines[-1], \
            err[-2000:]
        os.unlink(filler)  # reading needs no space, but analyze's caches might
        b = read_bundle(small / "b")
        # The closing meta was written from the reserved space and says what ended the capture and what was lost.
        assert b.complete and b.meta["end_reason"].startswith("error") and "No space" in b.meta["end_reason"], b.meta
        assert sum(b.meta["unwritten_rows"].values()) == b.meta["lost"]["bundle_write"] > 0
        print(f"\nDISK-FULL unwritten_rows={b.meta['unwritten_rows']}")
        check_after(small / "b", before, ("error",))
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)
        shutil.rmtree(small, ignore_errors=True)


@pytest.mark.needs_root
def test_writer_on_full_disk_is_one_line_and_closes(tmp_path):
    """BundleWriter alone on a 1 MiB tmpfs: one-line BundleError, closing meta still written, rows accounted."""
    import numpy as np

    from hintscope.errors import BundleError
    from hintscope.bundle import BundleWriter
    from test_hostile_util import ioctl_rows

    small = Path(tempfile.mkdtemp(prefix="hs-fault-w-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        w = BundleWriter(small / "b", producer="t")
        rng = np.random.default_rng(1)
        written, err = 0, None
        for i in range(200):
            df = ioctl_rows(2000, start=i * 2000)
            df["arg0"] = rng.integers(0, 2**63, len(df)).astype(np.uint64)  # incompressible
            w.append("ioctls", df)
            try:
                w.flush()
                written += len(df)
            except BundleError as e:
                err = str(e)
                break
        assert err and "\n" not in err and "No space" in err and "ioctls" in err, err
        df = ioctl_rows(4000, start=10**7)
        df["arg0"] = rng.integers(0, 2**63, len(df)).astype(np.uint64)
        w.append("ioctls", df)
        with pytest.raises(BundleError) as ei:
            w.close("duration")
        assert "\n" not in str(ei.value)
        b = read_bundle(small / "b")
        assert b.complete and b.meta["end_reason"].startswith("error"), b.meta
        assert len(b.table("ioctls")) == written == b.meta["rows"]["ioctls"]
        assert b.meta["unwritten_rows"]["ioctls"] == b.meta["lost"]["bundle_write"] >= 6000
        assert not list((small / "b" / "ioctls").glob(".*.tmp")), "half-written part left behind"
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)
        shutil.rmtree(small, ignore_errors=True)
