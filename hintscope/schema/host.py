"""Host-side tables: KVM dirty-log ioctls, memslots, dirty ring and QEMU uprobes."""

from hintscope.schema import Col, Table, register

AREA = "host probe"

TS = Col("ts_ns", "int64", "ns", "host CLOCK_MONOTONIC time of the event (syscall exit for ioctls)")
TID = Col("tid", "int32", "", "host thread id")
SEQ = Col("seq", "int64", "", "per-capture ioctl sequence number; joins `bitmap_words` and `memslots` to `ioctls`")

IOCTLS = register(Table(
    "ioctls",
    "One row per traced KVM ioctl of the target VMM (GET/CLEAR_DIRTY_LOG, SET_USER_MEMORY_REGION(2), "
    "RESET_DIRTY_RINGS, ENABLE_CAP), recorded at syscall exit.",
    [
        TS,
        Col("enter_ns", "int64", "ns", "syscall entry time"),
        TID,
        SEQ,
        Col("fd", "int32", "", "file descriptor the ioctl was issued on (the VM fd)"),
        Col("cmd", "uint32", "", "ioctl request number"),
        Col("name", "string", "", "GET_DIRTY_LOG, CLEAR_DIRTY_LOG, SET_USER_MEMORY_REGION, SET_USER_MEMORY_REGION2, "
            "RESET_DIRTY_RINGS or ENABLE_CAP"),
        Col("slot", "int32", "", "memslot id as passed (as_id << 16 | id); -1 when not applicable"),
        Col("ret", "int64", "", "syscall return value (negative errno on failure)"),
        Col("first_page", "int64", "gfn offset", "CLEAR_DIRTY_LOG: first page of the range, relative to the slot"),
        Col("num_pages", "int64", "count", "CLEAR_DIRTY_LOG: pages in the range; GET_DIRTY_LOG: pages in the slot "
            "(the bitmap length the probe read), -1 when the probe never saw the slot's SET_USER_MEMORY_REGION"),
        Col("pages", "int64", "count", "pages whose bit was set (GET: harvested dirty; CLEAR: re-armed); "
            "RESET_DIRTY_RINGS: entries reset (the return value); -1 when unknown (failed ioctl, unknown slot size, "
            "bitmap not readable)"),
        Col("cap", "int64", "", "ENABLE_CAP: capability number (168 MANUAL_DIRTY_LOG_PROTECT2, 192 DIRTY_LOG_RING, "
            "223 DIRTY_LOG_RING_ACQ_REL, 225 DIRTY_LOG_RING_WITH_BITMAP); -1 otherwise"),
        Col("arg0", "uint64", "", "ENABLE_CAP: args[0] (ring bytes; manual-protect flags 1 ENABLE | 2 INITIALLY_SET); "
            "0 otherwise"),
    ],
    area=AREA,
))

MEMSLOTS = register(Table(
    "memslots",
    "Memslot changes from KVM_SET_USER_MEMORY_REGION(2). A size of 0 deletes the slot.",
    [
        TS,
        TID,
        SEQ,
        Col("slot", "int32", "", "slot id (low 16 bits)"),
        Col("as_id", "int32", "", "address space id (high 16 bits of the slot field)"),
        Col("flags", "uint32", "", "1 = LOG_DIRTY_PAGES, 2 = READONLY"),
        Col("gpa", "uint64", "gpa", "guest physical start address"),
        Col("size", "uint64", "bytes", "slot size"),
        Col("hva", "uint64", "hva", "host virtual start address in the VMM"),
        Col("ret", "int64", "", "syscall return value"),
    ],
    area=AREA,
))

BITMAP_WORDS = register(Table(
    "bitmap_words",
    "Dirty bitmaps as compact nonzero 64-bit words, runs of identical words in one row. op=get: the bitmap KVM_GET_DIRTY_LOG returned (read from "
    "user memory at syscall exit): bit b of word w set = page w*64+b of the slot was dirty. op=clear: the mask "
    "passed to KVM_CLEAR_DIRTY_LOG (page = first_page + w*64 + b): those pages are re-armed (write-protected "
    "again, their dirty bit cleared). gfn = slot gpa/4096 + page.",
    [
        TS,
        SEQ,
        Col("op", "string", "", "get or clear"),
        Col("slot", "int32", "", "memslot id (as_id << 16 | id)"),
        Col("word", "int64", "", "index of the 64-bit word in the slot bitmap (clear: relative to first_page/64)"),
        Col("mask", "uint64", "", "the 64 dirty bits of that word"),
        Col("nwords", "int64", "count", "the row stands for words word .. word+nwords-1, every one equal to mask "
            "(a fully dirty slot is one row per ioctl); 1 in schema 1.x bundles", since=2, old_default=1),
    ],
    area=AREA,
))

