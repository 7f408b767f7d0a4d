"""exposure._any_between (writes inside a per-page interval) against the plain join it replaced."""

from __future__ import annotations

import numpy as np
import pandas as pd

from hintscope.analysis.exposure import _any_between


def test_any_between_equals_the_join():
    rng = np.random.default_rng(1)
    for _ in range(300):
        nw, nq = rng.integers(0, 60), rng.integers(1, 60)
        wg, wt = rng.integers(0, 8, nw), rng.integers(0, 50, nw).astype(float)
        qg, qlo = rng.integers(0, 9, nq), rng.integers(-5, 50, nq).astype(float)
        qhi = qlo + rng.integers(0, 20, nq)
        qlo[rng.random(nq) < 0.1] = np.nan
        got = _any_between(wg, wt, qg, qlo, qhi)
        j = pd.DataFrame({"i": np.arange(nq), "gfn": qg, "lo": qlo, "hi": qhi}).merge(
            pd.DataFrame({"gfn": wg, "t": wt}), on="gfn")
        want = np.zeros(nq, bool)
        want[j[(j["t"] > j["lo"]) & (j["t"] < j["hi"])]["i"].unique()] = True
        assert (got == want).all()
