"""Migration-stream tap tables: the RAM section of QEMU's migration stream, range-compressed."""

from hintscope.schema import Col, Table, register

AREA = "migration-stream tap"

PAGE_SENDS = register(Table(
    "page_sends",
    "What QEMU's migration stream carried for guest RAM, decoded by `hintscope tap` from the bytes it forwarded "
    "(docs/tap.md). One row per run: consecutive records in the stream of one RAMBlock, one kind, contiguous "
    "offsets, one RAM section part and one scan pass. Rows with `sent` true are page sends (kind page, zero or "
    "xbzrle); the other rows are markers: `mem-size` (one per block of the setup block list; npages = the "
    "block's size in pages, nothing sent), `eos` (end of a RAM section part, npages 0) and `multifd-flush`. "
    "Times are when the tap read the bytes from the source's socket: an upper bound on when QEMU read the page "
    "from guest memory (QEMU reads a page, then writes it to the socket, then the tap reads it).",
    [
        Col("ts_ns", "int64", "ns", "host CLOCK_MONOTONIC (time.monotonic_ns()) when the tap read the bytes "
            "completing the run's first record"),
        Col("ts_end_ns", "int64", "ns", "the same for the run's last record"),
        Col("block", "string", "", "RAMBlock idstr (e.g. pc.ram, /rom@etc/acpi/tables); empty for eos and "
            "multifd-flush"),
        Col("offset", "uint64", "bytes", "page-aligned start of the run within the block (ram_addr offset, not a GPA)"),
        Col("npages", "int64", "count", "records (target pages) in the run; block pages for mem-size; 0 for markers"),
        Col("kind", "string", "", "page (RAM_SAVE_FLAG_PAGE, full page data), zero (RAM_SAVE_FLAG_ZERO), xbzrle "
            "(RAM_SAVE_FLAG_XBZRLE delta), mem-size, eos, multifd-flush"),
        Col("sent", "bool", "", "true for page sends (page, zero, xbzrle)"),
        Col("stream_pos", "uint64", "bytes", "offset in the source-to-destination stream of the run's first record"),
        Col("stream_end", "uint64", "bytes", "offset just past the run's last record"),
        Col("section", "int64", "", "RAM section part in stream order: 0 = SECTION_START (setup), then one per "
            "SECTION_PART, the last = SECTION_END"),
        Col("phase", "string", "", "setup (SECTION_START), iterate (SECTION_PART, guest running), complete "
            "(SECTION_END, the stop-and-copy)"),
        Col("scan_pass", "int64", "", "inferred pass over RAM: 0 is the bulk pass; it increases whenever a page "
            "is not after the previous one in (block list order, offset). Not QEMU's dirty-sync count"),
    ],
    clock="host CLOCK_MONOTONIC (ts_ns, ts_end_ns) when the tap read the bytes; an upper bound on QEMU's page read",
    area=AREA,
))
