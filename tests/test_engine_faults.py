"""The engine under threads, other processes (engines on one store) and failing turns."""

from __future__ import annotations

import hashlib
import json
import random
import threading

import numpy as np
import pytest

from megacontext_memory.config import Config
from megacontext_memory.demo import conversation
from megacontext_memory.engine import split_text
from megacontext_memory.gisting import Gister
from megacontext_memory.operations.transfer import (
    export_sessions,
    import_session,
    read_export,
    reindex,
)
from megacontext_memory.routing import append_split, merged_messages
from megacontext_memory.store import GistVersionMismatch, SessionDeleted, Store
from megacontext_memory.store.fsck import fsck

FAST = {"gist_refine_steps": 0, "working_budget": 256}
LONG_TEXT = "The quick brown fox jumps over the lazy dog near the river bank. " * 6


def _run(fn, timeout: float = 120.0) -> list:
    """Run `fn` on a daemon thread; fail (not hang) if it does not finish in time."""
    out: list = []

    def target():
        try:
            out.append(("ok", fn()))
        except BaseException as e:  # reported to the test
            out.append(("error", e))

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(timeout)
    assert not th.is_alive(), f"{fn} did not finish within {timeout} s"
    kind, value = out[0]
    if kind == "error":
        raise value
    return value


def _files(session) -> str:
    h = hashlib.sha256()
    for path in sorted(session.store.dir.iterdir()):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


# 1 ------------------------------------------------------------------------------------
def test_a_stream_pulled_from_two_threads_finishes_and_stores_its_reply(engine_factory):
    s = engine_factory(**FAST).session("threads")
    s.append("user", "Name three colours.")
    stream = s.generate(max_new_tokens=12, stream=True)
    first = _run(lambda: next(stream))
    rest = _run(lambda: list(stream))
    _run(lambda: s.append("user", "Thanks."))  # a third thread is not blocked either
    msgs = s.messages()
    assert [m.role for m in msgs] == ["user", "assistant", "user"]
    assert msgs[1].content == first + "".join(rest) and msgs[1].metadata == {"generated": True}


def test_using_the_session_while_reading_its_stream_is_an_error_not_a_hang(engine_factory):
    s = engine_factory(**FAST).session("reentrant")
    s.append("user", "Name three colours.")

    def misuse():
        stream = s.generate(max_new_tokens=12, stream=True)
        next(stream)
        try:
            s.append("user", "meanwhile")
        finally:
            stream.close()

    with pytest.raises(RuntimeError, match="streamed reply is being read in this thread"):
        _run(misuse)
    assert [m.content for m in s.messages()][:1] == ["Name three colours."]
    assert "meanwhile" not in [m.content for m in s.messages()]


# 2 ------------------------------------------------------------------------------------
def test_bfloat16_gists_are_stored_as_computed(engine_factory, tmp_path):
    engine = engine_factory(store=tmp_path / "st", gist_dtype="bfloat16", **FAST)
    s = engine.session("bf16")
    s.append("user", LONG_TEXT)
    s.make_gists()
    n = s.tree.count(1)
    assert n >= 2
    blocks = s.tree.tokens(0, n * 32).reshape(-1, 32)
    g = engine.gister
    exact = Gister(g.base, g.stack, g.version, "float32").gists(1, blocks)
    stored = engine_factory(store=tmp_path / "st", gist_dtype="bfloat16", **FAST)
    stored = stored.session("bf16").tree.gist_vectors(1, list(range(n)))
    scale = np.abs(exact).max()
    assert np.abs(stored - exact).max() <= 2**-8 * scale  # bfloat16 keeps 8 bits
    assert np.corrcoef(stored.ravel(), exact.ravel())[0, 1] > 0.999


