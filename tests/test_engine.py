"""The engine end to end on the real default model and real SQLite/payload files."""

from __future__ import annotations

import copy
import hashlib
import json
import threading

import numpy as np
import pytest
import torch

from megacontext_memory import CheckpointMismatch, StoreError, check_invariants
from megacontext_memory import tree as tree_module
from megacontext_memory.demo import FACTS, conversation
from megacontext_memory.models.checkpoint import base_meta, save_gist_stack
from megacontext_memory.models.gistnet import GistStack
from megacontext_memory.models.refine import refine_gists


def _tree_digest(session) -> str:
    h = hashlib.sha256()
    for path in sorted(session.store.dir.iterdir()):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def _find(haystack, needle: list[int]) -> int:
    """Index of the first occurrence of `needle` in `haystack` (token ids)."""
    for i in range(len(haystack) - len(needle) + 1):
        if list(haystack[i : i + len(needle)]) == needle:
            return i
    raise AssertionError(f"{needle} not found")


def test_all_raw_working_context_reproduces_base_logits(engine_factory):
    engine = engine_factory(working_budget=1024)
    s = engine.session("raw")
    s.append("system", "You are a helpful assistant.")
    s.append("user", "The quick brown fox jumps over the lazy dog. " * 8)
    assert all(e.level == 0 for e in s.working_context())
    base = engine.base
    embeds = s.working_context().embeddings(s.tree, base)
    n = len(embeds)
    positions = torch.arange(n)[None]
    with torch.no_grad():
        every = base.model(inputs_embeds=embeds[None], position_ids=positions).logits
        last, _ = base.forward(embeds[None], positions)  # what a reply starts from
        ids = torch.as_tensor(s.tree.tokens())[None]
        ref = base.model(input_ids=ids).logits
    assert n == s.token_count()
    assert (every - ref).abs().max().item() <= 1e-4
    assert last.shape == (1, 1, ref.shape[-1])
    assert (last[0, -1] - ref[0, -1]).abs().max().item() <= 1e-4


def test_close_folds_the_log_into_the_index_and_refuses_later_use(engine_factory, tmp_path):
    path = tmp_path / "closed"
    with engine_factory(store=path) as engine:
        s = engine.session("a")
        s.append("user", "My locker code is 4417.")
        other = threading.Thread(target=engine.sessions)  # a connection in another thread
        other.start()
        other.join()
        assert (path / "index.db-wal").exists()
    # SQLite removes the write-ahead log once the last connection to the index closes.
    assert not (path / "index.db-wal").exists()
    with pytest.raises(StoreError, match="closed"):
        s.append("user", "More.")
    with pytest.raises(StoreError, match="closed"):
        engine.sessions()
    engine.close()  # twice is fine
    again = engine_factory(store=path)
    assert [m.content for m in again.session("a").messages()] == ["My locker code is 4417."]


def test_generate_appends_reply_and_reuses_the_kv_prefix(engine_factory):
    engine = engine_factory()
    s = engine.session("turns")
    s.append("user", "Say hello.")
    first = s.generate(max_new_tokens=8)
    assert isinstance(first, str)
    assert [m.role for m in s.messages()] == ["user", "assistant"]
    assert s.messages()[-1].content == first
    s.append("user", "Again.")
    second = s.generate(max_new_tokens=8)
    t = s.telemetry[-1]
    assert t.reused_positions > 0 and t.prefill_tokens < t.positions_used
    # The same history read fresh from disk (no KV cache) gives the same greedy reply.
    fresh = engine_factory(store=engine.store.path).session("turns")
    hist = fresh.messages()
    assert [m.content for m in hist] == [m.content for m in s.messages()]
    assert second == s.messages()[-1].content


