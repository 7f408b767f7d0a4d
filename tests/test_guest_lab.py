"""Linux guest lab: page-diff classification (fast) and a full TCG migration (HINTSCOPE_LAB=1)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pandas as pd
import pytest

from hintscope.bundle import read_bundle
from hintscope.lab import guest_kernel, image
from hintscope.lab.guest_kernel import GuestKernel
from hintscope.analysis.lost_pages import classify_guest_diffs
from hintscope.lab.linux import LinuxOptions, run_linux, unpacked_qemu_args
from hintscope.parse.guest_stream import parse_streams

# Two blocks hinted in round 1 (pfn 4096, 5120); the shrinker returns 4096 before the switch and a
# page of it is reused; DONE (cmd id 1) arrives at 3000 and returns 5120.
STREAM = """E 0 1000 0 55 1 0 0 0
E 1 1100 0 55 5 2147483649 0 0
E 2 1200 0 55 6 4096 10 2147483649
E 3 1300 0 55 6 5120 10 2147483649
E 4 1400 0 55 2 2 2147483649 0
E 5 1500 1 66 10 0 0 0
E 6 1510 1 66 7 1 2 0
E 7 1520 1 66 9 4096 2 10
E 8 1530 1 66 8 1 2 0
E 9 1600 1 66 12 4100 0 3264
E 10 3000 0 55 4 1 0 0
E 11 3010 0 55 7 18446744073709551615 1 0
E 12 3020 0 55 9 5120 1 10
W 0 900 WPFN 0 9000,9001
"""


def _diff(gfns):
    n = len(gfns)
    return pd.DataFrame({"gfn": np.array(gfns, np.uint64), "src_zero": [False] * n, "dst_zero": [True] * n})


def test_classify_page_diffs(tmp_path):
    p = tmp_path / "s"
    p.write_text(STREAM)
    gs = parse_streams([(p, "src")])
    cls, switch = classify_guest_diffs(_diff([4100, 5200, 9001, 70]), gs.tables)
    assert switch == 3000
    got = dict(zip(cls["gfn"].tolist(), cls["cls"].tolist()))
    assert got == {4100: "hinted-returned", 5200: "hinted-held", 9001: "lost-write", 70: "lost-write"}
    row = cls.set_index("gfn").loc[4100]
    assert (row["hinted_ns"], row["returned_ns"], bool(row["reused"])) == (1200, 1520, True)
    assert cls.set_index("gfn").loc[9001, "writer_page"]
    assert cls.set_index("gfn").loc[5200, "returned_ns"] == -1  # the DONE return is after the switch


KERNEL = GuestKernel(series="6.1", release="6.1.0-57-amd64", package="linux-image-6.1.0-57-amd64",
                     version="6.1.192-3", headers_package="linux-headers-6.1.0-57-amd64", headers_version="6.1.192-3",
                     headers_common="linux-headers-6.1.0-57-common", suite="bookworm")


def test_image_recipe_hash_is_stable_and_cache_lookup_is_safe(tmp_path, monkeypatch):
    monkeypatch.setenv("HINTSCOPE_CACHE", str(tmp_path))
    assert image.image_hash(KERNEL) == image.image_hash(KERNEL)
    assert image.cached_image(KERNEL) is None
    d = image.image_dir(KERNEL)
    d.mkdir(parents=True)
    (d / "build.json").write_text("{broken")
    assert image.cached_image(KERNEL) is None
    (d / "build.json").write_text(json.dumps({"image": "root.ext4"}))
    assert image.cached_image(KERNEL) is None  # no image file
    (d / "root.ext4").write_bytes(b"")
    assert image.cached_image(KERNEL)["path"].endswith("root.ext4")


def test_unpacked_qemu_gets_its_own_firmware(tmp_path):
    usr = tmp_path / "usr"
    (usr / "bin").mkdir(parents=True)
    (usr / "share/qemu").mkdir(parents=True)
    (usr / "lib/x86_64-linux-gnu/qemu").mkdir(parents=True)
    exe = usr / "bin/qemu-system-x86_64"
    exe.write_text("")
    args, env = unpacked_qemu_args(str(exe))
    assert args == ["-L", str(usr / "share/qemu")]
    assert env == {"QEMU_MODULE_DIR": str(usr / "lib/x86_64-linux-gnu/qemu")}
    assert unpacked_qemu_args("/usr/bin/qemu-system-x86_64") == ([], {})


@pytest.mark.lab
@pytest.mark.needs_root
@pytest.mark.needs_qemu
@pytest.mark.parametrize("series", ["6.1", "6.12"])
def test_linux_guest_migration_smp1(tmp_path, series):
    """Boot the Debian guest under TCG, probe it from inside, migrate with hinting, check the copy."""
    if not guest_kernel.candidates(series):
        pytest.skip(f"no {series} guest kernel installed (bash scripts/install-guest-kernel.sh {series})")
    o = LinuxOptions(bundle=tmp_path / "run", hint=True, smp=1, fill_mb=300, health_s=8, probe="off",
                     guest_kernel=series)
    s = asyncio.run(run_linux(o))
    assert s["migration"]["status"] == "completed"
    g = s["guest_result"]
    assert g["hinted_blocks_before_switch"] > 20          # 300 MiB freed -> dozens of 4 MiB blocks
    assert g["done_processed"] and g["returned_blocks"].get("done", 0) >= g["hinted_blocks_before_switch"] - 5
    assert g["cmd_ids"][0] >= 0x80000001 and 1 in g["cmd_ids"]
    assert g["probe_points"]["kprobe:virtqueue_add_inbuf"]["status"] == "attached"
    assert g["probe_points"]["kretprobe:virtio_balloon_cmd_id_received"]["status"] == "attached"
    assert s["dst_health"]["ok"], s["dst_health"]
    assert g["page_diffs"]["total"] == 0                    # one vCPU: QEMU 7.2 carries every write
    b = read_bundle(o.bundle)
    hints = b.table("guest_hints")
    assert len(hints) == g["hinted_blocks"] and (hints["order"] == 10).all()
    assert ((hints["pfn"].to_numpy() % 1024) == 0).all()   # order-10 blocks are 4 MiB aligned
    assert (hints["pfn"].to_numpy() < (o.mem_mb << 8)).all()
    assert len(b.table("qmp")) > 0 and b.meta["sources"]["guest_probe"]["status"] in ("captured", "partial")
    k = guest_kernel.select(series)
    kmeta = b.meta["guest"]["kernel"]
    assert (kmeta["release"], kmeta["package"], kmeta["version"]) == (k.release, k.package, k.version)
    assert kmeta["reported_release"] == k.release          # what the guest's own uname said


def test_guest_payload_scripts_parse(tmp_path):
    """init.sh and workload.py run only inside the guest: at least make sure they parse here."""
    import py_compile
    import subprocess

    from hintscope.lab.linux import GUEST_DIR

    r = subprocess.run(["sh", "-n", str(GUEST_DIR / "init.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    py_compile.compile(str(GUEST_DIR / "workload.py"), doraise=True, cfile=str(tmp_path / "w.pyc"))
    assert "exec /mnt/init.sh" in image.BOOTSTRAP_INIT


@pytest.mark.lab
@pytest.mark.needs_root
@pytest.mark.needs_qemu
def test_linux_guest_anon_burst_returns_hinted_blocks(tmp_path):
    """An anonymous-memory burst during the bulk round's hinting makes the shrinker return blocks early;
    analysis.exposure accounts for each against its apply (QEMU 10.0.2, 2 vCPUs, init_on_alloc=1)."""
    from pathlib import Path

    from hintscope.analysis import exposure

    q10 = "/opt/hintscope/qemu-bpo/usr/bin/qemu-system-x86_64"
    if not Path(q10).exists():
        pytest.skip("QEMU 10.0.2 not unpacked (bash scripts/install-qemu-backports.sh)")
    o = LinuxOptions(bundle=tmp_path / "run", hint=True, smp=2, qemu=q10, health_s=8, burst="anon",
                     burst_at="bulk", init_on_alloc=1)
    s = asyncio.run(run_linux(o))
    assert s["migration"]["status"] == "completed" and s["dst_health"]["ok"], s["dst_health"]
    assert "init_on_alloc=1" in s["kernel_cmdline"]
    b = read_bundle(o.bundle)
    rep = b.table("guest_reports")
    assert set(rep.loc[rep["word"] == "BURST", "v0"]) >= {0, 1, 2, 3}     # armed, trigger, start, end
    r = exposure.run_exposure(b)
    g = s["guest_result"]
    assert r["hinted_blocks"] == g["hinted_blocks"] and r["returned_early"] == g["returned_blocks"].get("shrinker", 0)
    assert r["returned_early"] > 0 and r["shrinker_calls"] >= 1
    assert r["returned_before_apply"] + r["returned_before_apply_maybe"] <= r["returned_early"]
    assert r["written_before_apply"] + r["written_before_apply_maybe"] <= r["reused_pages"]
