"""Focus allocator logic against a fake tree (this test is about move logic only).

The fake stands in for MegaContextTree with just the extents the allocator reads;
the real tree is exercised in test_engine.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from megacontext_memory.config import Config
from megacontext_memory.focus import FocusAllocator, WorkingContext, check_invariants
from megacontext_memory.focus.allocator import BudgetError, room

K = 32


class FakeTree:
    def __init__(self, n_tokens: int):
        self.n_tokens = n_tokens
        self.counts = {0: n_tokens}
        level, n = 1, n_tokens // K
        while n:
            self.counts[level] = n
            level, n = level + 1, n // K

    def count(self, level: int) -> int:
        return self.counts.get(level, 0)


def grow(wc, alloc, n, budget):
    tree = FakeTree(n)
    wc.extend(n)
    alloc.fit(wc, tree, budget)
    return tree


def test_budget_holds_and_invariants_after_every_move():
    cfg = Config(working_budget=256, recent_raw=64)
    alloc, wc, rng = FocusAllocator(cfg), WorkingContext(), np.random.default_rng(0)
    n = 0
    for _ in range(300):
        n += int(rng.integers(1, 400))
        tree = grow(wc, alloc, n, cfg.working_budget)
        check_invariants(wc, tree, cfg.working_budget, cfg.recent_raw)
        for _ in range(3):
            scores = rng.normal(0, 1, len(wc.entries))
            before = len(alloc.moved_at)
            moves = alloc.refocus(wc, tree, scores, cfg.working_budget)
            assert len(moves) <= cfg.max_moves
            assert len(alloc.moved_at) >= before
            check_invariants(wc, tree, cfg.working_budget, cfg.recent_raw)
    assert n > 32 * 32 * 32  # the history grew past an L3 node while the budget held
    assert max(e.level for e in wc.entries) >= 2


def test_high_score_gist_is_expanded_and_low_scored_detail_pays_for_it():
    cfg = Config(working_budget=256, recent_raw=64)
    alloc, wc = FocusAllocator(cfg), WorkingContext()
    tree = grow(wc, alloc, 5000, cfg.working_budget)
    target = next(i for i, e in enumerate(wc.entries) if e.level == 1)
    node = wc.entries[target]
    scores = np.full(len(wc.entries), -0.5)
    scores[target] = 2.0
    moves = alloc.refocus(wc, tree, scores, cfg.working_budget)
    assert any(m.kind == "expand" and (m.level, m.index) == (1, node.index) for m in moves)
    assert any(e.level == 0 and e.start == node.start for e in wc.entries)
    check_invariants(wc, tree, cfg.working_budget, cfg.recent_raw)


def test_cooldown_blocks_flipping_back():
    cfg = Config(working_budget=256, recent_raw=64, cooldown=2, max_moves=2)
    alloc, wc = FocusAllocator(cfg), WorkingContext()
    tree = grow(wc, alloc, 5000, cfg.working_budget)
    i = next(i for i, e in enumerate(wc.entries) if e.level == 1)
    node = wc.entries[i]
    scores = np.full(len(wc.entries), -0.5)
    scores[i] = 2.0
    alloc.new_event()
    alloc.refocus(wc, tree, scores, cfg.working_budget)
    j = next(j for j, e in enumerate(wc.entries) if e.level == 0 and e.start == node.start)
    scores = np.full(len(wc.entries), 0.5)  # other spans ask for detail
    scores[j] = -5.0  # now the opened block looks worthless: it must not close at once
    for _ in range(3):  # rounds of the same event: the block stays open
        alloc.refocus(wc, tree, scores, cfg.working_budget - 40)
        assert any(e.level == 0 and e.start == node.start for e in wc.entries)
    for _ in range(cfg.cooldown):
        alloc.new_event()
        alloc.refocus(wc, tree, scores, cfg.working_budget - 40)
        assert any(e.level == 0 and e.start == node.start for e in wc.entries)
    alloc.new_event()
    alloc.refocus(wc, tree, scores, cfg.working_budget - 40)
    assert not any(e.level == 0 and e.start == node.start for e in wc.entries)
    for _ in range(cfg.cooldown + 1):  # events with no moves: every cooldown runs out
        alloc.new_event()
    assert alloc.moved_at == {}


def test_over_budget_with_nothing_collapsible_is_a_clear_error():
    cfg = Config(working_budget=128, recent_raw=64)
    alloc, wc = FocusAllocator(cfg), WorkingContext()
    wc.extend(200)
    with pytest.raises(BudgetError, match="nothing more can be collapsed"):
        alloc.fit(wc, FakeTree(200), 60)


@pytest.mark.parametrize("n", [0, 5, 31, 32, 1000, 40000, 1_100_000])
def test_coarse_tiling_is_legal_and_small(n):
    tree = FakeTree(n)
    pinned = [(0, 11), (n // 2, n // 2 + 40)]  # a prompt at the start, a newer one midway
    wc = WorkingContext.coarse(tree, raw_tokens=300, pinned=pinned)
    check_invariants(wc, tree, None, recent_raw=96)
    # the raw tail, the pinned blocks, <= 31 nodes per level on each side of a pin
    assert len(wc) <= 300 + 32 + 32 + 3 * 32 + 2 * 31 * 5
    for lo, hi in pinned:
        assert all(e.level == 0 for e in wc if e.start < hi and lo < e.end)
    if n >= 1000:
        assert wc.entries[0].level == 0 and wc.entries[-1].level == 0


# ---- the budget is there to be used -----------------------------------------------------
def _sparse(cfg, n):
    """A working context over `n` tokens that uses few positions: 128 raw, the rest gists."""
    tree = FakeTree(n)
    return FocusAllocator(cfg), WorkingContext.coarse(tree, 128), tree


def _filled(cfg, n, budget):
    """A working context over `n` tokens after fill rounds on recency-like scores."""
    alloc, wc, tree = _sparse(cfg, n)
    alloc.new_event()
    while alloc.refocus(wc, tree, _recency(wc), budget):
        pass
    for _ in range(cfg.cooldown + 1):  # every move's cooldown runs out
        alloc.new_event()
    return alloc, wc, tree


def _recency(wc):
    """Negative everywhere, higher for newer entries (the heuristic scorer's shape)."""
    return np.array([-2.0 + e.end / wc.n_tokens for e in wc.entries])


def test_free_positions_go_to_the_best_scored_expansions_whatever_their_sign():
    cfg = Config(working_budget=512, recent_raw=64)
    alloc, wc, tree = _sparse(cfg, 20000)
    scores = _recency(wc)
    best = max((e for e in wc if e.level > 0), key=lambda e: e.end)  # the newest gist
    moves = alloc.refocus(wc, tree, scores, cfg.working_budget)
    assert [m.kind for m in moves] == ["expand"] * cfg.max_moves
    assert (moves[0].level, moves[0].index) == (best.level, best.index)
    _, wc, tree = _filled(cfg, 20000, cfg.working_budget)
    assert 0.9 * cfg.working_budget <= len(wc) <= room(cfg.working_budget)
    check_invariants(wc, tree, cfg.working_budget, cfg.recent_raw)


def test_a_negative_score_alone_collapses_nothing():
    cfg = Config(working_budget=512, recent_raw=64)
    alloc, wc, tree = _filled(cfg, 20000, cfg.working_budget)
    alloc.new_event()
    scores = np.full(len(wc.entries), -5.0)  # every span asks for less detail
    assert alloc.refocus(wc, tree, scores, cfg.working_budget) == []
    alloc.new_event()  # and free positions are spent even so
    assert alloc.refocus(wc, tree, scores, cfg.working_budget + 100)[0].kind == "expand"


@pytest.mark.parametrize("margin, swapped", [(0.1, True), (-0.1, False)])
def test_with_no_room_an_expansion_replaces_a_collapse_only_beyond_tau(margin, swapped):
    cfg = Config(working_budget=512, recent_raw=64)
    alloc, wc, tree = _filled(cfg, 20000, cfg.working_budget)
    alloc.new_event()
    scores = _recency(wc) + 2.0  # the cheapest collapse scores about 0
    cheapest = alloc.collapses(wc, tree, scores)[0]
    gist = next(i for i, e in enumerate(wc.entries) if e.level == 1)
    scores[gist] = cheapest.score + cfg.tau_expand + margin
    assert scores[gist] > 0
    moves = alloc.refocus(wc, tree, scores, cfg.working_budget)
    kinds = [(m.kind, m.level, m.index) for m in moves]
    parent = (cheapest.parent.level, cheapest.parent.index)
    assert (kinds == [("collapse", *parent), ("expand", 1, wc.entries[gist].index)]) == swapped
    assert swapped or moves == []


def test_an_expansion_scored_at_or_below_zero_displaces_nothing():
    cfg = Config(working_budget=512, recent_raw=64)
    alloc, wc, tree = _filled(cfg, 20000, cfg.working_budget)
    alloc.new_event()
    scores = _recency(wc)  # negative everywhere
    gist = next(i for i, e in enumerate(wc.entries) if e.level == 1)
    for top in (-0.01, 0.0):  # far above the cheapest collapse, yet asking for no detail
        scores[gist] = top
        assert top - alloc.collapses(wc, tree, scores)[0].score > cfg.tau_expand
        assert alloc.refocus(wc, tree, scores, cfg.working_budget) == []
    scores[gist] = 0.01
    assert [m.kind for m in alloc.refocus(wc, tree, scores, cfg.working_budget)] == [
        "collapse",
        "expand",
    ]


def test_an_event_newly_shows_no_more_than_its_allowance_and_the_next_events_go_on():
    """Many spans ask for detail at once (a new question on a long history): one event
    opens what its allowance holds, the best first; the following events open the rest."""
    cfg = Config(working_budget=1024, recent_raw=64)
    alloc, wc, tree = _filled(cfg, 20000, cfg.working_budget)
    wanted = [e for e in wc.entries if e.level == 1][:8]  # eight old gists, best first
    rank = {(e.start, e.end): r for r, e in enumerate(wanted)}

    def scores():  # a wanted gist shown raw keeps its score
        return np.array([3.0 - 0.1 * rank.get((e.start, e.end), 50) for e in wc.entries])

    closed = []
    for allowance in (100, 100, None):
        before = set(wc.entries)
        alloc.new_event(allowance)
        for _ in range(cfg.refocus_rounds):  # the engine's rounds of one event
            if not alloc.refocus(wc, tree, scores(), cfg.working_budget):
                break
        new = sum(wc.cost(e) for e in wc.entries if e not in before)
        assert new <= alloc.opened <= (allowance or 10**9)
        closed.append([w for w in wanted if w in wc.entries])
        check_invariants(wc, tree, cfg.working_budget, cfg.recent_raw)
    # 100 positions hold three swaps (a raw block, and the gist its collapse shows)
    assert closed == [wanted[3:], wanted[6:], []]


def test_making_room_leaves_slack_for_the_next_tokens():
    cfg = Config(working_budget=512, recent_raw=64)
    alloc, wc, tree = _filled(cfg, 20000, cfg.working_budget)
    tree = grow(wc, alloc, 20000 + 600, 10**6)  # new tokens, not fitted yet
    alloc.new_event()
    alloc.refocus(wc, tree, _recency(wc), cfg.working_budget)
    assert room(cfg.working_budget) - K < len(wc) <= room(cfg.working_budget)
    alloc.new_event()
    tree = grow(wc, alloc, 20000 + 600 + 20, 10**6)  # a few more tokens fit without a move
    assert alloc.refocus(wc, tree, _recency(wc), cfg.working_budget) == []


def test_rounds_without_fill_never_grow_the_context():
    cfg = Config(working_budget=512, recent_raw=64)
    alloc, wc, tree = _sparse(cfg, 20000)
    for _ in range(5):
        alloc.new_event()
        before = len(wc)
        alloc.refocus(wc, tree, np.random.default_rng(0).normal(0, 1, len(wc.entries)), 512, False)
        assert len(wc) <= before


@pytest.mark.parametrize("shown", [0, 1])
def test_gists_the_reader_is_not_shown_cost_nothing_and_the_budget_still_fills(shown):
    """With `shown_levels`, hidden gists still tile the history but take no position, so
    the budget goes to what is shown; moves, cooldown and invariants are as before."""
    cfg = Config(working_budget=256, recent_raw=64)
    alloc, rng = FocusAllocator(cfg), np.random.default_rng(1)
    tree = FakeTree(40_000)
    wc = WorkingContext.coarse(tree, 128, shown_levels=shown)
    assert len(wc) == sum(e.cost for e in wc.entries if e.level <= shown) < 256
    for _ in range(30):
        alloc.new_event()
        alloc.refocus(wc, tree, rng.normal(0, 1, len(wc.entries)), cfg.working_budget)
        check_invariants(wc, tree, cfg.working_budget, cfg.recent_raw)
    assert len(wc) >= 0.9 * room(cfg.working_budget)
    hidden = [e for e in wc.entries if e.level > shown]
    assert hidden and len(wc) == sum(e.cost for e in wc.entries if e.level <= shown)
    assert max(wc.per_level()) <= shown
    shown_keys = [k for k in wc.position_keys(_TokenTree(tree), "v") if k[0] <= shown]
    assert len(shown_keys) == len(wc)


class _TokenTree(FakeTree):
    """A fake tree that also has tokens (for position keys)."""

    def __init__(self, tree: FakeTree):
        self.__dict__.update(tree.__dict__)

    def tokens(self, start: int, end: int) -> np.ndarray:
        return np.arange(start, end) % 1000