# 3 ------------------------------------------------------------------------------------
def test_a_session_deleted_and_created_again_elsewhere_is_never_served_stale(
    engine_factory, tmp_path
):
    e1 = engine_factory(store=tmp_path / "st", **FAST)
    e2 = engine_factory(store=tmp_path / "st", **FAST)  # another process, in effect
    s1 = e1.session("x")
    s1.append("user", "The secret word is pineapple. Remember it.")
    s1.generate(max_new_tokens=4)
    assert e2.delete_session("x")
    s2 = e2.session("x")
    s2.append("user", LONG_TEXT)  # longer than before: a refresh would read only past it
    for stale in (
        lambda: s1.generate(max_new_tokens=4),
        lambda: s1.append("user", "still there?"),
        s1.messages,
    ):
        with pytest.raises(SessionDeleted, match="'x' was deleted"):
            stale()
    fresh = e1.session("x")
    assert fresh is not s1
    assert [m.content for m in fresh.messages()] == [LONG_TEXT]
    assert np.array_equal(fresh.tree.tokens(), s2.tree.tokens())
    fresh.generate(max_new_tokens=4)
    assert len(Store(tmp_path / "st").open_session("x").messages()) == 2


def test_reads_racing_a_deletion_raise_session_deleted(engine_factory, tmp_path):
    """Another process deletes the session between a reader's count and its file read:
    the reader gets SessionDeleted, not a payload error that reads as a corrupt store."""
    e1 = engine_factory(store=tmp_path / "st", **FAST)
    s1 = e1.session("x")
    s1.extend(conversation(e1.base, 200))
    s1.make_gists()
    counts = s1.tree.counts
    assert counts[1] >= 2
    assert Store(tmp_path / "st").delete_session("x")  # another process, in effect
    s1.tree.counts = counts  # the counts read just before the deletion
    with pytest.raises(SessionDeleted):
        s1.tree.gist_vectors(1, [0, 1])
    with pytest.raises(SessionDeleted):
        s1.store.tokens(0, 32)


# 4 ------------------------------------------------------------------------------------
def test_another_gistnet_version_is_refused_at_open_and_in_use(engine_factory, tmp_path):
    store = tmp_path / "st"
    a = engine_factory(store=store, **FAST)
    sa = a.session("v")
    sa.append("user", LONG_TEXT)
    sa.make_gists()
    assert sa.tree.count(1) >= 2
    before = _files(sa)
    b = engine_factory(store=store, working_budget=256, gist_refine_steps=0, gist_checkpoint=None)
    assert b.gister.version != a.gister.version
    with pytest.raises(GistVersionMismatch, match=r"megacontext reindex --store"):
        b.session("v")
    assert _files(sa) == before  # nothing re-gisted behind the first engine's back
    sa.generate(max_new_tokens=4)
    (rec,) = reindex(b.store, b.gister, ["v"])  # the explicit way
    assert rec["to"] == b.gister.version
    b.session("v").generate(max_new_tokens=4)
    sa.append("user", "hi")  # tokens do not depend on the GistNet: an append is kept
    for call in (lambda: sa.generate(max_new_tokens=4), sa.make_gists):
        with pytest.raises(GistVersionMismatch, match=b.gister.version.replace("+", r"\+")):
            call()
    assert b.session("v").messages()[-1].content == "hi"


# 5 ------------------------------------------------------------------------------------
def test_failed_and_abandoned_turns_are_not_stored_as_replies(engine_factory):
    s = engine_factory(**FAST).session("fail")
    s.append("user", "Tell me a long story about a dragon.")

    def boom(ids, logits):
        if len(ids) >= 2:
            raise RuntimeError("processor failed")
        return logits

    with pytest.raises(RuntimeError, match="processor failed"):
        s.generate(max_new_tokens=8, logits_processor=boom)
    stream = s.generate(max_new_tokens=8, stream=True, logits_processor=boom)
    with pytest.raises(RuntimeError, match="processor failed"):
        _run(lambda: list(stream))
    assert [m.role for m in s.messages()] == ["user"]
    stream = s.generate(max_new_tokens=24, stream=True)
    first = next(stream)
    stream.close()
    last = s.messages()[-1]
    assert (last.role, last.content) == ("assistant", first)
    assert last.metadata == {"generated": True, "truncated": True}
    s.append("user", "Go on.")
    full = s.generate(max_new_tokens=6)
    assert s.messages()[-1].content == full
    assert s.messages()[-1].metadata == {"generated": True}


