"""The detector's checks: one module per family, each check declaring the evidence it requires.

A check is a function ``fn(facts, run)`` that appends finding rows (``findings.finding``) to
``run.out``.  Its :class:`Check` entry names the evidence kinds it needs (``facts.EVIDENCE``:
syncs, applies, memslots, dirty_log, rearms, hint_times, hint_ids, sends, guest, guest_writes,
memcheck).  ``detector.run`` runs a check only when its evidence is there, records every other
one as "not run" with what it lacked, and derives the verdict from that record: the checks with
``decides_ordering`` must all run for "no unsafe ordering found".

To add a check: write ``fn(facts, run)`` in the module of its family (or a new module here), add a
``Check`` to ``REGISTRY`` below, give its finding kind a severity in ``findings.SEVERITY``, and
describe it in docs/detector.md (the test there lists every registered check).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pandas as pd

from hintscope.analysis.checks import guest  # the live module: its semantics belong to another area, not to the data layer
from oracle_perpage.checks import losses, ordering, rearm, stall


@dataclass
class Run:
    """Per-bundle state the checks share: matched hints, ordering flags, pages a loss check explained."""

    m: pd.DataFrame
    out: list = field(default_factory=list)
    flags: dict = field(default_factory=dict)
    covered: set = field(default_factory=set)
    exposure: pd.DataFrame | None = None


@dataclass(frozen=True)
class Check:
    name: str
    fn: Callable
    requires: tuple[str, ...]
    kinds: tuple[str, ...]
    decides_ordering: bool      # must run for "no unsafe ordering found"
    proves: str                 # one line for docs/detector.md
    needs_mode: tuple[str, ...] = ()    # dirty-log modes where it applies (others: "not needed")


REGISTRY: list[Check] = [
    Check("c-prime-rearm", rearm.rearm_in_apply, ("syncs", "applies", "memslots", "dirty_log", "rearms"),
          ("rearm-in-apply",), True,
          "c' hazard from host data: hinted pages the apply's own KVM_CLEAR_DIRTY_LOG re-armed while they were "
          "harvested dirty and not re-armed since, with the window in which a guest write is lost",
          needs_mode=("manual",)),
    Check("stale-epoch", ordering.stale_epoch, ("syncs", "applies", "memslots", "hint_times"), ("stale-epoch-apply",), True,
          "f.1: a hint made available before a sync's dirty-log fetch and applied after that fetch ended"),
    Check("apply-during-sync", ordering.during_sync, ("syncs", "applies"), ("apply-during-sync",), True,
          "d2: an apply overlapping a sync's fetch-to-AFTER window"),
    Check("apply-when-impossible", ordering.impossible, ("syncs", "applies"), ("apply-when-impossible",), True,
          "d4: an apply after the final sync began, after DONE, or after the migration ended"),
    Check("stale-id", ordering.stale_id, ("syncs", "applies", "memslots", "hint_ids"), ("stale-id-apply",), True,
          "d1: an apply of a hint queued under another cmd id than the one the host held (or under none)"),
    Check("reuse-before-apply", guest.reuse_before_apply, ("applies", "guest"), ("reuse-before-apply",), False,
          "d3: the guest took a hinted block back before the host applied it (a hazard only under manual "
          "protect with the page unarmed, else a note)"),
    Check("id-sequence", guest.id_sequence, ("guest",), ("bad-id-sequence",), False,
          "d5: cmd ids the guest read do not rise by one, a start message with another id, hints with no id"),
    Check("bulk-stall", stall.bulk_stall, ("syncs", "sends"), ("bulk-stall",), False,
          "d6: the migration thread sent nothing for a long gap of the bulk round while hints were applied"),
    Check("lost-writes", losses.lost_writes, ("guest_writes",),
          ("rearm-wipe", "lost-write", "lost-write-not-hint"), False,
          "c and c' confirmed: guest writes to reused hinted pages that no later send carried"),
    Check("host-losses", losses.host_losses, ("dirty_log", "sends"), ("lost-write-not-hint",), False,
          "dirty pages a sync harvested that were never sent afterwards and no hint touched"),
    Check("lab-lost-pages", losses.lab_lost_pages, ("memcheck", "guest_writes"),
          ("rearm-wipe", "lost-write", "lost-write-not-hint"), False,
          "the lab guest's own write log against the destination memory check, page by page"),
    Check("memcheck", losses.memcheck, ("memcheck",), ("lost-write", "lost-write-not-hint"), False,
          "destination pages that differ, classified against hints and guest reuse"),
]
