"""Lab tables: QMP migration snapshots, the destination memory check, and the guest's known writes."""

from hintscope.schema import Col, Table, register

AREA = "lab"

QMP = register(Table(
    "qmp",
    "One `query-migrate` snapshot of the source QEMU, polled about every 100 ms from `migrate` until a final "
    "state. Counters are QEMU's own (ram section); absent counters are -1.",
    [
        Col("ts_ns", "int64", "ns", "host CLOCK_MONOTONIC time when the reply arrived"),
        Col("wall_ns", "int64", "ns", "host CLOCK_REALTIME time when the reply arrived"),
        Col("status", "string", "", "migration status (setup, active, completed, failed, ...)"),
        Col("total_time", "int64", "ms", "QEMU total-time: milliseconds since migration start"),
        Col("transferred", "int64", "bytes", "ram.transferred"),
        Col("normal", "int64", "count", "ram.normal: full pages sent"),
        Col("duplicate", "int64", "count", "ram.duplicate: zero pages sent as a flag"),
        Col("dirty_sync_count", "int64", "count", "ram.dirty-sync-count: bitmap syncs so far"),
        Col("remaining", "int64", "bytes", "ram.remaining: dirty bytes not yet sent"),
        Col("dirty_pages_rate", "int64", "count", "ram.dirty-pages-rate: pages dirtied per second"),
        Col("raw", "string", "", "the full QMP reply as JSON"),
    ],
    clock="host CLOCK_MONOTONIC (ts_ns); wall_ns kept",
    area=AREA,
))

LOST_PAGES = register(Table(
    "lost_pages",
    "Destination memory check: every guest page whose content differs between the paused source "
    "(postmigrate) and the destination (incoming complete, not yet resumed), except pages where only a "
    "kvmclock record differs (KVM rewrites those on each host; their gfns are in "
    "meta['memcheck']['kvmclock_gfns']). Empty when the copy is exact; meta['memcheck'] holds the totals.",
    [
        Col("gfn", "uint64", "gfn", "guest page frame number (GPA >> 12)"),
        Col("src_hash", "uint64", "", "blake2b-64 of the source page"),
        Col("dst_hash", "uint64", "", "blake2b-64 of the destination page"),
        Col("src_zero", "bool", "", "the source page is all zero"),
        Col("dst_zero", "bool", "", "the destination page is all zero"),
        Col("src_seq", "int64", "", "dirtier write sequence stamped in the source page; -1 if not a dirtier page"),
        Col("dst_seq", "int64", "", "dirtier write sequence stamped in the destination page; -1 if none"),
        Col("classification", "string", "", "lost-write (destination holds other content than the source), "
            "or a refinement by the analysis (e.g. hinted-held)"),
    ],
    clock="none (state after migration)",
    area=AREA,
))

GUEST_TRUTH_PAGES = register(Table(
    "guest_truth_pages",
    "Pages the lab guest is known to write, from its parameters and its own 'ready' line: role 'target' = the "
    "configured dirty set (rewritten continuously), 'image' = the guest's own data/stack pages, 'fill' = pages "
    "written once at boot (before 'ready'). Ranges as [first_gfn, last_gfn].",
    [
        Col("first_gfn", "uint64", "gfn", "first page of the range"),
        Col("last_gfn", "uint64", "gfn", "last page of the range (inclusive)"),
        Col("role", "string", "", "target, image or fill"),
    ],
    clock="none (configuration)",
    area=AREA,
))

RAM_MAP = register(Table(
    "ram_map",
    "Where guest RAM sits in the VMM's address space, asked of QEMU itself (HMP `gpa2hva`) by the lab: "
    "one row per contiguous guest-physical range. Used to translate HVAs (hint applies, page sends) to "
    "GPAs when there are no KVM memslots to trace (TCG).",
    [
        Col("ts_ns", "int64", "ns", "host CLOCK_MONOTONIC time of the query"),
        Col("gpa", "uint64", "gpa", "first guest physical address of the range"),
        Col("size", "uint64", "bytes", "length of the range"),
        Col("hva", "uint64", "hva", "host virtual address of `gpa` in the source QEMU"),
    ],
    area=AREA,
))
