"""Simulator-only tables: the ground truth a real capture never has."""

from hintscope.schema import Col, Table, register

AREA = "simulator"

GROUND_TRUTH = register(Table(
    "ground_truth",
    "The guest pages whose simulated destination copy differs from what the source held at VM stop (schema "
    "2.0: only those; a page not listed arrived intact; meta sim.truth holds the totals, `pages` (guest pages) "
    "and `in_use` (pages the guest had allocated at stop)). stale = the destination copy is older (always true "
    "here, kept for readers of 1.x bundles, which list every page); lost = stale and it matters: a hint hid a write made after "
    "the page's last hint (VIRTIO 5.5.6.5.2: the device must keep such writes), or the loss has nothing "
    "to do with hinting (a dirty page the migration thread never sent). A page written before its last "
    "hint may legally be stale.",
    [
        Col("gfn", "uint64", "gfn", "guest page frame number"),
        Col("in_use", "bool", "", "the guest had the page allocated at VM stop"),
        Col("stale", "bool", "", "destination content differs from the source content at VM stop (always true from 2.0)"),
        Col("lost", "bool", "", "stale, and written after its last hint or with no hint involved"),
        Col("reason", "string", "", "'' (not stale), hint (a hint apply came after the page's last write) or "
            "not-hint"),
        Col("cause", "string", "", "rearm-wipe (a KVM_CLEAR_DIRTY_LOG re-armed the page after the write, then a "
            "hint cleared its bit), bmap-cleared (a hint cleared a bit the sync had set), dropped-send, or ''"),
        Col("last_write_ns", "int64", "ns", "host time of the page's last write before stop; -1 never"),
        Col("last_send_ns", "int64", "ns", "host time of the page's last send; -1 never"),
        Col("last_apply_ns", "int64", "ns", "host time of the last hint apply covering the page; -1 never"),
    ],
    clock="host CLOCK_MONOTONIC (simulated)",
    area=AREA,
))
