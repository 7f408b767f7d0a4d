"""Guest-side tables: what the Linux guest's balloon driver did (guest probe stream).

Every row carries ``guest_ns`` (the guest's CLOCK_MONOTONIC = bpf_ktime_get_ns in the guest)
and ``side``: which host file the record arrived in (``src`` or ``dst`` of the migration).  The
guest keeps one clock across the migration, so ``guest_ns`` orders source and destination
records; ``side`` is only where the line landed (a line written just before the switch can land
in the destination file).
"""

from hintscope.schema import Col, Table, register

AREA = "guest probe"
CLOCK = "guest CLOCK_MONOTONIC (guest_ns); map to host time with the analysis offset band"

GNS = Col("guest_ns", "int64", "ns", "guest CLOCK_MONOTONIC (bpf_ktime_get_ns / time.monotonic_ns in the guest)")
SIDE = Col("side", "string", "", "host file the record arrived in: src or dst")
TID = Col("tid", "int32", "", "guest thread id")
PFN = Col("pfn", "uint64", "pfn", "guest page frame number (= gpa >> 12)")

GUEST_EVENTS = register(Table(
    "guest_events",
    "Every guest probe event, decoded from the stream. event: run_enter/run_exit (report_free_page_func; "
    "run_exit a0 = blocks hinted, a1 = start id), config_changed (virtballoon_changed), cmd_id (a0 = id read: "
    "0 STOP, 1 DONE, >= 0x80000000 new round), outbuf (a0 = u32 sent: start id or 0 = stop), hint (a0 = pfn, "
    "a1 = order, a2 = cmd id), return_enter (a0 = n, ULONG_MAX = all; a1 = reason code), return_exit "
    "(a0 = blocks returned, a1 = reason code), block_returned (a0 = pfn, a1 = reason code, a2 = order), "
    "shrinker_enter/shrinker_exit (a0 = freed), reuse (a0 = pfn, a1 = order, a2 = gfp), free_page_report "
    "(a0 = nents), remove, hint_freed (a0 = pfn of a block freed inside a run instead of being queued). "
    "Reason codes: 0 other, 1 done, 2 shrinker, 3 remove.",
    [
        GNS,
        Col("seq", "int64", "", "probe record sequence number (per guest probe process); gaps = lost records"),
        SIDE,
        Col("cpu", "int32", "", "guest CPU"),
        TID,
        Col("event", "string", "", "event name (see table description)"),
        Col("a0", "uint64", "", "first value"),
        Col("a1", "uint64", "", "second value"),
        Col("a2", "uint64", "", "third value"),
    ],
    clock=CLOCK,
    area=AREA,
))

GUEST_HINTS = register(Table(
    "guest_hints",
    "One row per block the guest queued as a free page hint (virtqueue_add_inbuf inside report_free_page_func).",
    [
        GNS, SIDE, TID, PFN,
        Col("order", "int32", "", "block order (10 = 4 MiB)"),
        Col("cmd_id", "uint32", "", "start id of the hinting run the block belongs to"),
        Col("run", "int32", "", "index of the report_free_page_func run (0-based, in guest time order)"),
    ],
    clock=CLOCK,
    area=AREA,
))

GUEST_RETURNS = register(Table(
    "guest_returns",
    "One row per hinted block the balloon gave back to the page allocator (mm_page_free of the block inside "
    "return_free_pages_to_mm).",
    [
        GNS, SIDE, TID, PFN,
        Col("order", "int32", "", "block order"),
        Col("reason", "string", "", "done (host sent DONE), shrinker (memory pressure), remove, other"),
    ],
    clock=CLOCK,
    area=AREA,
))

GUEST_REUSE = register(Table(
    "guest_reuse",
    "Allocations (kmem:mm_page_alloc) that landed in a hinted block after the balloon returned it; filtered in "
    "the kernel, at most REUSE_CAP per block and return (the rest counted in the probe's stats).",
    [
        GNS, SIDE, TID, PFN,
        Col("order", "int32", "", "allocation order"),
        Col("gfp", "uint64", "", "gfp flags of the allocation"),
        Col("block_pfn", "uint64", "pfn", "first pfn of the hinted block"),
        Col("returned_ns", "int64", "ns", "guest time the block was last returned before this allocation; -1 unknown"),
    ],
    clock=CLOCK,
    area=AREA,
))

GUEST_REPORTS = register(Table(
    "guest_reports",
    "Status lines of the guest probe and workload. word: ATTACHED (probe ready), STATS (v0 ringbuf drops, "
    "v1 reuse events suppressed, v2 MemFree KiB), READY (workload filled and freed memory), FILLED (v0 MiB, "
    "v1 ms), BEAT (heartbeat: v0 MemFree KiB, v1 writer passes, v2 lost writes seen), LOSTW (writer page v0 "
    "at pfn v1 did not hold the stamp written last: text = 'expected got'), PRESSURE (v0 MiB allocated).",
    [
        GNS, SIDE,
        Col("seq", "int64", "", "sequence number of the line (per writer)"),
        Col("source", "string", "", "probe or workload"),
        Col("word", "string", "", "what the line reports"),
        Col("v0", "int64", "", "first value (see description); -1 when absent"),
        Col("v1", "int64", "", "second value; -1 when absent"),
        Col("v2", "int64", "", "third value; -1 when absent"),
        Col("text", "string", "", "rest of the line"),
    ],
    clock=CLOCK,
    area=AREA,
))

GUEST_WRITER_PAGES = register(Table(
    "guest_writer_pages",
    "Page frames of the guest workload's stamped writer buffer (from /proc/self/pagemap at start).",
    [
        Col("index", "int32", "", "page index in the writer buffer"),
        PFN,
    ],
    clock="none",
    area=AREA,
))

GUEST_PAGE_DIFFS = register(Table(
    "guest_page_diffs",
    "Pages that differ between the paused source and the paused destination after migration, classified "
    "against the guest stream. cls: hinted-held (inside a block the guest had hinted and still held at the "
    "switchover: expected, the host may skip it), hinted-returned (inside a hinted block the guest took back "
    "before the switchover: a write the hint may have hidden), lost-write (no hint involved).",
    [
        Col("gfn", "uint64", "gfn", "guest frame number (= guest pfn; RAM below 4 GiB maps 1:1)"),
        Col("block_pfn", "uint64", "pfn", "first pfn of the enclosing 4 MiB block"),
        Col("cls", "string", "", "hinted-held, hinted-returned or lost-write"),
        Col("hinted_ns", "int64", "ns", "guest time of the latest hint of the block before the switchover; -1 never"),
        Col("returned_ns", "int64", "ns", "guest time the block was returned after that hint (not by DONE); -1 never"),
        Col("reused", "bool", "", "an allocation landed in the block after that return"),
        Col("writer_page", "bool", "", "the page belongs to the workload's stamped writer buffer"),
        Col("src_zero", "bool", "", "the page is all zero on the source"),
        Col("dst_zero", "bool", "", "the page is all zero on the destination"),
    ],
    clock="none",
    area=AREA,
))
