"""The write path: appends return before gisting, batches are checked whole, gists are
made in shared batches and whatever a crash left ungisted is made on the next open."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from megacontext_memory.demo import conversation
from megacontext_memory.models import base as base_module
from megacontext_memory.models.base import resolve_dtype
from megacontext_memory.store import Store
from megacontext_memory.store.fsck import fsck

FAST = {"gist_refine_steps": 0, "working_budget": 512}


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        ({"role": "robot", "content": "hi"}, ValueError, "message 3: unknown role 'robot'"),
        ({"role": "user", "content": 42}, TypeError, "message 3: message content must be a str"),
        (("user", "   "), ValueError, "message 3: message content is empty"),
        ({"role": "user", "text": "hi"}, ValueError, r"message 3: unknown message field"),
        (("user", "word " * 700), ValueError, "message 3: message is .* tokens, longer than"),
        ("just text", TypeError, "message 3: a message must be a dict or a .role, content. pair"),
    ],
)
def test_a_bad_message_anywhere_refuses_the_whole_batch(engine_factory, bad, error, match):
    s = engine_factory(**FAST).session("batch")
    s.append("user", "Already here.")
    before = (s.messages(), s.token_count())
    batch = [("user", "one"), ("assistant", "two"), {"role": "user", "content": "three"}, bad]
    with pytest.raises(error, match=match):
        s.extend([*batch, ("user", "after")])
    assert (s.messages(), s.token_count()) == before
    assert fsck(s.engine.store.path).clean


def test_extend_stores_what_appending_one_by_one_stores(engine_factory, tmp_path):
    script = conversation(engine_factory(**FAST).base, 1500)
    one = engine_factory(store=tmp_path / "one", **FAST).session("s")
    for role, text in script:
        assert one.append(role, text).role == role
    bulk = engine_factory(store=tmp_path / "bulk", **FAST).session("s")
    stored = bulk.extend(
        [{"role": r, "content": t, "metadata": {"i": i}} for i, (r, t) in enumerate(script)]
    )
    assert [(m.role, m.content) for m in stored] == script
    assert [m.metadata for m in bulk.messages()] == [{"i": i} for i in range(len(script))]
    assert np.array_equal(one.tree.tokens(), bulk.tree.tokens())
    assert one.tree.count(1) == bulk.tree.count(1) == 0  # nothing gisted yet
    assert one.make_gists() == bulk.make_gists() == one.tree.count(1) + one.tree.count(2)
    n = one.tree.count(1)
    a = one.tree.gist_vectors(1, list(range(n)))
    b = bulk.tree.gist_vectors(1, list(range(n)))
    np.testing.assert_allclose(a, b, rtol=1e-2, atol=2e-3)  # other batch shapes: float noise


def test_gists_a_crash_left_unmade_are_made_on_the_next_open(engine_factory, tmp_path):
    store = tmp_path / "st"
    s = engine_factory(store=store, **FAST).session("crash")
    s.extend(conversation(s.engine.base, 1200))
    missing = s.tree.missing
    assert missing > 0 and s.tree.count(1) == 0
    # The process dies here: messages and tokens are committed, no gist was made.
    rep = fsck(store)
    assert rep.clean and any(f"{missing} gist(s) not made yet" in n for n in rep.notes)
    reopened = engine_factory(store=store, **FAST).session("crash")
    assert reopened.tree.missing == 0 and reopened.tree.count(1) == s.token_count() // 32
    rep = fsck(store)
    assert rep.clean and not rep.notes
    assert reopened.generate(max_new_tokens=4)


def test_sessions_of_one_process_share_gisting_batches(engine_factory, tmp_path):
    """Two engines with the same settings share one Gister; concurrent turns of several
    sessions have their blocks gisted in shared batches, each session getting its own."""
    e1 = engine_factory(store=tmp_path / "a", **FAST)
    e2 = engine_factory(store=tmp_path / "b", **FAST)
    assert e1.gister is e2.gister
    gister, sizes = e1.gister, []
    compute = gister._compute

    def counted(level, group):
        sizes.append((level, len(group)))
        return compute(level, group)

    gister._compute = counted
    try:
        sessions = [e.session(f"s{i}") for i in range(3) for e in (e1, e2)]
        texts = conversation(e1.base, 1500)
        for i, s in enumerate(sessions):
            s.extend(texts[i:] + texts[:i])  # a different history each
        errors: list[BaseException] = []

        def gist(s):
            try:
                s.make_gists()
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=gist, args=(s,)) for s in sessions]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
    finally:
        gister._compute = compute
    assert max(n for level, n in sizes if level == 1) >= 2  # some batch held several sessions
    for s in sessions:  # and each session got its own blocks' gists
        alone = gister.gists(1, s.tree.tokens(0, 64).reshape(2, 32))
        np.testing.assert_allclose(
            s.tree.gist_vectors(1, [0, 1]), alone.astype(np.float32), rtol=1e-2, atol=2e-3
        )


def test_half_precision_model(engine_factory):
    """The path CUDA takes by default (a half-precision model), run on the CPU in bfloat16."""
    e = engine_factory(model_dtype="bfloat16", working_budget=256, gist_refine_steps=2)
    assert e.base.dtype == torch.bfloat16
    assert isinstance(e.session("empty").generate(max_new_tokens=2), str)  # no history: it ran
    s = e.session("half")
    s.extend(conversation(e.base, 500))  # longer than the budget: gists are shown, refined
    s.append("user", "Say hello.")
    assert s.generate(max_new_tokens=4).strip()
    g = s.tree.gist_vectors(1, list(range(s.tree.count(1))))
    assert len(g) >= 12 and np.isfinite(g).all()
    assert Store(e.store.path).open_session("half").counts()[1] == len(g)
    refined = s.tree.store.refined(list(range(len(g))), e.gister.refine_version)
    assert refined and all(np.isfinite(v).all() for v in refined.values())


def test_auto_dtype_is_half_precision_where_the_hardware_computes_it(engine_factory, monkeypatch):
    """ "auto" resolves once, so it shares the model of the dtype it stands for; on a CPU it
    is bfloat16 only with native bfloat16 (the CPU's answer is faked for the logic)."""
    cpu = torch.device("cpu")
    want = resolve_dtype(cpu)
    assert engine_factory(model_dtype="auto").base is engine_factory(model_dtype=want).base
    monkeypatch.setattr(base_module, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype(cpu) == "bfloat16" and resolve_dtype(cpu, "float32") == "float32"
    monkeypatch.setattr(base_module, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype(cpu) == "float32" and resolve_dtype(cpu, "bfloat16") == "bfloat16"


def test_encode_messages_matches_one_message_at_a_time_across_its_batches(base):
    """Long imports are tokenised 1,024 messages at a time into uint32 arrays; the ids and
    their order are those of tokenising each message alone."""
    messages = [
        ("user" if i % 2 else "assistant", f"note {i}: the code is {i * 7919}") for i in range(2100)
    ]
    encoded = base.encode_messages(messages)
    assert len(encoded) == len(messages)
    assert all(ids.dtype == np.uint32 for ids in encoded)
    for i in (0, 1023, 1024, 2047, 2048, 2099):
        assert encoded[i].tolist() == base.encode(base.render_message(*messages[i]))
