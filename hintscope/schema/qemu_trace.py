"""QEMU's own trace log (``-trace events=...,file=...``), parsed into one table.

The numeric columns hold what the event's arguments say; -1 (or "") where the event does not
carry that field.  Addresses fit int64: user-space HVAs are below 2**47 and GPAs below 2**52;
a larger value in a log is malformed input and the line is rejected.
"""

from hintscope.schema import Col, Table, register

AREA = "qemu trace"

QEMU_TRACE = register(Table(
    "qemu_trace",
    "One row per line of the source QEMU's `-trace` log (log backend, `-msg timestamp=on`): "
    "`TID@SEC.USEC:event args`, wall-clock time. Lines QEMU wrote through error_report "
    "(`YYYY-MM-DDTHH:MM:SS.uuuuuuZ qemu-system-x86_64: ...`) become event `message`. Events with parsed "
    "columns: kvm_set_user_memory (slot, as_id, flags, gpa, size, hva, ret), kvm_clear_dirty_log (slot, "
    "first_page, num_pages), migration_bitmap_sync_start, migration_bitmap_sync_end (dirty_pages), "
    "migration_bitmap_clear_dirty (block, offset, size, first_page), migrate_set_state (state), "
    "ram_save_page (block, offset, hva), ram_load_loop (block, offset, flags, hva), kvm_dirty_ring_page "
    "(vcpu, count = ring fetch index, first_page = page offset in the slot), kvm_dirty_ring_reap (count = pages, "
    "size = microseconds), kvm_dirty_ring_flush (count = finished), kvm_dirty_ring_full / "
    "kvm_dirty_ring_reap_vcpu (vcpu). Other events keep only `args`.",
    [
        Col("ts_ns", "int64", "ns", "host CLOCK_MONOTONIC, mapped from wall_ns through the bundle's clock "
            "anchors (-1 when the bundle has none)"),
        Col("wall_ns", "int64", "ns", "CLOCK_REALTIME of the line as QEMU printed it (microsecond resolution)"),
        Col("line", "int64", "", "1-based line number in the log file"),
        Col("tid", "int32", "", "host thread id that logged the event (-1 for `message`)"),
        Col("event", "string", "", "trace event name, or `message`"),
        Col("args", "string", "", "the event's argument text as printed (message text for `message`)"),
        Col("slot", "int32", "", "memslot id (kvm_set_user_memory, kvm_clear_dirty_log); -1 otherwise"),
        Col("as_id", "int32", "", "address space id when printed (QEMU >= 8.2 `AddrSpace#`); 0 when the "
            "event has a slot but QEMU does not print it (7.2); -1 otherwise"),
        Col("flags", "int64", "", "kvm_set_user_memory flags (1 LOG_DIRTY_PAGES, 2 READONLY); ram_load_loop "
            "flags (0x02 ZERO, 0x08 PAGE); -1 otherwise"),
        Col("gpa", "int64", "gpa", "kvm_set_user_memory guest physical start; -1 otherwise"),
        Col("size", "int64", "", "kvm_set_user_memory / migration_bitmap_clear_dirty size in bytes; "
            "kvm_dirty_ring_reap duration in us; -1 otherwise"),
        Col("hva", "int64", "hva", "kvm_set_user_memory ua; ram_save_page / ram_load_loop host pointer "
            "(0 for `(nil)`); -1 otherwise"),
        Col("ret", "int64", "", "kvm_set_user_memory return value; 0 otherwise"),
        Col("first_page", "int64", "pages", "kvm_clear_dirty_log start page (slot-relative); "
            "migration_bitmap_clear_dirty page; kvm_dirty_ring_page offset; -1 otherwise"),
        Col("num_pages", "int64", "count", "kvm_clear_dirty_log number of pages; -1 otherwise"),
        Col("dirty_pages", "int64", "count", "migration_bitmap_sync_end: QEMU's num_dirty_pages_period "
            "(pages newly set in the migration bitmap, summed since the last >= 1 s rate period); -1 otherwise"),
        Col("state", "string", "", "migrate_set_state new state name; '' otherwise"),
        Col("block", "string", "", "RAMBlock id string (ram_save_page, ram_load_loop, "
            "migration_bitmap_clear_dirty); '' otherwise"),
        Col("offset", "int64", "bytes", "offset in the RAMBlock (ram_save_page, ram_load_loop addr, "
            "migration_bitmap_clear_dirty start); -1 otherwise"),
        Col("vcpu", "int32", "", "vCPU index (kvm_dirty_ring_*); -1 otherwise"),
        Col("count", "int64", "count", "kvm_dirty_ring_reap pages, kvm_dirty_ring_page fetch index, "
            "kvm_dirty_ring_flush finished flag; -1 otherwise"),
    ],
    clock="host CLOCK_MONOTONIC (ts_ns) mapped from QEMU's wall clock; wall_ns kept",
    area=AREA,
))
