"""The budget is there to be used: a reply reads a full working context, turn after turn,
on the real engine, tree and store."""

from __future__ import annotations

import pytest

from megacontext_memory import check_invariants
from megacontext_memory.config import BLOCK_SIZE as K
from megacontext_memory.config import Config
from megacontext_memory.demo import FACTS, conversation, dialogue_turns
from megacontext_memory.focus import FocusAllocator, HeuristicScorer, WorkingContext
from megacontext_memory.operations.crashtest import TinyBase, open_tree, tiny_gister

BUDGET = 512
MAX_NEW = 16


def _available(base) -> int:
    """Positions left for the history once the prompt and the reply have theirs."""
    return BUDGET - MAX_NEW - len(base.encode(base.generation_prompt()))


def _shared_prefix(a: list, b: list) -> int:
    """How many leading positions a KV cache of `a` still holds for `b`."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def test_every_reply_reads_a_context_that_uses_90_percent_of_its_positions(engine_factory):
    """History longer than the budget: every reply is prefilled from a working context using
    at least 90% of the positions the prompt and the reply leave (telemetry of the turn)."""
    engine = engine_factory(working_budget=BUDGET, gist_refine_steps=0)
    base, s = engine.base, engine.session("fill")
    for role, text in conversation(base, 2000, FACTS[2], seed=3):
        s.append(role, text)
    questions = [FACTS[2].question, "What did we talk about first?"]
    for question in questions:
        s.append("user", question)
        s.generate(max_new_tokens=MAX_NEW)
    # A session opened afresh starts from a coarse tiling; its first reply fills too.
    reopened = engine_factory(store=engine.store.path, working_budget=BUDGET, gist_refine_steps=0)
    fresh = reopened.session("fill")
    fresh.append("user", "And what else?")
    fresh.generate(max_new_tokens=MAX_NEW)
    for t in s.telemetry + fresh.telemetry:
        assert t.history_tokens > 3 * BUDGET
        assert 0.9 * _available(base) <= t.positions_used <= _available(base), t.to_dict()
    check_invariants(fresh.working_context(), fresh.tree, BUDGET, engine.config.recent_raw)


def test_hidden_levels_cost_no_position_and_are_never_fed(engine_factory):
    """`shown_levels=1`: level-2 gists still tile the history but the reader is shown only
    raw tokens and level-1 gists, and the budget is filled with those."""
    engine = engine_factory(working_budget=BUDGET, gist_refine_steps=0, shown_levels=1)
    base, s = engine.base, engine.session("hidden")
    s.extend(conversation(base, 4000, FACTS[1], seed=5))
    s.append("user", FACTS[1].question)
    s.generate(max_new_tokens=MAX_NEW)
    (t,) = s.telemetry
    assert max(t.entries_per_level) <= 1 and any(e.level >= 2 for e in s.wc)
    assert 0.9 * _available(base) <= t.positions_used <= _available(base), t.to_dict()
    assert len(s.wc.embeddings(s.tree, base)) == len(s.wc) == t.positions_used
    assert t.prefill_tokens + t.reused_positions == len(s.wc) + len(
        base.encode(base.generation_prompt())
    )
    check_invariants(s.working_context(), s.tree, BUDGET, engine.config.recent_raw)


@pytest.mark.parametrize("follow_questions", [True, False], ids=["questions", "recency"])
def test_200_turns_keep_the_budget_the_cooldown_and_the_kv_prefix(base, tmp_path, follow_questions):
    """200 chat turns of held-out dialogue, driven as closely to the budget as possible:
    ingest gists at once, fits the budget and refocuses without filling when a block
    completes; a reply refocuses
    for its budget, fits, and is prefilled from the context's position keys. Real tokens,
    a real tree and store; the gists come from the store tests' tiny GistNet and no reply
    is generated, so the 200 turns take seconds (the allocator reads no gist values).

    A turn without a move prefills only its new tokens. Following each new question moves
    focus on most turns (as it should); with recency alone, what is left is the moves new
    tokens force, and the slack keeps those to under half of the turns.
    """
    budget = 1024
    cfg = Config(working_budget=budget)
    tiny = tiny_gister()
    tiny.base = TinyBase(vocab=len(base.tokenizer))
    tree, wc, alloc = open_tree(tmp_path, "turns", tiny), WorkingContext(), FocusAllocator(cfg)
    scorer = HeuristicScorer(recency_scale=float(cfg.recency_tokens))
    available = budget - MAX_NEW - len(base.encode(base.generation_prompt()))
    last_move, violations, made = {}, [], []

    def watched(move):
        def run(*args, **kwargs):
            m = move(*args, **kwargs)
            check_invariants(wc, tree, None, cfg.recent_raw)
            node = (m.level, m.index)
            kind, tick, cooling = last_move.get(node, (m.kind, 0, False))
            if kind != m.kind and cooling and alloc.tick - tick <= cfg.cooldown:
                violations.append((node, kind, tick, m.kind, alloc.tick))
            # A collapse that makes room starts no cooldown (the node may come back at once).
            last_move[node] = (m.kind, alloc.tick, kwargs.get("cool", True))
            made.append(m)
            return m

        return run

    alloc._expand, alloc._collapse = watched(alloc._expand), watched(alloc._collapse)
    query: list[int] = []

    def ingest(role: str, text: str) -> None:
        nonlocal query
        start = tree.n_tokens
        tree.append(role, text, {}, base.encode(base.render_message(role, text)))
        tree.make_gists()  # at once, so every append can fit and refocus
        query = base.encode(text) if role == "user" and follow_questions else query
        wc.extend(tree.n_tokens)
        if len(wc) > budget:
            alloc.fit(wc, tree, budget - budget // 8)
        if tree.n_tokens // K > start // K:
            alloc.new_event()
            alloc.refocus(wc, tree, scorer.score(wc, tree, query), budget, fill=False)
        check_invariants(wc, tree, budget, cfg.recent_raw)

    turns = dialogue_turns(seed=1)
    ingest("system", "You are a helpful assistant.")
    while tree.n_tokens < 2 * budget:
        ingest(*next(turns))
    previous, prefilled, moved = [], [], []
    for _ in range(200):
        ingest("user", next(text for role, text in turns if role == "user"))
        new_tokens = tree.n_tokens - (previous[-1][1] + 1 if previous else 0)
        alloc.new_event()
        for _ in range(cfg.refocus_rounds):
            if not alloc.refocus(wc, tree, scorer.score(wc, tree, query), available):
                break
        alloc.fit(wc, tree, available)
        check_invariants(wc, tree, available, cfg.recent_raw)
        assert len(wc) >= 0.9 * available
        keys = wc.position_keys(tree, tiny.version)
        prefilled.append(len(keys) - _shared_prefix(previous, keys))
        moved.append(bool(made))  # since the last prefill
        if not moved[-1]:
            assert prefilled[-1] <= new_tokens + K  # the partial tail block is redone
        previous = keys
        made.clear()
        reply = next(text for role, text in turns if role == "assistant")
        ingest("assistant", " ".join(reply.split()[:MAX_NEW]))
    assert not violations
    assert tree.n_tokens > 10 * budget
    if not follow_questions:
        assert sum(moved) < len(moved) // 2, prefilled