# 6 ------------------------------------------------------------------------------------
def test_a_question_appended_elsewhere_is_what_the_session_focuses_for(engine_factory, tmp_path):
    e1 = engine_factory(store=tmp_path / "st", **FAST)
    e2 = engine_factory(store=tmp_path / "st", **FAST)
    s1 = e1.session("q")
    s1.append("user", "What colour is the sky?")
    s1.generate(max_new_tokens=4)
    e2.session("q").append("user", "Where do penguins live?")
    seen = []
    score = s1.scorer.score
    s1.scorer.score = lambda wc, tree, query: seen.append(list(query)) or score(wc, tree, query)
    s1.generate(max_new_tokens=4)
    assert seen and seen[-1] == e1.base.encode("Where do penguins live?")


# 7 ------------------------------------------------------------------------------------
_CHARS = "日本語中文字漢字한국어😀🎉👍🏽👨‍👩‍👧🇫🇷é́ ab\n"


def _random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_CHARS) for _ in range(n))


def test_split_text_cuts_on_characters_and_round_trips(base):
    rng = random.Random(7)
    for _ in range(200):
        text = _random_text(rng, rng.randint(1, 600))
        if not text.strip():
            continue
        parts = split_text(base, text, 64)
        assert "".join(parts) == text
        assert all(part.strip() for part in parts)
        assert all(len(base.encode(p)) <= 64 for p in parts if p.strip() == p)


def test_long_messages_split_by_the_adapters_round_trip_losslessly(engine_factory):
    engine = engine_factory(**FAST)
    rng = random.Random(11)
    for i in range(2):
        text = "x" + _random_text(rng, rng.randint(150, 250))
        s = engine.session(f"split-{i}")
        append_split(s, "user", text, {"k": i})
        assert len(s.messages()) > 1  # it was split
        ((role, content, meta),) = merged_messages(s)
        assert (role, content, meta) == ("user", text, {"k": i})


# 8 ------------------------------------------------------------------------------------
def test_import_replace_builds_aside_and_swaps_or_leaves_the_original(
    engine_factory, tmp_path, monkeypatch
):
    engine = engine_factory(store=tmp_path / "st", **FAST)
    original = engine.session("x")
    for i in range(3):
        original.append("user", f"Original message {i}. " * 4)
    kept = [m.to_dict() for m in original.messages()]
    src = engine_factory(store=tmp_path / "src", **FAST).session("x")
    for i in range(6):
        src.append("user" if i % 2 == 0 else "assistant", f"Imported message {i}. " * 5)
    import io

    buf = io.StringIO()
    export_sessions(src.engine.store, buf)
    ((header, msgs),) = list(read_export(buf.getvalue().splitlines()))

    bad = [*msgs[:2], {**msgs[2], "role": "wizard"}, *msgs[3:]]
    with pytest.raises(ValueError, match="message 2: unknown role"):
        import_session(engine, header, bad, replace=True)

    from megacontext_memory.operations import transfer
    from megacontext_memory.tree import MegaContextTree

    calls = {"n": 0}
    extend = MegaContextTree.extend

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second of three chunks: halfway
            raise OSError("disk full")
        return extend(self, *args, **kwargs)

    monkeypatch.setattr(transfer, "IMPORT_CHUNK", 2)
    monkeypatch.setattr(MegaContextTree, "extend", failing)
    with pytest.raises(OSError, match="disk full"):
        import_session(engine, header, msgs, replace=True)
    monkeypatch.setattr(MegaContextTree, "extend", extend)
    assert engine.sessions() == ["x"]
    assert [m.to_dict() for m in engine.session("x").messages()] == kept
    assert fsck(tmp_path / "st").clean

    new = import_session(engine, header, msgs, replace=True)
    got = [m.to_dict() for m in new.messages()]
    assert [(m["role"], m["content"], m["created"]) for m in got] == [
        (m["role"], m["content"], m["created"]) for m in msgs
    ]
    with pytest.raises(SessionDeleted):
        original.append("user", "to the replaced session")
    assert engine.sessions() == ["x"]
    rep = fsck(tmp_path / "st")
    assert rep.clean and not rep.notes, rep.lines()
    assert json.loads(json.dumps(got))  # still a plain, serialisable log


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gist_refine_per_turn", 0),
        ("recency_tokens", 0),
        ("relevance_floor", 1.5),
        ("working_budget", 64),
        ("scorer", "x"),
    ],
)
def test_config_refuses_a_bad_value_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        Config(**{field: value})
