"""Lab: dirtier guest build, memory diff, QMP rows, and real KVM migrations on loopback.

The migration tests run QEMU under KVM for real (a few seconds each). Their independent checks:
the guest's known dirty set against what the probe saw KVM hand out, the probe's ioctl counts
against a separate bpftrace count and against QEMU's own trace log, and the destination's memory
against the paused source.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest


from hintscope.analysis.harvest import unrun
from hintscope.bundle import read_bundle
from hintscope.errors import HintscopeError
from hintscope.lab import build, memdiff
from hintscope.lab.dirtier import LabOptions, _check_opts, _truth_frame, parse_pages
from hintscope.lab.session import qmp_row

HAVE_PROBE = importlib.util.find_spec("hintscope.probes.host") is not None
needs_kvm, needs_qemu, needs_root, needs_bpf, lab = (pytest.mark.needs_kvm, pytest.mark.needs_qemu,
                                                     pytest.mark.needs_root, pytest.mark.needs_bpf, pytest.mark.lab)
needs_probe = pytest.mark.skipif(not HAVE_PROBE, reason="hintscope.probes.host not written yet")


# --------------------------------------------------------------------------------------------
# pure parts


def test_parse_pages_grammar():
    assert parse_pages("0x400-0x4ff,0x800,4096") == [(0x400, 0x4FF), (0x800, 0x800), (4096, 4096)]
    for bad in ["", "0x400-", "x", "0x10-0x5", "1,,2"]:
        with pytest.raises(HintscopeError):
            parse_pages(bad)


def test_options_reject_pages_outside_ram_or_on_the_image(tmp_path):
    for pages in ["0x100-0x200", "0xffff0", "0x400-0x8000"]:
        with pytest.raises(HintscopeError):
            _check_opts(LabOptions(bundle=tmp_path / "b", pages=pages, mem_mb=64))
    with pytest.raises(HintscopeError):  # --prefill overlapping --pages
        _check_opts(LabOptions(bundle=tmp_path / "b", pages="0x1000-0x1010", fill_mb=1))
    assert _check_opts(LabOptions(bundle=tmp_path / "b", pages="0x400-0x4ff")) == [(0x400, 0x4FF)]


def test_qmp_row_takes_counters_and_marks_absent_ones():
    info = {"status": "active", "total-time": 12, "ram": {"transferred": 100, "normal": 3, "duplicate": 7,
                                                          "dirty-sync-count": 2, "remaining": 4096}}
    r = qmp_row(5, 6, info)
    assert (r["status"], r["total_time"], r["normal"], r["remaining"]) == ("active", 12, 3, 4096)
    assert r["dirty_pages_rate"] == -1 and json.loads(r["raw"]) == info
    assert qmp_row(1, 2, {"status": "setup"})["transferred"] == -1


def test_truth_frame_trusts_options_and_bounds_the_guest_line():
    t = _truth_frame([(0x400, 0x4FF)], 2, {"bss": "0x102-0x106"})
    assert list(zip(t["first_gfn"], t["last_gfn"], t["role"])) == [
        (0x400, 0x4FF, "target"), (0x1000, 0x11FF, "fill"), (0x102, 0x106, "image")]
    for hostile in ["0x0-0xffffffff", "0x106-0x102", "12-13", "0x102-0x106;rm", ""]:
        assert list(_truth_frame([(0x400, 0x400)], 0, {"bss": hostile})["role"]) == ["target"]


def test_ring_occupancy_flags_pushes_past_the_ring_size(tmp_path):
    from hintscope.bundle import BundleWriter
    from hintscope.lab.dirtier import ring_occupancy

    w = BundleWriter(tmp_path / "b", "test")
    n = 6
    w.append("ring_push", {"ts_ns": np.arange(n, dtype=np.int64), "tid": np.ones(n, np.int32),
                           "vcpu": np.zeros(n, np.int32), "dirty_index": np.array([1, 2, 4095, 4096, 4097, 4100], np.uint32),
                           "reset_index": np.array([0, 0, 0, 0, 0, 2], np.uint32), "slot": np.full(n, 5, np.int32),
                           "offset": np.arange(n, dtype=np.uint64)})
    w.close("duration")
    r = ring_occupancy(tmp_path / "b", 4096)
    assert (r["max"], r["pushes_over_size"], r["overflow"]) == (4098, 2, True)
    assert not ring_occupancy(tmp_path / "b", 8192)["overflow"]


def _write_images(tmp_path, pages=64):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2**63, size=(pages, 512), dtype=np.uint64)
    return a, tmp_path / "src.ram", tmp_path / "dst.ram"


def test_memdiff_finds_exactly_the_changed_pages(tmp_path):
    a, s, d = _write_images(tmp_path)
    b = a.copy()
    b[5, 100] ^= 1          # one bit
    b[9] = 0                # destination page zero
    rec = np.zeros(512, dtype=np.uint64)  # a dirtier record: magic, gfn 17, seq 40 vs 41
    rec[0] = memdiff.DIRTIER_MAGIC | (17 << 32)
    a[17], b[17] = rec.copy(), rec.copy()
    a[17, 1], b[17, 1] = 41, 40
    a.tofile(s)
    b.tofile(d)
    diff = memdiff.compare_images(s, d, first_gfn=0)
    got = diff.differing.set_index("gfn")
    assert sorted(got.index) == [5, 9, 17]
    assert got.loc[9, "dst_zero"] and not got.loc[5, "dst_zero"]
    assert (got.loc[17, "src_seq"], got.loc[17, "dst_seq"]) == (41, 40)
    assert set(got["classification"]) == {"lost-write"}
    summ = diff.summary()
    assert (summ["pages_compared"], summ["lost_writes"], summ["dst_older_seq"]) == (64, 3, 1)


def test_memdiff_recognises_a_rewritten_kvmclock_record(tmp_path):
    a, s, d = _write_images(tmp_path, pages=4)
    a[2] = 0
    pv = np.zeros(1, dtype=memdiff.PVCLOCK)
    pv["version"], pv["tsc_timestamp"], pv["mul"], pv["shift"], pv["flags"] = 4, 123, 0xC538280C, -1, 1
    a[2].view(np.uint8)[0xC20:0xC40] = pv.view(np.uint8)
    b = a.copy()
    pv["version"], pv["tsc_timestamp"], pv["flags"] = 6, 999, 0
    b[2].view(np.uint8)[0xC20:0xC40] = pv.view(np.uint8)
    a.tofile(s)
    b.tofile(d)
    assert list(memdiff.compare_images(s, d).differing["classification"]) == ["kvmclock"]
    b[2].view(np.uint8)[0xC41] = 7  # one more byte outside the record: a real difference
    b.tofile(d)
    assert list(memdiff.compare_images(s, d).differing["classification"]) == ["lost-write"]


def test_memdiff_rejects_unequal_images(tmp_path):
    (tmp_path / "a").write_bytes(b"\0" * 8192)
    (tmp_path / "b").write_bytes(b"\0" * 4096)
    with pytest.raises(HintscopeError, match="equal whole-page"):
        memdiff.compare_images(tmp_path / "a", tmp_path / "b")


def test_dirtier_builds_as_multiboot_elf_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HINTSCOPE_CACHE", str(tmp_path))
    elf = build.build_guest("dirtier")
    head = elf.read_bytes()
    assert head[:4] == b"\x7fELF" and head[4] == 1  # 32-bit
    off = head.find((0x1BADB002).to_bytes(4, "little"))
    assert 0 <= off < 8192 and off % 4 == 0
    magic, flags, csum = np.frombuffer(head[off:off + 12], dtype="<u4")
    assert (int(magic) + int(flags) + int(csum)) & 0xFFFFFFFF == 0
    mtime = elf.stat().st_mtime_ns
    assert build.build_guest("dirtier") == elf and elf.stat().st_mtime_ns == mtime


# --------------------------------------------------------------------------------------------
# real migrations


def _trace_lines(bundle: Path, event: str) -> list[str]:
    text = (bundle / "files" / "qemu-trace.log").read_text(errors="replace")
    return re.findall(rf"^\d+@[\d.]+:{event} (.*)$", text, re.M)


def _run_lab(path: Path, **kw) -> dict:
    from hintscope.lab.dirtier import make_sample

    return make_sample(path, crosscheck=True, **kw)


def _target_gfns(b) -> set[int]:
    t = b.table("guest_truth_pages")
    t = t[t["role"] == "target"]
    return {g for a, z in zip(t["first_gfn"], t["last_gfn"]) for g in range(int(a), int(z) + 1)}


def _unexpected(b, gfns: set[int]) -> set[int]:
    """Dirty pages outside everything the guest writes (its truth table); below 1 MiB is
    firmware (SeaBIOS keeps the kvmclock record there, which KVM may update)."""
    t = b.table("guest_truth_pages")
    truth = {g for a, z in zip(t["first_gfn"], t["last_gfn"]) for g in range(int(a), int(z) + 1)}
    return {g for g in gfns - truth if g >= 0x100}


def _slot_gpa(b) -> dict[int, int]:
    """slot id (as_id << 16 | id) -> guest-physical base, from the probe's memslot rows."""
    m = b.table("memslots")
    m = m[(m["size"] > 0) & (m["ret"] == 0)]
    return {int(s) | (int(a) << 16): int(g) for s, a, g in zip(m["slot"], m["as_id"], m["gpa"])}


