"""The committed outsider samples: bundles that `hintscope probe host --pid` (default options) and
`hintscope tap` recorded on migrations hintscope did not start (tests/outsider, docs/outsider.md),
with the harness's own destination memory check in files/outsider-result.json.  No root needed:
this is the host-only verdict on real data, in every CI run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hintscope.analysis import detector
from hintscope.bundle import read_bundle

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def _load(name: str):
    p = SAMPLES / name
    return read_bundle(p), json.loads((p / "files" / "outsider-result.json").read_text())


@pytest.mark.parametrize("name", ["outsider-early-reuse-10.0", "outsider-polite-7.2"])
def test_host_only_bundle_gets_the_c_prime_hazard(name):
    b, truth = _load(name)
    assert not b.has("guest_events") and not b.has("lost_pages")      # nothing from the guest
    assert b.meta["sources"]["tap"]["status"] == "captured"
    r = detector.run(b)
    assert r.verdict == "unsafe ordering found"
    c = r.frame[r.frame["kind"] == "rearm-in-apply"]
    assert len(c) == 1 and c.iloc[0]["confidence"] == "hazard" and c.iloc[0]["gfn_count"] > 0
    assert not (r.frame["confidence"] == "confirmed").any()           # host data confirms no loss
    assert r.exit_code("hazard") == 1
    assert r.coverage["send_source"] == "tap" and (r.exposure["sent_after"] >= 0).all()
    # every page the memory check found lost lies in the exposure, and none of them was re-sent
    lost = {int(g) for g in truth["lost_gfns"]}
    assert lost <= set(c.iloc[0]["gfns"])
    assert len(lost) == truth["lost"]
    ordering = {x.name: x.status for x in r.checks if x.decides_ordering}
    assert ordering == {"c-prime-rearm": "ran", "stale-epoch": "ran", "apply-during-sync": "ran",
                        "apply-when-impossible": "ran", "stale-id": "ran"}


def test_early_reuse_lost_writes_and_polite_none():
    _, early = _load("outsider-early-reuse-10.0")
    _, polite = _load("outsider-polite-7.2")
    assert early["lost"] > 0 and polite["lost"] == 0 and polite["writes_after_hint"] == 0
