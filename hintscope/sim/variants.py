"""The simulated designs: QEMU 7.2 as it is, and deviations from it that a detector must tell apart.

Each variant is a set of knobs on the host (QEMU) model and the guest (Linux driver) model.
``safe`` says whether the variant's host design orders hint application correctly against
every sync; ``hint_hazards`` whether the detector should report hint hazards for it (the
shrinker variants are QEMU itself, but guest reuse before apply is a hazard by definition d3).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Knobs:
    # host
    stop_before_sync: bool = True       # BEFORE_BITMAP_SYNC sets STOP (QEMU)
    defer_apply: bool = False           # accepted hints are applied only after the next sync
    flush_before_sync: bool = False     # BEFORE applies everything still queued, then STOP
    block_bulk_on_guest: bool = False   # migration thread waits for the guest's stop message
    check_cmd_id: bool = True           # host applies hints only while START
    resend_drop_prob: float = 0.0       # migration thread drops a dirty page without sending it
    slow_fetch: bool = False            # fetch takes long enough for applies to land inside it
    merge_per_slot: bool = False        # each slot's GET is merged into the bitmap at once
    # guest
    send_cmd_id: bool = True            # start/stop messages carry ids, run stops on id change
    shrink_period_ns: float = 0.0       # mean time between shrinker scans (0 = no pressure)
    shrink_blocks: int = 2              # blocks returned per scan (LIFO)
    targeted_reuse_prob: float = 0.0    # right after a hint add, return that block and reuse it
    apply_latency_ns: int = 30_000      # guest add -> host pop (upper end; the lower end is 10 us)
    hint_alloc_ns: int = 0              # guest time per hinted block (0 = SimConfig default)


@dataclass(frozen=True)
class Variant:
    name: str
    doc: str
    knobs: Knobs = field(default_factory=Knobs)
    safe: bool = True
    hint_hazards: bool = False


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("qemu", "QEMU 7.2 and the Linux 6.1 driver without memory pressure: STOP before each sync, "
            "hints applied only while START."),
    Variant("filter-after-sync", "the host keeps accepted hints and filters them out of the bitmap after the "
            "next sync (a deferred-filter design); the guest shrinker reuses blocks",
            Knobs(defer_apply=True, shrink_period_ns=3e6), safe=False, hint_hazards=True),
    Variant("sync-in-io-handler", "the host does not stop hinting before a sync: the iothread keeps applying "
            "while the migration thread fetches; the guest shrinker reuses blocks",
            Knobs(stop_before_sync=False, slow_fetch=True, merge_per_slot=True, shrink_period_ns=1.5e6,
                  apply_latency_ns=200_000, hint_alloc_ns=400_000), safe=False, hint_hazards=True),
    Variant("flush-before-sync", "BEFORE applies every hint still queued and then stops: all applies precede "
            "the fetch, so the sync captures every later write",
            Knobs(flush_before_sync=True)),
    Variant("blocking-bulk", "the migration thread waits for the guest's hinting run before the bulk round "
            "(QEMU never does this); safe, but the sender stalls",
            Knobs(block_bulk_on_guest=True)),
    Variant("no-cmd-id", "no command ids: the guest's run ignores id changes and the host applies any hint "
            "it pops; the guest shrinker reuses blocks",
            Knobs(send_cmd_id=False, check_cmd_id=False, shrink_period_ns=3e6), safe=False, hint_hazards=True),
    Variant("shrinker-reuse", "QEMU 7.2 with guest memory pressure: the shrinker returns hinted blocks "
            "(LIFO) before the host applied them and the guest reuses them",
            Knobs(shrink_period_ns=2e6, shrink_blocks=3, apply_latency_ns=120_000), hint_hazards=True),
    Variant("clear-on-apply", "QEMU 7.2 with reuse right after each hint add (c'): under manual protect the "
            "apply's KVM_CLEAR_DIRTY_LOG re-arms a page the guest already rewrote",
            Knobs(targeted_reuse_prob=0.5, apply_latency_ns=300_000), hint_hazards=True),
    Variant("resend-bug", "QEMU 7.2 hinting, but the migration thread sometimes clears a dirty bit without "
            "sending the page (a loss with no hint involved)",
            Knobs(resend_drop_prob=0.03), safe=False),
]}


def get(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        from hintscope.errors import HintscopeError
        raise HintscopeError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}") from None


def with_knobs(v: Variant, **kw) -> Variant:
    return replace(v, knobs=replace(v.knobs, **kw))