@pytest.fixture(scope="module")
def bitmap_run(tmp_path_factory):
    p = tmp_path_factory.mktemp("lab") / "bitmap"
    s = _run_lab(p, probe="on" if HAVE_PROBE else "off")
    return p, s


@needs_kvm
@needs_qemu
@needs_root
def test_lab_bitmap_migration_is_exact_and_counted(bitmap_run):
    p, s = bitmap_run
    b = read_bundle(p)
    assert not b.problems
    assert s["migration"]["status"] == "completed" and s["accel"] == "kvm" and s["dirty_ring"] == 0
    mc = b.meta["memcheck"]
    assert mc["pages_compared"] == 256 * 256 and mc["lost_writes"] == 0, mc
    assert len(b.table("lost_pages")) == 0 and mc["pages_differing"] == len(mc["kvmclock_gfns"]) <= 1
    assert s["dst_health"]["ok"], s["dst_health"]
    q = b.table("qmp")
    assert q["status"].iloc[-1] == "completed" and (np.diff(q["ts_ns"]) > 0).all()
    # QEMU's own trace log and the bpftrace count agree on CLEAR_DIRTY_LOG; syncs match QMP.
    cc = s["crosscheck"]["ioctls"]
    assert cc, s["crosscheck"]
    assert cc["CLEAR_DIRTY_LOG"] == len(_trace_lines(p, "kvm_clear_dirty_log")) > 0, (s["crosscheck"], p)
    assert len(_trace_lines(p, "migration_bitmap_sync_end")) == q["dirty_sync_count"].iloc[-1]
    assert cc["GET_DIRTY_LOG"] > 0 and cc["RESET_DIRTY_RINGS"] == 0