def test_reply_logprobs_read_the_context_the_reply_was_prefilled_from(engine_factory):
    engine = engine_factory()
    scored, plain = engine.session("scored"), engine.session("plain")
    with pytest.raises(RuntimeError, match="generate"):
        scored.reply_logprobs([" 7391."])
    for s in (scored, plain):
        s.append("user", "My storage unit code is 7391. What is my storage unit code?")
    reply = scored.generate(max_new_tokens=6)
    assert plain.generate(max_new_tokens=6) == reply
    base, used = engine.base, scored.telemetry[-1].positions_used
    lead, endings = "Your storage unit code is", [" 7391.", " 1234."]
    got = scored.reply_logprobs(endings, lead)
    # By hand, in one pass without the cache: the context and prompt the reply read.
    context = torch.cat(
        [
            scored.working_context().embeddings(scored.tree, base)[:used],
            base.embed(base.encode(base.generation_prompt()) + base.encode(lead)),
        ]
    )
    for ending, logprob in zip(endings, got, strict=True):
        ids = base.encode(ending)
        embeds = torch.cat([context, base.embed(ids)])
        with torch.no_grad():
            logits = base.model(
                inputs_embeds=embeds[None], position_ids=torch.arange(len(embeds))[None]
            ).logits[0, -len(ids) - 1 : -1]
        want = torch.log_softmax(logits.float(), -1)[torch.arange(len(ids)), ids].sum()
        assert logprob == pytest.approx(float(want), abs=1e-3)
    assert got[0] > got[1]  # the code the history states is the likelier
    with pytest.raises(RuntimeError, match="generate"):  # once per reply
        scored.reply_logprobs(endings, lead)
    # The cache it cut back still serves the next turn: the same reply as never scored.
    for s in (scored, plain):
        s.append("user", "Thanks. And what was the code again?")
    assert scored.generate(max_new_tokens=8) == plain.generate(max_new_tokens=8)


def test_stream_matches_plain_generation(engine_factory):
    engine = engine_factory()
    a, b = engine.session("a"), engine.session("b")
    for s in (a, b):
        s.append("user", "Name three colours.")
    plain = a.generate(max_new_tokens=12)
    pieces = list(b.generate(max_new_tokens=12, stream=True))
    assert len(pieces) > 1 and "".join(pieces) == plain
    assert b.messages()[-1].content == plain


def test_stop_strings_and_sampling(engine_factory):
    engine = engine_factory()
    s = engine.session("stop")
    s.append("user", "Count from one to ten, separated by commas.")
    text = s.generate(max_new_tokens=24, stop=[","])
    assert "," not in text
    s2 = engine.session("sample")
    s2.append("user", "Write a word.")
    x = s2.generate(max_new_tokens=6, temperature=1.0, seed=3)
    assert isinstance(x, str)


def test_sessions_persist_list_and_delete(engine_factory, tmp_path):
    engine = engine_factory(store=tmp_path / "st")
    s = engine.session("user-42")
    s.append("user", "remember me", metadata={"k": [1, 2]})
    other = engine_factory(store=tmp_path / "st")
    assert other.sessions() == ["user-42"]
    msgs = other.session("user-42").messages()
    assert (msgs[0].role, msgs[0].content, msgs[0].metadata) == (
        "user",
        "remember me",
        {"k": [1, 2]},
    )
    assert other.session("user-42").token_count() == s.token_count()
    assert other.delete_session("user-42") is True
    assert other.sessions() == [] and other.delete_session("user-42") is False


def test_a_released_session_reopens_from_the_store_and_the_old_handle_still_works(
    engine_factory,
):
    engine = engine_factory()
    s = engine.session("kept")
    s.append("user", "My locker number is 4417.")
    s.generate(max_new_tokens=4)
    assert engine.release("kept") is True and engine.release("kept") is False
    assert engine.release("never-opened") is False
    again = engine.session("kept")
    assert again is not s and again.token_count() == s.token_count()
    assert [m.content for m in again.messages()] == [m.content for m in s.messages()]
    s.append("user", "And my bike is blue.")  # the released handle, like another process
    again.append("user", "What colour is my bike?")
    assert [m.content for m in again.messages()][-2:] == [
        "And my bike is blue.",
        "What colour is my bike?",
    ]
    assert again.generate(max_new_tokens=4) and engine.session("kept") is again


def test_past_max_open_sessions_the_least_recently_used_idle_one_is_released(engine_factory):
    engine = engine_factory(max_open_sessions=2)
    a, b = engine.session("a"), engine.session("b")
    a.append("user", "Alpha's note.")
    b.append("user", "Beta's note.")
    assert engine.session("a") is a  # asked for again: now b is the least recent
    c = engine.session("c")
    assert engine.session("a") is a and engine.session("c") is c
    assert engine.session("b") is not b  # released, reopened from the store
    assert [m.content for m in engine.session("b").messages()] == ["Beta's note."]
    # a session in use (here: its lock held, as by a turn on another thread) is kept
    busy = engine.session("a")
    engine.session("c")
    with busy._held():
        worker = threading.Thread(target=lambda: engine.session("d"))
        worker.start()
        worker.join()
    assert engine.session("d") is not None and engine.session("a") is busy
    with pytest.raises(ValueError, match="max_open_sessions"):
        engine_factory(max_open_sessions=0)


