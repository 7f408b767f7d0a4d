"""Tables of the hintguest lab: the bare-metal hinting guest's own log and the host facts around it.

The guest tables come from its serial log (lab/guests/hintguest, parsed by hintscope.lab.hintguest);
the host tables from a small bpftrace script on the source QEMU. ``guest_hints`` and ``guest_events``
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

HOST_CLOCK = "host CLOCK_MONOTONIC (ts_ns, bpftrace nsecs)"

HINTGUEST_HOST = register(Table(
    "hintguest_host",
    "Host events on the source QEMU from the lab's bpftrace script. kind: apply (entry of "
    "qemu_guest_free_page_hint: hva, len), apply_ret (its return), sync (memory_global_dirty_log_sync entry; "
    "sync_end in files from older runs), get (KVM_GET_DIRTY_LOG), clear (KVM_CLEAR_DIRTY_LOG: "
    "slot, first_page, num_pages), memslot (KVM_SET_USER_MEMORY_REGION: slot, flags, gpa, size, hva), reset "
    "(KVM_RESET_DIRTY_RINGS), pio (a guest port write seen by kvm:kvm_pio: port, val).",
    [
        Col("ts_ns", "int64", "ns", "host CLOCK_MONOTONIC"),
        Col("tid", "int32", "", "host thread id"),
        Col("kind", "string", "", "apply, apply_ret, sync, sync_end, get, clear, memslot, reset, pio"),
        Col("slot", "int64", "", "memslot field as passed (as_id << 16 | id); -1 if none"),
        Col("a", "int64", "", "apply: hva; clear: first_page; memslot: gpa; pio: port; else -1"),
        Col("b", "int64", "", "apply: len (bytes); clear: num_pages; memslot: size (bytes); pio: value; else -1"),
        Col("c", "int64", "", "memslot: hva; memslot flags in `d`; else -1"),
        Col("d", "int64", "", "memslot: flags; else -1"),
        Col("gfn", "int64", "gfn", "apply/clear: first guest page covered (via the memslot table); -1 unknown"),
        Col("npages", "int64", "count", "apply/clear: pages covered; -1 if none"),
    ],
    clock=HOST_CLOCK,
    area=AREA,
))

HINTGUEST_PAGES = register(Table(
    "hintguest_pages",
    "Pages that differ between the paused source and the paused destination, plus every reuse-written page, "
    "classified against the guest log. cls: hinted-held (in a block hinted and never written since: the host "
    "may skip it, not a loss), lost-reuse-write (the guest wrote it after hinting and the destination lacks "
    "that write), reuse-ok (written after hinting and carried over), kvmclock (only SeaBIOS's kvmclock record "
    "differs: KVM rewrites it on each host, not a loss), lost-other (differs, no hint involved).",
    [
        Col("gfn", "int64", "gfn", "guest page"),
        Col("cls", "string", "", "hinted-held, lost-reuse-write, reuse-ok, kvmclock or lost-other"),
        Col("cmd_id", "int64", "", "cmd id of the latest hint covering the page; -1 if none"),
        Col("write_seq", "int64", "", "sequence of the last reuse write the guest logged for the page; -1 none"),
        Col("src_seq", "int64", "", "sequence stamped in the source page (HG record); -1 if none"),
        Col("dst_seq", "int64", "", "sequence stamped in the destination page; -1 if none"),
        Col("src_magic", "string", "", "record magic on the source page (HGUS, HGRW, HGBG, HGFL) or ''"),
        Col("dst_magic", "string", "", "record magic on the destination page or ''"),
        Col("applied", "bool", "", "a host qemu_guest_free_page_hint call covered the page"),
    ],
    clock="none (state after migration)",
    area=AREA,
))

HINTGUEST_QEMU_TRACE = register(Table(
    "hintguest_qemu_trace",
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
