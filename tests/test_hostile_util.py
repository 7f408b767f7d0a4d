"""Shared helpers of the hostile-input tests (no tests here).

The contract every reader must keep on hostile input (docs/reliability.md):
  * either a HintscopeError whose message is one line and names the file, or
  * a result, with every problem noted as one line naming the file;
  * never another exception (a traceback), never a hang, bounded memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, Phase, settings

from hintscope.errors import HintscopeError

# CI keeps the fuzzers short; HINTSCOPE_FUZZ_EXAMPLES=2000 for a long local run.
EXAMPLES = int(os.environ.get("HINTSCOPE_FUZZ_EXAMPLES", "30"))
# Shrinking a failure of these file-writing tests can take minutes: off unless asked for.
_PHASES = tuple(Phase) if os.environ.get("HINTSCOPE_FUZZ_SHRINK") == "1" else \
    (Phase.explicit, Phase.reuse, Phase.generate, Phase.target)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("HINTSCOPE_FUZZ_RANDOM") != "1",
                phases=_PHASES,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large, HealthCheck.large_base_example])

ROOT = Path(__file__).resolve().parents[1]


def one_line(msg: str) -> bool:
    return "\n" not in msg and "\r" not in msg and "Traceback" not in msg


def clean(fn, *names: str):
    """Run ``fn``; a HintscopeError must be one line naming one of ``names``; returns (result, error)."""
    try:
        return fn(), None
    except HintscopeError as e:
        msg = str(e)
        assert one_line(msg), msg
        assert not names or any(n in msg for n in names), f"error does not name the file: {msg}"
        return None, msg


def assert_problems(problems: list[str], *names: str) -> None:
    for p in problems:
        assert isinstance(p, str) and one_line(p), p
        assert not names or any(n in p for n in names), f"problem does not name the file: {p}"


def ioctl_rows(n: int, start: int = 0) -> pd.DataFrame:
    """Valid ``ioctls`` rows with seq start..start+n-1; columns follow the live schema (it still grows)."""
    from hintscope import schema

    seq = np.arange(start, start + n, dtype=np.int64)
    known = {
        "ts_ns": seq * 10 + 1_000, "enter_ns": seq * 10 + 999, "tid": np.full(n, 7), "seq": seq,
        "fd": np.full(n, 11), "cmd": np.full(n, 0x4010AE42), "name": ["GET_DIRTY_LOG"] * n,
        "slot": np.zeros(n), "ret": np.zeros(n), "first_page": np.full(n, -1), "num_pages": np.full(n, -1),
        "pages": seq, "cap": np.full(n, -1), "arg0": np.zeros(n),
    }
    out = {}
    for c in schema.get("ioctls").cols:
        if c.dtype == "string":
            out[c.name] = known.get(c.name, [""] * n)
        else:
            out[c.name] = np.asarray(known.get(c.name, np.zeros(n)), dtype=c.dtype)
    return pd.DataFrame(out)
