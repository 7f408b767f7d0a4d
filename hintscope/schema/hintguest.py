"""Tables of the hintguest lab: the bare-metal hinting guest's own log and the host facts around it.

The guest tables come from its serial log (lab/guests/hintguest, parsed by hintscope.lab.hintguest_log),
its page records from the memory check's RAM images, its kicks from lab/hintguest_kicks.bt; every other
host fact of a hintguest run comes from the host probe. ``guest_hints`` and ``guest_events``
belong to the Linux guest probe, hence the ``hintguest_`` prefix here.
"""

from hintscope.schema import Col, Table, register

AREA = "hintguest"

TSC = Col("tsc", "uint64", "", "guest TSC when the event happened (rdtsc in the guest)")
GUEST_NS = Col("guest_ns", "int64", "ns", "tsc converted with the guest's PIT calibration, from TSC 0")
ID = Col("cmd_id", "int64", "", "free page hint cmd id the event belongs to; -1 if none")
ROUND = Col("round", "int64", "", "guest hinting round (1 = first cmd id it acted on); -1 if none")
GUEST_CLOCK = "guest TSC (tsc) and guest_ns = tsc / tsc_hz; host alignment via meta['hintguest']['clock']"

HINTGUEST_EVENTS = register(Table(
    "hintguest_events",
    "Every `HG t=... ev=...` line of the hintguest serial log, in log order. Lines that do not parse are "
    "counted in meta['hintguest']['parse_problems'] and left out.",
    [
        TSC, GUEST_NS,
        Col("line", "int64", "", "1-based line number in the serial log"),
        Col("ev", "string", "", "boot, calib, fill, balloon, use, ready, cfg, start, hint, avail, write, kick, "
            "stop, used, used_timeout, bg_stop, done, hb, pool_empty, error"),
        ID,
        Col("gfn", "int64", "gfn", "first page the event is about; -1 if none"),
        Col("npages", "int64", "count", "pages the event covers; -1 if none"),
        Col("seq", "int64", "", "guest write sequence (write: the value stamped; use/hb: the counter)"),
        ROUND,
        Col("phase", "string", "", "write: early (after avail idx, before kick) or late (after kick); else ''"),
        Col("tsc_end", "int64", "", "use/fill: guest TSC when the stamping ended; -1 otherwise"),
    ],
    clock=GUEST_CLOCK,
    area=AREA,
))

HINTGUEST_HINTS = register(Table(
    "hintguest_hints",
    "One row per 4 MiB block the guest made available as a free page hint (a writable descriptor on the "
    "free page virtqueue, after the start message carrying cmd_id).",
    [TSC, GUEST_NS, ID, ROUND,
     Col("gfn", "int64", "gfn", "first page of the block"),
     Col("npages", "int64", "count", "pages in the block (1024)"),
     Col("avail_idx", "int64", "", "avail ring index of the descriptor (free running)")],
    clock=GUEST_CLOCK,
    area=AREA,
))

HINTGUEST_WRITES = register(Table(
    "hintguest_writes",
    "Reuse writes: a page of a hinted block the guest wrote before DONE (behaviours early-reuse and "
    "late-reuse). Each stamps an 'HGRW' record with a global sequence number at the page start.",
    [TSC, GUEST_NS, ID, ROUND,
     Col("gfn", "int64", "gfn", "page written"),
     Col("seq", "int64", "", "sequence number stamped into the page"),
     Col("phase", "string", "", "early (before the kick) or late (after the kick)")],
    clock=GUEST_CLOCK,
    area=AREA,
))

HINTGUEST_KICKS = register(Table(
    "hintguest_kicks",
    "The guest's virtqueue kicks as the host saw them: each write to the balloon's legacy QUEUE_NOTIFY "
    "port (kvm:kvm_pio, rw = write, from the lab's bpftrace file lab/hintguest_kicks.bt). The guest logs "
    "the TSC just before each kick (ev kick/stop), so the two pair in order and give the guest TSC -> "
    "host clock fit (analysis.lost_pages.guest_clock).",
    [
        Col("ts_ns", "int64", "ns", "host CLOCK_MONOTONIC (bpftrace nsecs) of the port write"),
        Col("tid", "int32", "", "host thread id (the vCPU thread)"),
        Col("port", "int64", "", "I/O port written (BAR0 + 16: QUEUE_NOTIFY)"),
        Col("val", "int64", "", "value written: the queue index kicked"),
    ],
    clock="host CLOCK_MONOTONIC (ts_ns)",
    area=AREA,
))

HINTGUEST_PAGES = register(Table(
    "hintguest_pages",
    "The guest's page records in the two RAM images of the memory check, for every page that differs and "
    "every hint-pool page whose source copy holds a reuse-write record (HGRW). Facts only: the analysis "
    "classifies them (analysis.lost_pages.page_classes: hinted-held, lost-reuse-write, reuse-ok, kvmclock, "
    "lost-other). Bundles before 2026-12-04 also hold the lab's own classification columns; they are ignored.",
    [
        Col("gfn", "int64", "gfn", "guest page"),
        Col("src_seq", "int64", "", "sequence stamped in the source page (HG record); -1 if none"),
        Col("dst_seq", "int64", "", "sequence stamped in the destination page; -1 if none"),
        Col("src_magic", "string", "", "record magic on the source page (HGUS, HGRW, HGBG, HGFL) or ''"),
        Col("dst_magic", "string", "", "record magic on the destination page or ''"),
    ],
    clock="none (state after migration)",
    area=AREA,
))

HINTGUEST_QEMU_TRACE = register(Table(
    "hintguest_qemu_trace",
    "Written by lab runs before 2026-12-04 (the committed hintguest samples, which drop the trace log for "
    "size); the analysis reads its sends when a bundle has no other send source. "
    "The source QEMU's own trace log (-trace, log backend), reduced to what the hintguest timeline needs: "
    "kind send (ram_save_page of a page in the hint pool: a non-zero page put on the wire), sync_start / "
    "sync_end (migration_bitmap_sync_*), clear_chunk (migration_bitmap_clear_dirty: the migration thread "
    "clearing a clear_bmap chunk before sending a page in it).",
    [
        Col("ts_ns", "int64", "ns", "host CLOCK_MONOTONIC, mapped from wall_ns through the run's clock anchor"),
        Col("wall_ns", "int64", "ns", "CLOCK_REALTIME as QEMU printed it (microsecond resolution)"),
        Col("tid", "int32", "", "QEMU thread id"),
        Col("kind", "string", "", "send, sync_start, sync_end or clear_chunk"),
        Col("gfn", "int64", "gfn", "send: page sent; clear_chunk: first page of the cleared range; else -1"),
        Col("npages", "int64", "count", "clear_chunk: pages in the range; sync_end: dirty pages; else -1"),
    ],
    clock="host CLOCK_MONOTONIC (ts_ns) from QEMU's wall-clock log (wall_ns kept)",
    area=AREA,
))