@pytest.mark.parametrize(
    "role, content, metadata, error",
    [
        ("user", "", None, ValueError),
        ("user", "   \n", None, ValueError),
        ("wizard", "hi", None, ValueError),
        ("user", 42, None, TypeError),
        ("user", None, None, TypeError),
        ("user", "hi", "not a dict", TypeError),
        ("user", "hi", {"x": object()}, ValueError),
        ("user", "word " * 600, None, ValueError),  # longer than the 512 budget
    ],
)
def test_bad_input_is_refused_and_changes_nothing(engine_factory, role, content, metadata, error):
    engine = engine_factory()
    s = engine.session("bad")
    s.append("user", "a message that must survive")
    before = (s.messages(), s.token_count(), _tree_digest(s), len(s.working_context()))
    with pytest.raises(error):
        s.append(role, content, metadata)
    assert (s.messages(), s.token_count(), _tree_digest(s), len(s.working_context())) == before


def test_bad_generate_arguments(engine_factory):
    s = engine_factory().session("gen")
    s.append("user", "hi")
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="max_new_tokens"):
            s.generate(max_new_tokens=bad)
    with pytest.raises(ValueError, match="working budget"):
        s.generate(max_new_tokens=500)
    with pytest.raises(TypeError):
        engine_factory().session(123)


def test_checkpoint_for_another_base_model_is_refused(engine_factory, base, tmp_path):
    meta = base_meta(base, "compact") | {"base_model": "some-other-model", "width": 1024}
    path = save_gist_stack(GistStack(base.width, hidden=96), tmp_path / "other", meta)
    store = tmp_path / "st"
    engine_factory(store=store).session("keep").append("user", "still here")
    with pytest.raises(CheckpointMismatch, match="another base model.*some-other-model"):
        engine_factory(store=store, gist_checkpoint=str(path.with_suffix("")))
    again = engine_factory(store=store).session("keep").messages()
    assert [m.content for m in again] == ["still here"]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_level1_gists_are_refined_when_first_shown_and_the_fit_is_kept(
    engine_factory, tmp_path, monkeypatch
):
    """The store holds GistNet's gists; a level-1 gist is refined in the context of the
    block before it when a working context first shows it, and the fit is kept in the
    store for every later turn and process. Changing the fit re-fits, never re-gists."""
    store = tmp_path / "st"
    # the fit is an option (off by default); the cap is lifted so this turn fits every gist
    fitting = {"working_budget": 256, "gist_refine_steps": 2}
    engine = engine_factory(store=store, gist_refine_per_turn=64, **fitting)
    plain = engine_factory(store=tmp_path / "plain", working_budget=256)
    assert engine.gister.version == plain.gister.version  # the fit is not in the store
    history = conversation(engine.base, 1200)
    s, p = engine.session("s"), plain.session("s")
    for session in (s, p):
        session.extend(history)
        session.make_gists()
    n = s.tree.count(1)
    stored = s.tree.gist_vectors(1, list(range(n)))
    np.testing.assert_allclose(stored, p.tree.gist_vectors(1, list(range(n))), atol=1e-3)
    fit = engine.gister.refine_version
    assert not s.tree.store.refined(list(range(n)), fit)  # nothing refined at ingest

    s.generate(max_new_tokens=4)
    shown = [e.index for e in s.wc if e.level == 1]
    assert len(shown) >= 4
    cached = s.tree.store.refined(list(range(n)), fit)
    assert set(cached) == set(shown) - {0}  # a session's first block has no context
    refined = np.stack([cached[i] for i in sorted(cached)]).astype(np.float32)
    moved = _cosine(refined, stored[sorted(cached)])
    assert moved.max() < 0.9999  # every shown gist was fitted
    # as `refine_gists` makes it from the stored gist, the block before and the block
    blocks = s.tree.tokens(0, n * 32).reshape(-1, 32)
    i = sorted(cached)[0]
    direct = refine_gists(
        engine.base,
        torch.as_tensor(stored[i : i + 1]),
        torch.as_tensor(blocks[i - 1 : i]),
        torch.as_tensor(blocks[i : i + 1]),
        *engine.gister.fit,
    )
    assert _cosine(direct.numpy(), cached[i][None].astype(np.float32))[0] > 0.99
    shown_now = s.tree.shown_gists(1, shown)
    assert np.array_equal(shown_now[shown.index(i)], cached[i])

    def no_refinement(*args):
        raise AssertionError("refined again")

    again = engine_factory(store=store, **fitting).session("s")
    again.tree.gister = copy.copy(again.tree.gister)
    again.tree.gister.refine = no_refinement  # another process reuses the stored fit
    assert np.array_equal(again.tree.shown_gists(1, shown), shown_now)
    # Memory keeps only the most recently shown fits; the rest are read back from the store.
    monkeypatch.setattr(tree_module, "REFINED_KEPT", 2)
    assert np.array_equal(again.tree.shown_gists(1, shown), shown_now)
    assert list(again.tree._refined) == [i for i in shown if i > 0][-2:]
    assert np.array_equal(again.tree.shown_gists(1, shown), shown_now)

    other = engine_factory(store=store, gist_refine_lr=0.02, **fitting)
    t = other.session("s").tree  # the same GistNet: opened without re-gisting
    assert not t.store.refined(shown, other.gister.refine_version)
    assert _cosine(t.shown_gists(1, shown[1:]), shown_now[1:]).min() < 0.9999


