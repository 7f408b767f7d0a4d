"""A third party's check of hintscope (issue 11, part 4), driven without hintscope.lab.

Each run starts a source and a destination QEMU with plain argv (KVM, the bare-metal hinting guest,
virtio-balloon free-page-hint=on on an iothread), attaches `python -m hintscope probe host --pid`
with its default options, migrates over QMP (through `hintscope tap` when the tree has it), compares
both paused sides' memory page by page, and reads `python -m hintscope analyze --json --fail-on
hazard`. See tests/outsider/ and docs/outsider.md. A run takes 25-35 s at load ~7 on this 2-core
host (most of it SeaBIOS under PVM); each scenario runs once per module and several tests read it.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from tests.conftest import lab, needs_bpf, needs_kvm, needs_qemu, needs_root
from tests.outsider import tools
from tests.outsider.run import Result, Scenario, resent_after_apply, run, run_many
from tests.outsider.vm import BLOCK_PAGES, POOL_BLOCKS, POOL_GFN, qemu_available

pytestmark = [needs_root, needs_kvm, needs_qemu, needs_bpf]

VERSIONS = ["7.2", "10.0.2"]
# the lost-write family: a loss shown by the memory check or the guest's writes
LOSS_KINDS = ("lost-write", "lost-write-not-hint", "rearm-wipe")


def _lab() -> bool:
    return os.environ.get("HINTSCOPE_LAB") == "1"


@functools.cache
def _tap_reason() -> str | None:
    return tools.tap_available()


# The normal suite's runs, booted in a pipeline (each next pair boots while the previous one is
# checked); the HINTSCOPE_LAB=1 extras run one by one when a test asks for them.
NORMAL = [("7.2", "early-reuse", False, 0), ("10.0.2", "early-reuse", False, 0), ("7.2", "polite", False, 0),
          ("7.2", "early-reuse", True, 0), ("7.2", "early-reuse", False, 65536)]


@pytest.fixture(scope="module")
def outsider(tmp_path_factory):
    """get(version, behaviour, stale, dirty_ring, rep) -> the Result of that run (each runs once)."""
    from hintscope.lab.build import build_guest  # only to build the guest image

    kernel = Path(build_guest("hintguest"))
    done: dict[tuple, Result | BaseException] = {}

    def scenario(version, behaviour, stale, dirty_ring) -> Scenario:
        return Scenario(version, behaviour, stale, dirty_ring, tap=_tap_reason() is None)

    def get(version: str = "7.2", behaviour: str = "early-reuse", stale: bool = False, dirty_ring: int = 0,
            rep: int = 0) -> Result:
        if why := qemu_available(version):
            pytest.skip(why)
        key = (version, behaviour, stale, dirty_ring, rep)
        if key not in done:
            if rep == 0 and key[:4] in NORMAL:
                todo = [k for k in NORMAL if (*k, 0) not in done and qemu_available(k[0]) is None]
                jobs = [(scenario(*k), tmp_path_factory.mktemp(scenario(*k).label)) for k in todo]
                for k, (_sc, r) in zip(todo, run_many(jobs, kernel)):
                    done[(*k, 0)] = r
            else:
                sc = scenario(version, behaviour, stale, dirty_ring)
                try:
                    done[key] = run(sc, tmp_path_factory.mktemp(f"{sc.label}-{rep}"), kernel)
                except Exception as e:  # noqa: BLE001 - reported by the test that asked
                    done[key] = e
        r = done[key]
        if isinstance(r, BaseException):
            pytest.fail(f"run {key} failed: {type(r).__name__}: {r}")
        return _sane(r)

    return get


def _sane(r: Result) -> Result:
    """The run did what the scenario says, or nothing else in the test means anything."""
    where = f"{r.scenario.label} ({r.workdir})"
    assert r.migration.get("status") == "completed", where
    assert r.guest["error"] is None, f"{where}: guest error {r.guest['error']}"
    assert r.guest["cmd_ids"] >= 1, f"{where}: the guest never got a cmd id, so it never hinted"
    assert r.probe_exit == 0, f"{where}: probe exit {r.probe_exit}"
    assert r.mem is not None
    assert r.analyze_error is None, f"{where}: {r.analyze_error}"
    if r.scenario.stale:
        # QEMU dropped every hint: nothing may be missing on the destination
        assert r.mem.hinted_held == 0 and not r.mem.lost, f"{where}: {r.mem.summary()}"
    else:
        # the hints took effect: hinted pages the guest left alone were skipped
        assert r.mem.hinted_held > 0, f"{where}: no hinted page was skipped: {r.mem.summary()}"
    if r.scenario.behaviour != "polite":
        assert r.mem.written_after_hint, f"{where}: the guest wrote no hinted page"
    return r


def _confirmed_losses(r: Result) -> list[dict]:
    return [f for f in r.findings if f.get("kind") in LOSS_KINDS and f.get("confidence") == "confirmed"]


def _exposure_covers(r: Result) -> None:
    """The hazard's exposure is hinted pages, and every write the memory check found lost is in it."""
    exposed = r.gfns("rearm-in-apply", "hazard")
    if exposed is None:
        return  # a capped gfn list: only the counts are there to check
    pool = set(range(POOL_GFN, POOL_GFN + POOL_BLOCKS * BLOCK_PAGES))
    assert exposed <= pool, f"exposure outside the hint pool: {sorted(exposed - pool)[:10]}"
    missed = set(r.mem.lost) - exposed
    assert not missed, f"{len(missed)} lost page(s) outside the rearm-in-apply exposure: {sorted(missed)[:10]}"


