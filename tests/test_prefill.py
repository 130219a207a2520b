"""Reusing a KV cache across a refocus, on the real default model."""

from __future__ import annotations

import pytest
import torch

from megacontext_memory.demo import FACTS, conversation
from megacontext_memory.prefill import plan, prefill

TEXT = (
    "The lighthouse keeper wrote in his log every evening. He noted the wind, the ships "
    "that passed, and the colour of the sea. One winter the lamp failed twice, and he "
    "climbed the stairs in the dark to mend it while the storm beat on the glass."
)


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p, q = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum())


def test_plan_reuses_every_unchanged_entry_and_computes_the_last():
    """Logic only (string keys). "prefix" stops at the first change; "shift" finds every
    unchanged key wherever it now sits; the last position is always computed."""
    old = ["a", "b", "c", "d", "e", "f"]
    new = ["a", "X", "c", "d", "Y", "Z", "f", "g"]
    assert plan(old, new, "prefix") == [0, None, None, None, None, None, None, None]
    assert plan(old, new, "shift") == [0, None, 2, 3, None, None, 5, None]
    assert plan(old, old, "shift") == [0, 1, 2, 3, 4, None]
    assert plan([], new, "shift") == [None] * len(new)
    # Entries that vanish (gists collapsed into a hidden parent) leave the rest shifted.
    assert plan(old, ["a", "c", "d", "e", "f", "g"], "shift") == [0, 2, 3, 4, 5, None]
    # "prefix" keeps no more than the positions known to be exact.
    assert plan(old, [*old, "g"], "prefix", exact=2) == [0, 1, None, None, None, None, None]
    assert plan(old, [*old, "g"], "shift", exact=2) == [0, 1, 2, 3, 4, 5, None]


def test_shifted_keys_are_the_keys_computed_at_the_new_positions(base):
    """A whole sequence moved by `delta` positions attends exactly as before (rotary
    attention is relative), so every layer's values stay and its keys are the cached ones
    rotated by `delta`."""
    ids = base.encode(TEXT)
    n, delta = len(ids), 37
    embeds = base.embed(ids)[None]
    with torch.no_grad():
        _, here = base.forward(embeds, torch.arange(n)[None])
        _, there = base.forward(embeds, torch.arange(delta, delta + n)[None])
    shift = base.key_shift(torch.full((n,), delta))
    for a, b in zip(here.layers, there.layers, strict=True):
        assert torch.allclose(shift(a.keys), b.keys, atol=1e-3, rtol=1e-3)
        assert torch.allclose(a.values, b.values, atol=1e-3, rtol=1e-3)


def _changed(base, change: str):
    """Old context A B C; new context A B' C (B' 40 tokens longer) or A C (B gone, as gists
    collapsed into a hidden parent vanish), so C moves. Returns the fresh prefill of the new
    context, each mode's prefill from the old one's cache, and where B' ends."""
    words = TEXT.split()
    a = base.encode(" ".join(words[:12]))
    b = base.encode(" " + " ".join(words[12:16]))
    b2 = base.encode(" " + " ".join(words[12:16] + words[4:40])) if change == "longer" else []
    c = base.encode(" " + " ".join(words[16:]))
    old, new = a + b + c, a + b2 + c
    # Position keys as the engine makes them: one per token, naming what it stands for.
    old_keys = [("a", i) for i in range(len(a))] + [("b", i) for i in range(len(b))]
    old_keys += [("c", i) for i in range(len(c))]
    new_keys = [("a", i) for i in range(len(a))] + [("b2", i) for i in range(len(b2))]
    new_keys += [("c", i) for i in range(len(c))]
    embeds = base.embed(new)
    with torch.no_grad():
        fresh = base.forward(embeds[None], torch.arange(len(new))[None])
        results = {}
        for mode in ("prefix", "shift"):
            _, cache = base.forward(base.embed(old)[None], torch.arange(len(old))[None])
            results[mode] = prefill(base, cache, old_keys, new_keys, embeds, mode)
    return fresh, results, (len(a), len(b2), len(c))


@pytest.mark.parametrize("change", ["longer", "removed"])
def test_shift_computes_only_the_changed_entries_each_after_what_precedes_it(base, change):
    """ "prefix" recomputes from the change and matches a fresh prefill. "shift" computes B'
    and the last position alone: A and B' (which attend only to A and B') match a fresh
    prefill at every layer, so B' saw nothing after it; C's first layer matches too (its
    keys were moved to their new positions); C's deeper layers keep what they were computed
    with."""
    (fresh_logits, fresh), results, (a, b2, c) = _changed(base, change)
    logits, cache, kept, exact = results["prefix"]
    assert kept == a and exact == a + b2 + c
    assert (logits - fresh_logits).abs().max().item() <= 1e-3
    logits, cache, kept, exact = results["shift"]
    assert kept == a + c - 1 and exact == a
    assert cache.get_seq_length() == a + b2 + c
    for layer, (got, want) in enumerate(zip(cache.layers, fresh.layers, strict=True)):
        end = a + b2 + c if layer == 0 else a + b2
        for x, y in ((got.keys, want.keys), (got.values, want.values)):
            assert torch.allclose(x[..., :end, :], y[..., :end, :], atol=1e-3, rtol=1e-3)
    assert _kl(fresh_logits[0, -1], logits[0, -1]) < 1.0  # near, not equal