def test_a_turn_fits_at_most_gist_refine_per_turn_gists_and_shows_the_rest_plain(
    engine_factory,
):
    """A turn that shows many level-1 gists for the first time fits only the newest
    `gist_refine_per_turn`; the others are shown as GistNet made them, marked in the KV
    keys, and stay so while they stay shown, so no later turn re-prefills for them."""
    engine = engine_factory(working_budget=256, gist_refine_steps=2, gist_refine_per_turn=2)
    s = engine.session("capped")
    s.extend(conversation(engine.base, 1200))
    s.generate(max_new_tokens=2)
    fit = engine.gister.refine_version
    shown = [e.index for e in s.wc if e.level == 1]
    fitted = set(s.tree.store.refined(shown, fit))
    assert len(fitted) == 2 and len(shown) >= 4
    assert s.wc.plain == set(shown) - fitted - {0}
    assert max(s.wc.plain) < min(fitted)  # the newest, nearest the question, are fitted
    vecs, stored = s.tree.shown_gists(1, shown, s.wc.plain), s.tree.gist_vectors(1, shown)
    for row, i in enumerate(shown):
        same = np.array_equal(vecs[row], stored[row])
        assert same == (i not in fitted), i  # plain ones (and block 0) as stored
    keys = s.wc.position_keys(s.tree, "v")
    assert sum(1 for k in keys if k[0] == 1 and k[3]) == len(s.wc.plain)

    plain = set(s.wc.plain)
    for question in ("And then?", "Tell me more about it."):
        s.append("user", question)
        before = set(s.tree.store.refined(list(range(s.tree.count(1))), fit))
        s.generate(max_new_tokens=2)
        now = [e.index for e in s.wc if e.level == 1]
        after = set(s.tree.store.refined(list(range(s.tree.count(1))), fit))
        assert len(after - before) <= 2
        assert plain & set(now) <= s.wc.plain <= set(now)  # plain while shown
        assert not s.wc.plain & after
        plain = set(s.wc.plain)


def test_the_newest_system_prompt_of_each_slot_stays_raw(engine_factory):
    """A changed prompt takes over the pin from the one before it; another slot (the tool
    list) keeps its own."""
    e = engine_factory(working_budget=512, gist_refine_steps=0)
    s = e.session("pins")
    chat = conversation(e.base, 3000)[1:]
    third = len(chat) // 3
    old = s.append("system", "You are Ada. Answer in French.", {"slot": "prompt-0"})
    s.extend(chat[:third])
    tools = s.append("system", "Tools: weather(city), clock().", {"slot": "tools"})
    s.extend(chat[third : 2 * third])
    new = s.append("system", "You are Bob. Answer in German.", {"slot": "prompt-0"})
    s.extend(chat[2 * third :])
    assert s.token_count() > 5 * 512
    levels = s.level_map()
    for m in (new, tools):
        assert (levels[m.token_start : m.token_end] == 0).all(), m.content
    assert levels[old.token_start : old.token_end].min() > 0  # the old prompt may be gisted
    s.generate(max_new_tokens=4)
    levels = s.level_map()
    assert (levels[new.token_start : new.token_end] == 0).all()
    assert [m.content for m in s.messages(role="system")] == [
        old.content,
        tools.content,
        new.content,
    ]