RING_PUSH = register(Table(
    "ring_push",
    "kvm:kvm_dirty_ring_push tracepoint for the target: one page pushed to a vCPU's dirty ring.",
    [
        TS,
        TID,
        Col("vcpu", "int32", "", "ring index (vCPU)"),
        Col("dirty_index", "uint32", "", "ring producer index"),
        Col("reset_index", "uint32", "", "ring reset index"),
        Col("slot", "int32", "", "memslot id (as_id << 16 | id)"),
        Col("offset", "uint64", "pages", "page offset in the slot"),
    ],
    area=AREA,
))

RING_RESET = register(Table(
    "ring_reset",
    "kvm:kvm_dirty_ring_reset tracepoint for the target: a ring's collected entries were reset (re-armed).",
    [
        TS,
        TID,
        Col("vcpu", "int32", "", "ring index (vCPU)"),
        Col("dirty_index", "uint32", "", "ring producer index"),
        Col("reset_index", "uint32", "", "ring reset index after the reset"),
    ],
    area=AREA,
))

QEMU_EVENTS = register(Table(
    "qemu_events",
    "QEMU uprobes on dynamic symbols of the VMM binary (hintscope/probes/qemu_uprobes.py). Events: "
    "hint_apply (qemu_guest_free_page_hint entry, iothread; a0 = HVA, a1 = length in bytes), "
    "hint_apply_ret (its return; no args), "
    "sync_fetch_begin (memory_global_dirty_log_sync entry: the GET_DIRTY_LOG / dirty-ring flush of one sync follows; "
    "no args), sync_fetch_end (memory_global_after_dirty_log_sync entry: the fetched bits are merged; no args), "
    "precopy_notify (notifier_with_return_list_notify, which precopy_notify inlines into; a0 = list address, "
    "a1 = *(int *)data = reason 0 SETUP, 1 BEFORE_BITMAP_SYNC, 2 AFTER_BITMAP_SYNC, 3 COMPLETE, 4 CLEANUP, -1 when "
    "data is NULL, a2 = data pointer; every NotifierWithReturn list goes through this function — QEMU >= 9 sends its "
    "migration state notifiers (MigrationEvent 0 PRECOPY_SETUP, 1 PRECOPY_DONE, 2 PRECOPY_FAILED ...) through it "
    "too — so keep only rows with a0 == meta sources.qemu_uprobes.precopy_list, the list the probe saw notified "
    "with reason 1 right before each sync_fetch_begin), "
    "migrate_state (migrate_set_state; a0 = state pointer, a1 = old, a2 = new MigrationStatus number, which depends "
    "on the QEMU version: 7.2 has 4 active, 8 completed, 9 failed, 12 device; QEMU >= 9.1 inserted "
    "postcopy-recover-setup at 7, so 4 active, 9 completed, 10 failed, 13 device; the probe stores the names by "
    "number in meta sources.qemu_uprobes.migration_states), "
    "notify_config (virtio_notify_config; a0 = VirtIODevice pointer), "
    "vq_pop_cmd and vq_pop_hint (virtqueue_pop return, on the thread that pops: for the free page vq the "
    "balloon's iothread; the element is popped before the device looks at it, so the row comes before the "
    "hint_apply it leads to on the same tid, and exists too for a hint the device then drops as stale). Only "
    "two element shapes are recorded: vq_pop_cmd = one 4-byte out buffer and no in buffer; a0 = VirtQueue "
    "pointer, a1 = the u32 in that buffer as the guest wrote it (little-endian: on the free page vq the "
    "guest's start message carries the cmd id it read, >= 0x80000000, the stop message 0), a2 = 0, ret = 0, "
    "or -14 when the buffer could not be read (a1 = 0 then); vq_pop_hint = one in buffer and no out buffer; "
    "a0 = VirtQueue pointer, a1 = HVA of the buffer, a2 = its length in bytes (4194304 for a Linux guest's "
    "order-10 block). Other virtio devices pop elements of the same shapes (virtio-serial, net rx, rng), so "
    "keep only the free page vq: the a0 whose vq_pop_hint rows are followed on the same tid by a hint_apply "
    "with the same HVA and length (a1 == hint_apply.a0, a2 == hint_apply.a1); when no hint was ever applied "
    "(every hint dropped), the a0 whose vq_pop_cmd values are cmd ids (>= 0x80000000) and 0. The "
    "VirtQueueElement offsets used are in meta sources.qemu_uprobes.vq_element_layout; "
    "page_send (optional, --page-sends: buffer_is_zero(p, 4096), which the RAM save path calls once per page; "
    "a0 = HVA, a1 = 4096; other callers with the same length are not filtered out, use the migration thread's tid).",
    [
        TS,
        TID,
        Col("event", "string", "", "event name (see table description)"),
        Col("a0", "uint64", "", "first argument (per event, see table description)"),
        Col("a1", "uint64", "", "second argument"),
        Col("a2", "uint64", "", "third argument"),
        Col("ret", "int64", "", "return value for *_ret events (0 for hint_apply_ret: the function is void), else 0"),
    ],
    area=AREA,
))