@pytest.mark.parametrize("change", ["longer", "removed"])
def test_shift_in_bfloat16_stays_within_its_rounding(engine_factory, change):
    """The default where half precision is native (CUDA, CPUs with AVX-512 BF16). Two
    bfloat16 prefills of one text at different offsets already differ by more than float32's
    tolerance in deep layers, so this checks what must hold at bfloat16's: the same plan, the
    first layer's moved keys within a few bfloat16 steps of a fresh prefill's, and the last
    position's prediction near the fresh one."""
    base = engine_factory(model_dtype="bfloat16").base
    (fresh_logits, fresh), results, (a, b2, c) = _changed(base, change)
    logits, cache, kept, exact = results["shift"]
    assert kept == a + c - 1 and exact == a and cache.get_seq_length() == a + b2 + c
    got, want = cache.layers[0], fresh.layers[0]
    for x, y in ((got.keys, want.keys), (got.values, want.values)):
        assert torch.allclose(x.float(), y.float(), atol=2**-4, rtol=2**-4)
    assert _kl(fresh_logits[0, -1], logits[0, -1]) < 1.0


def test_a_shift_session_keeps_its_cache_in_step_and_refreshes_it(engine_factory):
    """Turns that move the focus: the cache holds exactly the window's positions, a moving
    turn reuses positions beyond the unchanged prefix, no cache stays inexact for more than
    `kv_refresh_turns` turns, and a refreshed cache equals a fresh prefill of its window."""
    engine = engine_factory(
        working_budget=512, kv_reuse="shift", kv_refresh_turns=2, gist_refine_steps=0
    )
    base, s = engine.base, engine.session("shift")
    s.extend(conversation(base, 2500, FACTS[0], seed=2))
    beyond_prefix, refreshed = 0, 0
    questions = [FACTS[0].question, "What did we talk about first?", FACTS[1].question]
    for question in questions + ["And what else?", "Tell me more.", FACTS[0].question]:
        before = list(s._kv_keys)
        s.append("user", question)
        assert s.generate(max_new_tokens=12).strip()
        t = s.telemetry[-1]
        assert s._kv.get_seq_length() == len(s._kv_keys)
        window = s._kv_keys[: t.prefill_tokens + t.reused_positions]
        same = (i for i, (x, y) in enumerate(zip(before, window, strict=False)) if x != y)
        prefix = next(same, min(len(before), len(window)))
        beyond_prefix += t.reused_positions > prefix
        assert s._stale_turns <= 2
        if s._kv_exact == len(s._kv_keys) and t.moves:
            refreshed += 1
            shown = len(s.wc)
            raw = [k[2] for k in s._kv_keys[shown:]]  # the prompt and the reply: raw tokens
            embeds = torch.cat([s.wc.embeddings(s.tree, base), base.embed(raw)])
            with torch.no_grad():
                _, fresh = base.forward(embeds[None], torch.arange(len(embeds))[None])
            got, want = s._kv.layers[-1], fresh.layers[-1]
            assert torch.allclose(got.keys, want.keys, atol=1e-3, rtol=1e-3)
            assert torch.allclose(got.values, want.values, atol=1e-3, rtol=1e-3)
    assert beyond_prefix and refreshed


def test_a_model_without_rotary_positions_falls_back_to_prefix(base, monkeypatch):
    """Keys without rotary embeddings cannot be moved: "shift" keeps the prefix alone."""
    ids = base.encode(TEXT)
    old_keys, new_keys = list(range(len(ids))), [-1, *range(1, len(ids)), len(ids)]
    embeds = base.embed([ids[1], *ids[1:], ids[0]])
    monkeypatch.setattr(base, "rotary_inv_freq", None)
    with torch.no_grad():
        _, cache = base.forward(base.embed(ids)[None], torch.arange(len(ids))[None])
        done = prefill(base, cache, old_keys, new_keys, embeds, "shift")
    assert done.reused == 0 and done.exact == len(new_keys)
    assert done.cache.get_seq_length() == len(new_keys)


@pytest.mark.parametrize("mode", ["prefix", "shift"])
def test_padded_half_precision_forwards_equal_unpadded_ones(engine_factory, monkeypatch, mode):
    """On CPU a half-precision forward is padded to one of a few lengths (oneDNN keeps a
    kernel per shape). The padding must change nothing but rounding: the causal prefill and
    the shifted one (explicit mask) keep the same logits and cache, cropped to the real
    positions."""
    base = engine_factory(model_dtype="bfloat16").base
    if base.device.type != "cpu":
        pytest.skip("the padding is for CPU kernels")
    lengths = {n + base._padding(n) for n in range(2, 1025)}
    assert len(lengths) <= 20 and all(n + base._padding(n) >= n for n in range(2, 1025))
    (_, fresh), padded, (a, b2, c) = _changed(base, "longer")
    assert base._padding(a + b2 + c) > 0 and base._padding(b2 + 1) > 0  # both forwards pad
    monkeypatch.setattr(base, "_padding", lambda n: 0)
    (_, fresh_plain), plain, _ = _changed(base, "longer")
    pairs = [(fresh, fresh_plain), (padded[mode][1], plain[mode][1])]
    for got, want in pairs:
        assert got.get_seq_length() == want.get_seq_length() == a + b2 + c
        for x, y in zip(got.layers, want.layers, strict=True):
            for u, v in ((x.keys.float(), y.keys.float()), (x.values.float(), y.values.float())):
                assert (u - v).norm() <= 0.01 * v.norm()  # bfloat16 rounds at 0.4%
    assert _kl(plain[mode][0][0, -1], padded[mode][0][0, -1]) < 0.02
