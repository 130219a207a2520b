"""HeuristicScorer logic against a fake tree holding only tokens (this test is about the
scorer's bookkeeping; the real tree is exercised in test_engine.py)."""

from __future__ import annotations

import numpy as np
import pytest

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
        # the next round of the same turn reuses the windows; a query of the same terms but
        # another length starts the question elsewhere, so its windows are its own
        assert np.array_equal(incremental.relevance(wc, tree, query), want)
        longer = query * 40
        assert np.array_equal(
            incremental.relevance(wc, tree, longer), HeuristicScorer().relevance(wc, tree, longer)
        )
        hits += int((got > 0).sum())
        got_p, want_p = incremental._presence(tree, query), HeuristicScorer()._presence(tree, query)
        assert all(np.array_equal(a, b) for a, b in zip(got_p, want_p, strict=True))
    assert hits > 0
    # A new query starts over rather than reusing the old terms' presence.
    other = incremental._presence(tree, [1, 2])
    assert np.array_equal(other[0], HeuristicScorer()._presence(tree, [1, 2])[0])


def test_a_token_common_at_a_span_width_is_no_evidence_for_spans_that_wide():
    """The span rule (LensNet's lexical feature): a token in 3% of blocks is in most
    1,024-token spans: it still marks a raw block as relevant, but not an L2 gist; a token
    in one block marks the L2 gist holding it."""
    from megacontext_memory.focus.working_context import Entry

    k, n_blocks = 32, 2048
    tokens = np.random.default_rng(1).integers(100, 5000, n_blocks * k)
    common, rare = 1, 2
    tokens[np.arange(0, n_blocks, 33) * k] = common  # ~3% of blocks
    tokens[40 * k + 5] = rare  # block 40, inside L2 node 1
    tree = TokenTree(tokens)
    tree.n_tokens = len(tokens)
    gists = [Entry.node(2, i, tree.n_tokens) for i in range(n_blocks // k - 1)]
    raw = [Entry.node(0, b, tree.n_tokens) for b in range(n_blocks - k, n_blocks)]
    wc = WorkingContext(gists + raw)
    scorer = HeuristicScorer(neighbour_share=0.0, window_blocks=0)  # the span rule
    only_common = scorer.relevance(wc, tree, [common])
    assert not only_common[: len(gists)].any()  # every L2 span holds it by chance
    block_with_common = len(gists) + [e.start // k % 33 for e in raw].index(0)
    assert only_common[block_with_common] > 0
    both = scorer.relevance(wc, tree, [common, rare])
    assert both[1] > 0 and np.count_nonzero(both[: len(gists)]) == 1


def test_an_entry_scores_as_its_best_window_so_wide_gists_lead_to_the_note():
    """Query tokens written together (here across a block edge) make the 32k-token gist
    holding them the most relevant entry; the same tokens scattered over another gist
    count for one token's share. The span rule cannot tell these two gists apart."""
    from megacontext_memory.focus.working_context import Entry

    k, n_blocks = 32, 4 * 1024
    tokens = np.random.default_rng(2).integers(100, 5000, n_blocks * k)
    query = [1, 2, 3]
    tokens[[100 * k, 400 * k + 7, 800 * k + 20]] = query  # scattered in L3 node 0
    tokens[[1500 * k + 31, 1501 * k, 1501 * k + 1]] = query  # together in L3 node 1
    tree = TokenTree(tokens)
    tree.n_tokens = len(tokens)
    wc = WorkingContext([Entry.node(3, i, tree.n_tokens) for i in range(4)])
    rel = HeuristicScorer(neighbour_share=0.0).relevance(wc, tree, query)
    assert rel[1] == pytest.approx(1.0) and rel[0] == pytest.approx(1 / 3)
    assert not rel[2:].any()
    span = HeuristicScorer(neighbour_share=0.0, window_blocks=0).relevance(wc, tree, query)
    assert span[0] == span[1]
    # Per block, the share of the query in it and the next block (LensNet's labels use it).
    per_block = HeuristicScorer().window_matches(tree, query)
    assert per_block.shape == (n_blocks,)
    assert per_block[1500] == pytest.approx(1.0) and per_block[1501] == pytest.approx(2 / 3)
    assert per_block[[99, 100, 399, 400]] == pytest.approx([1 / 3] * 4)
    assert np.count_nonzero(per_block) == 9


def _asked_at_the_end(tokens: np.ndarray, question: list[int]):
    """A tree of `tokens` with `question` as its newest tokens (in the last block), and a
    working context of every block raw."""
    from megacontext_memory.focus.working_context import Entry

    tokens[-32 : -32 + len(question)] = question
    tree = TokenTree(tokens)
    tree.n_tokens = len(tokens)
    return tree, WorkingContext([Entry.node(0, b, tree.n_tokens) for b in range(len(tokens) // 32)])


def test_a_note_that_lacks_the_asked_name_is_a_look_alike_and_scores_below_filler():
    """Three notes share a template; the question names one (token 1). The siblings hold
    the template tokens but another name: the answer note ranks first and the siblings
    below unrelated filler, so the focus keeps them as gists. A window that shares one
    word of the question is no look-alike, nor is the tail of the answer note itself (its
    window overlaps the note's), nor does the question (the newest tokens) make every
    note a look-alike."""
    k, n_blocks = 32, 512
    tokens = np.random.default_rng(3).integers(100, 5000, n_blocks * k)
    name, other, template = 1, 2, [3, 4, 5]
    tokens[100 * k + 30 : 100 * k + 34] = template + [name]  # straddles blocks 100 and 101
    tokens[102 * k + 10] = name  # the note goes on: block 102's windows hold only the name
    tokens[200 * k + 3 : 200 * k + 7] = template + [other]  # a sibling
    tokens[300 * k + 3 : 300 * k + 7] = template + [other + 1]  # another
    tokens[400 * k + 5] = template[0]  # filler sharing one word of the question
    question = template + [name]
    tree, wc = _asked_at_the_end(tokens, question)
    rel = HeuristicScorer(neighbour_share=0.0).relevance(wc, tree, question)
    assert rel[100] == pytest.approx(1.0) and rel[101] > 0 and rel[102] > 0
    assert rel[200] < 0 and rel[300] < 0 and rel[199] < 0  # (199's window reaches 200)
    assert rel[400] > 0 and rel[50] == 0
    assert rel.argmax() in (100, n_blocks - 2, n_blocks - 1)
    plain = HeuristicScorer(neighbour_share=0.0, lookalike_share=1.0).relevance(wc, tree, question)
    assert plain[200] > 0 and plain[300] > 0  # without the rule, siblings are relevant


def test_the_tail_of_the_answer_note_is_no_look_alike_of_an_older_note():
    """An update states the asked-about fact again across a block edge; an older note far
    before it holds every query token too. The window starting in the update's second block
    holds half the question, like a sibling would, but the window before it holds the whole
    update: the tail is part of the answer, not a rival, while a real sibling still is."""
    k, n_blocks = 32, 512
    tokens = np.random.default_rng(5).integers(100, 5000, n_blocks * k)
    name, other, template = 1, 2, [3, 4, 5]
    tokens[100 * k + 3 : 100 * k + 7] = template + [name]  # the older note
    tokens[300 * k + 30 : 300 * k + 34] = [name, 3, 4, 5]  # the update: blocks 300 and 301
    tokens[400 * k + 3 : 400 * k + 7] = template + [other]  # a sibling
    question = template + [name]
    tree, wc = _asked_at_the_end(tokens, question)
    rel = HeuristicScorer(neighbour_share=0.0).relevance(wc, tree, question)
    assert rel[100] == pytest.approx(1.0) and rel[300] == pytest.approx(1.0)
    assert rel[301] > 0  # holds 3 and 4 and 5: half the question's weight or more
    assert rel[400] < 0


def test_a_relevance_floor_leaves_weak_partial_matches_to_recency():
    """A window matching one word of the question is no match under `relevance_floor`;
    the note, the best match before the question, keeps its relevance although the
    question itself (the newest tokens) holds more of the query than the note does."""
    k, n_blocks = 32, 512
    tokens = np.random.default_rng(4).integers(100, 5000, n_blocks * k)
    name, template = 1, [3, 4, 5]
    tokens[100 * k + 3 : 100 * k + 6] = [3, 4, name]  # the note: three of the four words
    tokens[300 * k + 5] = 3  # filler sharing one word
    question = template + [name]
    tree, wc = _asked_at_the_end(tokens, question)
    plain = HeuristicScorer(neighbour_share=0.0).relevance(wc, tree, question)
    floor = HeuristicScorer(neighbour_share=0.0, relevance_floor=0.8).relevance(wc, tree, question)
    assert plain[300] > 0 and floor[300] == 0
    assert floor[100] == plain[100] > 0.5
    assert np.array_equal(floor > 0, (plain > 0) & (plain >= 0.8 * plain[100]))


def test_an_older_note_matched_as_well_by_a_later_one_is_a_look_alike_of_it():
    """An update states the asked-about fact again: the same query tokens, later (across a
    block edge). With `prefer_latest` the older note turns look-alike and the update keeps
    its relevance, tail included; the question itself (newest) supersedes nothing, nor does
    a weak match repeated later (one word of the question, twice)."""
    k, n_blocks = 32, 512
    tokens = np.random.default_rng(6).integers(100, 5000, n_blocks * k)
    name, other, template = 1, 2, [3, 4, 5]
    tokens[100 * k + 3 : 100 * k + 7] = template + [name]  # the note
    tokens[300 * k + 30 : 300 * k + 34] = [name, 3, 4, 5]  # the update: blocks 300 and 301
    tokens[400 * k + 3 : 400 * k + 7] = template + [other]  # a sibling
    tokens[450 * k + 5] = tokens[470 * k + 5] = 3  # filler sharing one word, twice
    question = template + [name]
    tree, wc = _asked_at_the_end(tokens, question)
    plain = HeuristicScorer(neighbour_share=0.0).relevance(wc, tree, question)
    latest = HeuristicScorer(neighbour_share=0.0, prefer_latest=True).relevance(wc, tree, question)
    assert plain[100] == pytest.approx(1.0) and latest[100] < 0
    assert latest[300] == pytest.approx(1.0) and latest[301] > 0 and latest[400] < 0
    assert latest[450] == plain[450] > 0
