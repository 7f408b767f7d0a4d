"""Guest probe BPF program, loaded for real on this host.

The host has no kprobes, so the kmem tracepoint half of guest.bpf.c is attached and exercised
against real page allocations; the kprobe half is compiled and run through the verifier
(load only, no attach) with the same headers the guest image uses.
"""

from __future__ import annotations

import ctypes as ct
import os
import re
import threading

import numpy as np
import pytest

from hintscope.bundle import BundleWriter, read_bundle
from hintscope.parse import guest_stream as gsm
from hintscope.parse.guest_stream import parse_streams
from hintscope.probes import guest

pytestmark = pytest.mark.needs_bpf

BL_HELD, BL_RETURNED = 1, 2


def _max_block() -> int:
    with open("/proc/meminfo") as f:
        total_kb = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
    # physical addresses run past MemTotal (holes, the 32-bit gap): leave generous room
    return ((total_kb << 10) + (8 << 30)) >> 22


def _run_probe(tmp_path, state: int, alloc_mb: int = 48):
    """Run the tracepoint half with every 4 MiB block marked `state`, allocate memory, parse the stream."""
    from hintscope.probes.bcc_env import load_bcc

    BPF = load_bcc()
    out = tmp_path / f"stream-{state}.txt"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    loaded = threading.Event()

    def ready(b):
        blocks = b[b"blocks"]
        for k in range(_max_block()):
            blocks[blocks.Key(k)] = blocks.Leaf(1, 2, state, 0)
        loaded.set()
        # fresh pages for this process: every one is an mm_page_alloc into some block
        buf = bytearray(alloc_mb << 20)
        for off in range(0, len(buf), 4096):
            buf[off] = 1
        del buf

    try:
        rc = guest.run(fd, tracepoints_only=True, attached_file=None, stats_interval=0.5, duration=1.5,
                       bpf_class=BPF, ready_cb=ready)
    finally:
        os.close(fd)
    assert rc == 0 and loaded.is_set()
    return parse_streams([(out, "src")])


def test_reuse_filter_reports_allocations_in_returned_blocks(tmp_path):
    gs = _run_probe(tmp_path, BL_RETURNED)
    assert gs.header.get("tracepoints_only") is True
    reuse = gs.tables["guest_reuse"]
    assert len(reuse) > 100, gs.problems
    own = reuse[reuse["tid"] == threading.get_native_id()]
    assert len(own) > 0  # this test's own allocations were seen
    pfn = reuse["pfn"].to_numpy()
    assert ((pfn >> np.uint64(10)) << np.uint64(10) == reuse["block_pfn"].to_numpy()).all()
    # the per-block cap holds in the kernel; the rest is counted in the stats line
    assert reuse.groupby("block_pfn").size().max() <= 64
    stats = gs.tables["guest_reports"]
    stats = stats[stats["word"] == "STATS"]
    assert len(stats) >= 1
    # This host-side stand-in sees every allocation on a shared host: under load the ring may drop
    # events. A drop is never silent: it is a problem, and a bundle records it as lost.
    drops = gsm.ring_drops(gs)
    assert sum(drops.values()) == int(stats.groupby("side")["v0"].max().sum())
    w = BundleWriter(tmp_path / "b", producer="t")
    gsm.write_to_bundle(w, gs)
    w.close("test")
    b = read_bundle(tmp_path / "b")
    assert {k: v for k, v in b.meta["lost"].items() if k.startswith("guest_probe")} == \
        {f"guest_probe_{k}": v for k, v in drops.items()}
    assert (b.meta["sources"]["guest_probe"]["status"] == "partial") == bool(drops or gs.problems)
    assert gs.tables["guest_reports"]["word"].iloc[0] == "ATTACHED"


def test_held_blocks_are_filtered_in_kernel(tmp_path):
    gs = _run_probe(tmp_path, BL_HELD)
    assert len(gs.tables["guest_reuse"]) == 0
    assert len(gs.tables["guest_events"]) == 0


def test_kprobe_half_compiles_and_passes_the_verifier():
    from hintscope.probes.bcc_env import load_bcc

    BPF = load_bcc()
    b = BPF(src_file=guest.BPF_C.encode(), cflags=["-DHS_KPROBES", "-DPAGE_OFFSET_BASE_ADDR=0xffffffff82000000ULL"])
    try:
        fns = {fn for _, _, fn, _, _ in guest.PROBES}
        for fn in sorted(fns):
            f = b.load_func(fn.encode(), BPF.KPROBE)
            assert f.fd >= 0
    finally:
        b.cleanup()


def test_event_layout_matches_the_c_struct():
    # struct hs_event: 4 x u64 then 4 x u32
    assert ct.sizeof(guest.Event) == 48
    src = open(guest.BPF_C).read()
    defined = {int(n): name.lower() for name, n in re.findall(r"#define EV_(\w+)\s+(\d+)", src)}
    assert defined == guest.KINDS == gsm.KINDS


def test_guest_probe_reason_codes_are_the_protocol_ones():
    from hintscope import protocol
    from hintscope.probes import guest
    assert guest.RETURN_REASONS == protocol.RETURN_REASONS