# ---- a long conversation: budget, invariants after every move, recall -------------------
BUDGET = 1024


@pytest.fixture(scope="module")
def long_session(engine_factory):
    """A >= 20k-token held-out conversation with three facts stated near its start.

    The focus and the budget are under test, not the gists: the in-context refinement
    (tested on its own above) is off, so 20k tokens are gisted in seconds."""
    engine = engine_factory(working_budget=BUDGET, gist_refine_steps=0)
    s = engine.session("long")
    checked = {"moves": 0, "appends": 0}
    original = {name: getattr(s.allocator, name) for name in ("_expand", "_collapse")}

    def checked_move(name):
        def move(*args, **kwargs):
            result = original[name](*args, **kwargs)
            check_invariants(s.wc, s.tree, None, engine.config.recent_raw)
            checked["moves"] += 1
            return result

        return move

    for name in original:
        setattr(s.allocator, name, checked_move(name))
    script = conversation(engine.base, 20000, FACTS[0])
    for at, fact in zip((12, 24), FACTS[1:], strict=True):  # more facts, a little later
        script[at:at] = [("user", fact.statement), ("assistant", fact.acknowledgement)]
    for i, (role, text) in enumerate(script):
        if i == len(script) // 2 and role == "assistant":
            s.generate(max_new_tokens=8)
        else:
            s.append(role, text)
        if i % 20 == 0 or i == len(script) - 1:  # gisting and fitting run in batches
            check_invariants(s.working_context(), s.tree, BUDGET, engine.config.recent_raw)
        checked["appends"] += 1
    return s, checked


@pytest.mark.slow
def test_long_conversation_keeps_budget_and_invariants(long_session):
    s, checked = long_session
    assert s.token_count() >= 20000
    assert len(s.working_context()) <= BUDGET
    assert checked["moves"] > 100 and checked["appends"] > 100
    wc = s.working_context()
    assert max(e.level for e in wc) >= 2 and max(wc.per_level()) == 1  # L2 tiles, unshown
    assert s.tree.count(2) >= 19


@pytest.mark.slow
def test_old_facts_are_refocused_to_raw_and_recalled(long_session):
    s, _ = long_session
    base = s.engine.base
    msgs = s.messages()
    spans = {}
    for fact in FACTS:
        stated = next(m for m in msgs if m.content == fact.statement)
        spans[fact] = slice(stated.token_start, stated.token_end)
        assert s.token_count() - stated.token_end > 10000
        assert s.level_map()[spans[fact]].min() >= 1  # collapsed to gists by now
    # Invariant 5: moves change the working context, never the tree on disk.
    digest = _tree_digest(s)
    assert s.refocus(query=base.encode(FACTS[0].question)) > 0
    assert _tree_digest(s) == digest
    recalled = []
    for fact in FACTS:
        s.append("user", fact.question)
        reply = s.generate(max_new_tokens=24)
        at = _find(
            s.tree.tokens(spans[fact].start, spans[fact].stop), base.encode(" " + fact.answer)
        )
        answer_span = slice(spans[fact].start + at, spans[fact].start + at + 2)
        assert s.level_map()[answer_span].max() == 0, f"{fact.answer}: not brought back to raw"
        assert s.telemetry[-1].positions_used <= BUDGET
        recalled.append(fact.answer in reply)
    # Focus is exact (asserted above for every fact); whether a 135M-parameter reader then
    # copies the answer is the model's part: it must for at least two of the three.
    assert sum(recalled) >= 2, recalled
    assert json.loads(json.dumps(s.telemetry[-1].to_dict()))["budget"] == BUDGET