def _report(r: Result) -> str:
    return f"{r.scenario.label}: {r.row()} findings={[(f.get('kind'), f.get('confidence'), f.get('gfn_count')) for f in r.findings]}"


# ---- early reuse in KVM bitmap mode (manual protect): c' hazard and real losses ---------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_early_reuse_bitmap_loses_writes_and_gets_rearm_in_apply(outsider, version):
    r = outsider(version, "early-reuse")
    assert r.mem.lost, f"no write lost on the destination: {_report(r)}"
    hz = r.by_kind("rearm-in-apply", "hazard")
    assert hz and r.pages("rearm-in-apply", "hazard") > 0, f"no rearm-in-apply hazard: {_report(r)}"
    _exposure_covers(r)
    assert r.verdict == "unsafe ordering found", _report(r)
    assert r.analyze_exit == 1, f"analyze --fail-on hazard exit {r.analyze_exit}: {_report(r)}"


# ---- polite: a latent hazard, nothing lost --------------------------------------------------------
@pytest.mark.parametrize("version", ["7.2", pytest.param("10.0.2", marks=lab)])
def test_polite_bitmap_latent_hazard_no_loss(outsider, version):
    r = outsider(version, "polite")
    assert not r.mem.lost and not r.mem.lost_other, f"pages missing on the destination: {_report(r)}"
    assert r.pages("rearm-in-apply", "hazard") > 0, f"no latent rearm-in-apply hazard: {_report(r)}"
    _exposure_covers(r)
    assert not _confirmed_losses(r), f"a confirmed loss where the memory check found none: {_report(r)}"


# ---- controls: no c' hazard where no apply re-arms anything ----------------------------------------
@pytest.mark.parametrize("version", ["7.2", pytest.param("10.0.2", marks=lab)])
def test_stale_id_guest_gets_no_rearm_in_apply(outsider, version):
    r = outsider(version, "early-reuse", stale=True)
    assert not r.by_kind("rearm-in-apply"), _report(r)


@pytest.mark.parametrize("version", ["7.2", pytest.param("10.0.2", marks=lab)])
def test_dirty_ring_gets_no_rearm_in_apply(outsider, version):
    # This host's PVM dirty ring can drop pages by itself (docs/findings.md section 4): no loss count here.
    r = outsider(version, "early-reuse", dirty_ring=65536)
    assert not r.by_kind("rearm-in-apply"), _report(r)


# ---- with the tap: hinted pages are never sent again after their apply -----------------------------
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("behaviour", ["early-reuse", "polite"])
def test_tap_hinted_pages_not_resent_after_apply(outsider, version, behaviour):
    if behaviour == "polite" and version != "7.2" and not _lab():
        pytest.skip("lab: set HINTSCOPE_LAB=1 for the polite 10.0.2 run")
    if why := _tap_reason():
        pytest.skip(why)
    r = outsider(version, behaviour)
    where = f"{_report(r)} ({r.workdir})"
    assert r.tap_exit == 0, f"tap exit {r.tap_exit}: {(r.workdir / 'tap.log').read_text(errors='replace')[-600:]}; {where}"
    s = resent_after_apply(r)
    counts = {k: (len(v) if isinstance(v, list) else v) for k, v in s.items()}
    assert s["applies"] > 0 and s["send_rows"] > 0, f"{counts}; {where}"
    # the lost writes never went over the wire after the apply: QEMU itself dropped them
    assert not s["lost_resent"], f"lost pages the tap saw sent after their apply: {s['lost_resent'][:10]}; {counts}; {where}"
    assert not s["unexplained"], (f"{len(s['unexplained'])} hinted page(s) sent after their apply with no "
                                  f"write or dirty harvest to explain it: {[hex(g) for g in s['unexplained'][:10]]}; "
                                  f"{counts}; {where}")


# ---- HINTSCOPE_LAB=1: repetitions and late reuse ---------------------------------------------------
@lab
@pytest.mark.parametrize("rep", [1, 2])
@pytest.mark.parametrize("version", VERSIONS)
def test_lab_early_reuse_repeats(outsider, version, rep):
    r = outsider(version, "early-reuse", rep=rep)
    assert r.mem.lost, _report(r)
    assert r.pages("rearm-in-apply", "hazard") > 0, _report(r)
    _exposure_covers(r)
    assert r.verdict == "unsafe ordering found" and r.analyze_exit == 1, _report(r)


@lab
@pytest.mark.parametrize("version", VERSIONS)
def test_lab_late_reuse_rearm_in_apply(outsider, version):
    r = outsider(version, "late-reuse")
    assert r.pages("rearm-in-apply", "hazard") > 0, _report(r)
    assert r.analyze_exit == 1, _report(r)