@needs_kvm
@needs_qemu
@needs_bpf
@needs_probe
def test_lab_bitmap_probe_sees_the_known_dirty_set(bitmap_run):
    p, s = bitmap_run
    b = read_bundle(p)
    io = b.table("ioctls")
    cc = s["crosscheck"]["ioctls"]
    assert cc, s["crosscheck"]
    # (b) the probe's ioctl rows against two independent counters
    assert (io["name"] == "GET_DIRTY_LOG").sum() == cc["GET_DIRTY_LOG"]
    assert (io["name"] == "CLEAR_DIRTY_LOG").sum() == cc["CLEAR_DIRTY_LOG"] == len(_trace_lines(p, "kvm_clear_dirty_log"))
    # (a) the GET harvests after each slot's first one (which manual protect's INITIALLY_SET makes
    # all ones) hold every page the dirtier rewrites and nothing it does not write.
    gets = io[io["name"] == "GET_DIRTY_LOG"].sort_values("seq")
    later = gets.loc[gets.groupby("slot").cumcount() > 0, "seq"]
    w = b.table("bitmap_words")
    w = unrun(w[(w["op"] == "get") & w["seq"].isin(later)])    # schema 2: a row may be a run of equal words
    base = _slot_gpa(b)
    bits = np.unpackbits(w["mask"].to_numpy(np.uint64).view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
    r, c = np.nonzero(bits)
    gpa = np.array([base.get(int(x), -1 << 40) for x in w["slot"]], dtype=np.int64)
    gfns = {int(g) for g in (gpa[r] >> 12) + w["word"].to_numpy()[r] * 64 + c}
    missing = _target_gfns(b) - gfns
    assert not missing, f"{len(missing)} dirtier pages never harvested, e.g. {sorted(missing)[:5]}"
    assert not _unexpected(b, gfns), f"harvested pages the guest never wrote: {sorted(_unexpected(b, gfns))[:5]}"


RING = 65536


@pytest.fixture(scope="module")
def ring_run(tmp_path_factory):
    p = tmp_path_factory.mktemp("lab") / "ring"
    # 65536 entries: the run pushes ~25k. Smaller rings overflow on this PVM host (every guest store
    # is emulated and pushed, and the ring passes its size: kernel WARN in kvm_dirty_ring_push),
    # which loses writes; see docs/lab.md.
    s = _run_lab(p, probe="on" if HAVE_PROBE else "off", dirty_ring=RING)
    return p, s


@needs_kvm
@needs_qemu
@needs_root
def test_lab_dirty_ring_migration_is_exact_and_counted(ring_run):
    p, s = ring_run
    b = read_bundle(p)
    assert s["migration"]["status"] == "completed" and s["dirty_ring"] == RING
    assert b.meta["memcheck"]["lost_writes"] == 0 and s["dst_health"]["ok"]
    cc = s["crosscheck"]["ioctls"]
    reaps = [int(m) for m in (re.match(r"reaped (\d+) pages", x).group(1) for x in _trace_lines(p, "kvm_dirty_ring_reap"))]
    # QEMU resets the rings exactly when a reap collected something.
    assert cc["RESET_DIRTY_RINGS"] == sum(1 for n in reaps if n) > 0
    assert cc["GET_DIRTY_LOG"] == 0 and cc["CLEAR_DIRTY_LOG"] == 0


@needs_kvm
@needs_qemu
@needs_bpf
@needs_probe
def test_lab_dirty_ring_probe_sees_the_known_dirty_set(ring_run):
    p, s = ring_run
    b = read_bundle(p)
    io = b.table("ioctls")
    assert (io["name"] == "RESET_DIRTY_RINGS").sum() == s["crosscheck"]["ioctls"]["RESET_DIRTY_RINGS"]
    rp = b.table("ring_push")
    assert len(rp) and (rp["dirty_index"].astype(np.int64) - rp["reset_index"].astype(np.int64)).max() <= RING
    base = _slot_gpa(b)
    gpa = np.array([base.get(int(x), -1 << 40) for x in rp["slot"]], dtype=np.int64)
    gfns = {int(g) for g in (gpa >> 12) + rp["offset"].to_numpy().astype(np.int64)}
    missing = _target_gfns(b) - gfns
    assert not missing, f"{len(missing)} dirtier pages never pushed, e.g. {sorted(missing)[:5]}"
    assert not _unexpected(b, gfns), f"pushed pages the guest never wrote: {sorted(_unexpected(b, gfns))[:5]}"


@needs_kvm
@needs_qemu
def test_lab_cli_reports_a_bad_page_spec_in_one_line(tmp_path):
    r = subprocess.run([str(Path(__file__).parents[1] / ".venv/bin/python"), "-m", "hintscope", "lab", "migrate",
                        "--pages", "0x10-0x20", "-o", str(tmp_path / "b")], capture_output=True, text=True,
                       cwd=Path(__file__).parents[1])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--pages" in r.stderr


# --------------------------------------------------------------------------------------------
# long real-lab runs (HINTSCOPE_LAB=1)

QEMU10 = "/opt/hintscope/qemu-bpo/usr/bin/qemu-system-x86_64"
MANY_SYNCS = dict(accel="tcg", probe="off", fill_mb=4, bandwidth_mb=32, downtime_ms=1, pages="0x400-0x4ff")


@lab
@needs_qemu
def test_lab_memcheck_catches_qemu72_tcg_lost_writes(tmp_path):
    """QEMU 7.2 under TCG (1 vCPU) loses guest writes once a migration syncs more than twice.

    The memcheck must see them, and the dirtier's sequence stamps must show the destination
    holding an older write of the same page (not garbage)."""
    from hintscope.lab.dirtier import make_sample
    from hintscope.lab.qemu import qemu_version

    if "version 7.2" not in qemu_version("/usr/bin/qemu-system-x86_64"):
        pytest.skip("needs Debian's QEMU 7.2 at /usr/bin")
    s = make_sample(tmp_path / "b", qemu="/usr/bin/qemu-system-x86_64", **MANY_SYNCS)
    assert s["migration"]["ram"]["dirty-sync-count"] > 2
    lp = read_bundle(tmp_path / "b").table("lost_pages")
    assert s["memcheck"]["lost_writes"] > 0
    target = lp[(lp["gfn"] >= 0x400) & (lp["gfn"] <= 0x4FF)]
    assert len(target) and (target["dst_seq"] < target["src_seq"]).all() and (target["dst_seq"] > 0).all()


@lab
@pytest.mark.skipif(not Path(QEMU10).exists(), reason=f"needs QEMU 10 at {QEMU10}")
def test_lab_qemu10_tcg_keeps_every_write(tmp_path):
    from hintscope.lab.dirtier import make_sample

    s = make_sample(tmp_path / "b", qemu=QEMU10, **MANY_SYNCS)
    assert s["migration"]["ram"]["dirty-sync-count"] > 2
    assert s["memcheck"]["lost_writes"] == 0 and s["memcheck"]["pages_differing"] == 0
    assert s["dst_health"]["ok"]