@pytest.mark.parametrize("cap", [None, 66])
def test_a_turn_newly_shows_at_most_open_per_turn_and_the_next_turns_go_on(engine_factory, cap):
    """With a KV cache to reuse, a question's refocus shows at most `open_per_turn` new
    positions (and the prefill computes little more: the new tokens); asked again, the focus
    goes on opening what the question needs, until the fact is raw."""
    engine = engine_factory(working_budget=1024, open_per_turn=cap, gist_refine_steps=0)
    s = engine.session(f"capped-{cap}")
    base, fact = engine.base, FACTS[0]
    s.extend(conversation(base, 12000, fact))
    stated = next(m for m in s.messages() if m.content == fact.statement)
    where = slice(stated.token_start, stated.token_end)
    s.append("user", "Thanks.")
    s.generate(max_new_tokens=4)  # the first turn prefills all anyway: no allowance
    assert s.allocator.allowance == float("inf")
    assert s.level_map()[where].min() >= 1
    opened = []
    for _ in range(3):
        s.append("user", fact.question)
        s.generate(max_new_tokens=4)
        tel = s.telemetry[-1]
        opened.append(s.allocator.opened)
        if cap:
            assert opened[-1] <= s.allocator.allowance == cap
            prompt = len(base.encode(base.generation_prompt()))
            assert tel.prefill_tokens <= cap + tel.new_tokens + prompt
        if s.level_map()[where].max() == 0:
            break
    assert s.level_map()[where].max() == 0  # the statement is shown raw at last
    if cap is None:
        assert opened[0] > 66  # the bound binds: unbounded, the first turn opens more
    else:
        assert len(opened) > 1


def test_the_note_a_question_opened_stays_open_when_new_tokens_need_room(engine_factory):
    """New tokens push the window over budget and some spans must close before the next
    refocus: the ones the newest question needs least, not the oldest (an old note the
    focus had just opened for it was the first to go, and asked again, the focus churned)."""
    engine = engine_factory(gist_refine_steps=0)
    s = engine.session("keeps-the-note")
    fact = FACTS[0]
    s.extend(conversation(engine.base, 6000, fact))
    stated = next(m for m in s.messages() if m.content == fact.statement)
    where = slice(stated.token_start, stated.token_end)
    s.append("user", "Thanks.")
    s.generate(max_new_tokens=4)
    shown = []
    for _ in range(4):
        s.append("user", fact.question)
        s.generate(max_new_tokens=4)
        shown.append(int(s.level_map()[where].max()))
    assert shown[1:] == [0, 0, 0], shown


def test_a_changed_system_prompt_through_the_router_takes_over_the_pin(engine_factory):
    """Routed turns (as every adapter runs them) store each prompt text once, and the
    newest one stays raw after the refocus of every later turn."""
    from megacontext_memory.routing import Item, Router

    e = engine_factory(working_budget=512, gist_refine_steps=0)
    router = Router(e, "pins", "auto-")
    chat = [Item(r, t) for r, t in conversation(e.base, 3000)[1:]]
    half = len(chat) // 2

    def turn(system: str, items: list[Item]) -> None:
        with router.turn([Item("system", system), *items], session_id="u") as t:
            t.session.generate(max_new_tokens=2)

    turn("You are Ada. Answer in French.", chat[:half])
    turn("You are Ada. Answer in French.", chat[half : half + 2])  # unchanged: not stored again
    turn("You are Bob. Answer in German.", chat[half + 2 :])
    s = e.session("u")
    old, new = s.messages(role="system")
    assert (old.content, new.content) == (
        "You are Ada. Answer in French.",
        "You are Bob. Answer in German.",
    )
    assert s.token_count() > 5 * 512
    assert (s.level_map()[new.token_start : new.token_end] == 0).all()


def test_every_turn_hands_its_freed_heap_back_once_the_reply_is_stored(engine_factory, monkeypatch):
    """Logic only: a recording stand-in replaces the trim (what it frees depends on the C
    library and is measured by `bench latency`)."""
    from megacontext_memory import engine as engine_module

    s = engine_factory().session("trim")
    stored_at_trim: list[int] = []
    monkeypatch.setattr(
        engine_module, "release_freed_memory", lambda: stored_at_trim.append(len(s.messages()))
    )
    s.append("user", "Name a colour.")
    s.generate(max_new_tokens=4)
    s.append("user", "And another one?")
    list(s.generate(max_new_tokens=4, stream=True))
    assert stored_at_trim == [2, 4]  # each after its reply was stored
