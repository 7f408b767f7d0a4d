"""What QEMU's numbers mean in a given bundle: migration state names and the precopy notifier list.

Two facts depend on the traced QEMU build (docs/probes.md, Limitations):

* ``migrate_state`` rows carry MigrationStatus *enum positions*; QEMU 9.1 inserted
  ``postcopy-recover-setup`` at 7, so ``completed`` is 8 on 7.2 but 9 on 10.0.  Names come from
  ``meta.sources.qemu_uprobes.migration_states`` (written by the probe for the traced binary),
  else from ``meta.vmm.version``, else the 7.2 table is assumed; :class:`StateNames` says which.
* ``precopy_notify`` rows come from ``notifier_with_return_list_notify``, which every
  NotifierWithReturn list goes through (QEMU >= 9 also sends its migration state notifiers that
  way, with numbers that collide with precopy reasons).  Only rows whose list (a0) equals
  ``meta.sources.qemu_uprobes.precopy_list`` are precopy notifications; bundles without that key
  (7.2 captures, simulator) keep every row.

Everything reading these events (analysis, detector, report) goes through this module, so the
numbers are interpreted once.  Meta is hostile input: malformed entries are ignored with a note.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pandas as pd

from hintscope.probes import qemu_uprobes
from hintscope.protocol import FINAL_STATES, STOPPED_STATES  # noqa: F401 (re-exported)

# The VM is stopped (device state saved) or migration is over: no epoch opens, no hint may apply.
MAX_STATES = 64  # the real enum has 14-15 entries; a longer list in meta is not a state table


@dataclass(frozen=True)
class StateNames:
    names: tuple[str, ...]
    basis: str                    # where the table came from (shown in the analysis' completeness)
    problems: tuple[str, ...] = field(default=())
    malformed: bool = False       # meta had a state table that is not one (hostile input)

    def name(self, numbers) -> np.ndarray:
        """State name per number (object array); out-of-range numbers become ``"state N"``."""
        n = np.asarray(numbers).astype(np.int64)
        table = np.asarray(self.names, dtype=object)
        ok = (n >= 0) & (n < len(table))
        out = np.empty(len(n), dtype=object)
        out[ok] = table[n[ok]]
        out[~ok] = [f"state {int(x)}" for x in n[~ok]]
        return out


def _qemu_source(meta: Mapping[str, Any]) -> Mapping[str, Any]:
    src = meta.get("sources") if isinstance(meta, Mapping) else None
    q = src.get("qemu_uprobes") if isinstance(src, Mapping) else None
    return q if isinstance(q, Mapping) else {}


def state_names(meta: Mapping[str, Any]) -> StateNames:
    """The MigrationStatus names by number for the QEMU this bundle traced."""
    probs: list[str] = []
    bad = False
    m = _qemu_source(meta).get("migration_states")
    if m is not None:
        if isinstance(m, list) and 0 < len(m) <= MAX_STATES and all(isinstance(x, str) and x for x in m):
            return StateNames(tuple(" ".join(x.split())[:40] for x in m), "meta sources.qemu_uprobes.migration_states")
        probs.append("meta sources.qemu_uprobes.migration_states is not a list of state names; ignored")
        bad = True
    vmm = meta.get("vmm") if isinstance(meta, Mapping) else None
    version = vmm.get("version") if isinstance(vmm, Mapping) else None
    by_version = qemu_uprobes.migration_states(version) if isinstance(version, str) else None
    if by_version:
        return StateNames(tuple(by_version), f"QEMU version in meta vmm.version ({' '.join(version.split())[:60]})",
                          tuple(probs), bad)
    if isinstance(version, str):
        probs.append(f"meta vmm.version {' '.join(version.split())[:60]!r} is not a QEMU version this analysis "
                     "knows; migration states numbered as in QEMU 7.2 (an assumption)")
    else:
        probs.append("no migration state table or QEMU version in meta; migration states numbered as in QEMU 7.2 "
                     "(an assumption)")
    return StateNames(tuple(qemu_uprobes.MIGRATION_STATES_72),
                      "assumed QEMU 7.2 numbering (no state table or version in meta)", tuple(probs), bad)


def precopy_list(meta: Mapping[str, Any]) -> tuple[int | None, list[str]]:
    """The precopy NotifierWithReturnList address the probe identified, or None (keep every row)."""
    v = _qemu_source(meta).get("precopy_list")
    if v is None:
        return None, []
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < (1 << 64):
        return None, ["meta sources.qemu_uprobes.precopy_list is not an address; precopy_notify rows not filtered"]
    return v, []


def keep_precopy_rows(qe: pd.DataFrame, meta: Mapping[str, Any], problems: list[str]) -> pd.DataFrame:
    """``qe`` without the ``precopy_notify`` rows of other notifier lists (see the module docstring)."""
    lst, probs = precopy_list(meta)
    problems.extend(probs)
    if not len(qe):
        return qe
    if lst is None:
        lists = qe.loc[qe["event"] == "precopy_notify", "a0"].nunique()
        if lists > 1:
            problems.append(f"precopy_notify rows come from {lists} notifier lists and meta names no precopy_list "
                            "(QEMU >= 9 migration-state notifiers?): sync boundaries may include other notifications")
        return qe
    pn = (qe["event"] == "precopy_notify").to_numpy()
    other = pn & (qe["a0"].to_numpy().astype(np.uint64) != np.uint64(lst))
    if not other.any():
        return qe
    if other.sum() == pn.sum():
        problems.append(f"no precopy_notify row is from the precopy list {lst:#x} named in meta; "
                        "sync boundaries from the notifier are unavailable")
    return qe[~other].reset_index(drop=True)


def state_rows(qe: pd.DataFrame, names: StateNames) -> pd.DataFrame:
    """``migrate_state`` uprobe rows as ts_ns, state (name), sorted by time."""
    m = qe[qe["event"] == "migrate_state"].sort_values("ts_ns", kind="stable")
    return pd.DataFrame({"ts_ns": m["ts_ns"].to_numpy(np.int64), "state": names.name(m["a2"].to_numpy())})
