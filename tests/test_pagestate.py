"""The compact page layer (analysis/pagestate.py): ops, the dense page index, the sweep's order."""

from __future__ import annotations

import numpy as np
import pandas as pd

from hintscope.analysis import harvest, memslots as ms, pagestate as ps

GPA = 1 << 32


def _iv(pages: int, gpa: int = GPA) -> pd.DataFrame:
    ev = pd.DataFrame({"ts_ns": [0], "as_id": [0], "slot": [1], "flags": [1], "gpa": [gpa],
                       "size": [pages * 4096], "hva": [0x7F0000000000]}).astype(np.int64)
    return ms.intervals(ev)


def _words(word, mask, nwords, ts=10) -> pd.DataFrame:
    n = len(word)
    return pd.DataFrame({"ts_ns": np.full(n, ts, np.int64), "seq": np.full(n, 7, np.int64),
                         "op": ["get"] * n, "slot": np.full(n, 1, np.int64), "word": np.asarray(word, np.int64),
                         "mask": np.asarray(mask, np.uint64), "nwords": np.asarray(nwords, np.int64)})


def test_fully_dirty_slot_is_one_op_from_a_run_or_from_words():
    pages = 1 << 20
    iv = _iv(pages)
    gi = ps.GfnIndex.from_intervals(iv)
    run = harvest.word_ops(_words([0], [2**64 - 1], [pages // 64]), "get", iv, gi)
    per_word = harvest.word_ops(_words(np.arange(pages // 64), np.full(pages // 64, 2**64 - 1), np.ones(pages // 64)),
                                "get", iv, gi)
    for ops in (run, per_word):
        assert len(ops) == 1 and ops.pages == pages
        assert gi.to_gfn(ops.g0)[0] == GPA >> 12
    last = ps.last_times(run, gi.size)
    assert (last == 10).all()


def test_partial_words_expand_to_their_bits_only():
    iv = _iv(1 << 12)
    gi = ps.GfnIndex.from_intervals(iv)
    ops = harvest.word_ops(_words([3], [0b1010], [2]), "get", iv, gi)
    assert ops.pages == 4
    got = np.flatnonzero(ps.last_times(ops, gi.size) != ps.NONE)
    assert got.tolist() == [3 * 64 + 1, 3 * 64 + 3, 4 * 64 + 1, 4 * 64 + 3]


def test_sweep_orders_equal_instants_by_priority_and_times_otherwise():
    seen = []
    a = ps.Ops.ranges([5, 5], [0, 1], [1, 1])
    b = ps.Ops.ranges([5, 4], [0, 0], [1, 1])
    ps.sweep([ps.Family("late", a, 2, lambda sel, t, op: seen.append(("late", int(np.min(t))))),
              ps.Family("early", b, 1, lambda sel, t, op: seen.append(("early", int(np.min(t)))), mixes_times=False)])
    assert seen == [("early", 4), ("early", 5), ("late", 5)]


def test_tap_runs_are_cut_at_other_instants():
    run = ps.Ops(np.array([0]), np.array([0]), np.array([11]), np.array([ps.ALL], np.uint64), np.array([0]),
                 np.array([100]), np.array([0]), np.array([11]), np.array([0]))
    cut = ps.split_runs(run, np.array([35, 1000]))
    assert cut.n.tolist() == [4, 7] and cut.t.tolist() == [0, 40]
    ts = [t for _, t, _ in ps.pieces(cut, np.arange(len(cut)))]
    assert np.concatenate([np.atleast_1d(t) for t in ts]).tolist() == list(range(0, 101, 10))


def test_hostile_memslot_size_is_capped_with_a_problem():
    gi = ps.GfnIndex.from_intervals(_iv(ps.MAX_DENSE_PAGES * 4))
    assert gi.size == 0 and gi.capped == ps.MAX_DENSE_PAGES * 4
