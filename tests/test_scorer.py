"""HeuristicScorer logic against a fake tree holding only tokens (this test is about the
scorer's bookkeeping; the real tree is exercised in test_engine.py)."""

from __future__ import annotations

import numpy as np

from megacontext_memory.focus import WorkingContext
from megacontext_memory.focus.scorers import HeuristicScorer


class TokenTree:
    def __init__(self, tokens: np.ndarray):
        self._tokens, self.n_tokens = tokens, 0

    def tokens(self, start: int = 0, end: int | None = None) -> np.ndarray:
        return self._tokens[start : self.n_tokens if end is None else end]


def test_incremental_presence_equals_a_fresh_scan():
    rng = np.random.default_rng(0)
    tree = TokenTree(rng.integers(0, 5000, 20_000))  # each term in ~0.6% of blocks
    query = [7, 7, 123, 4999, 6000]  # a repeated term and one that never occurs
    incremental, hits = HeuristicScorer(), 0
    while tree.n_tokens < 20_000:
        tree.n_tokens = min(20_000, tree.n_tokens + int(rng.integers(1, 700)))
        wc = WorkingContext()
        wc.extend(tree.n_tokens)
        got = incremental.relevance(wc, tree, query)
        want = HeuristicScorer().relevance(wc, tree, query)
        assert np.array_equal(got, want)
        hits += int((got > 0).sum())
        got_p, want_p = incremental._presence(tree, query), HeuristicScorer()._presence(tree, query)
        assert all(np.array_equal(a, b) for a, b in zip(got_p, want_p, strict=True))
    assert hits > 0
    # A new query starts over rather than reusing the old terms' presence.
    other = incremental._presence(tree, [1, 2])
    assert np.array_equal(other[0], HeuristicScorer()._presence(tree, [1, 2])[0])
