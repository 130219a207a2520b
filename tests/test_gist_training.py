"""GistNet training and evaluation: the loss falls, checkpoints refuse other base models,
evaluation is deterministic for a seed, the data split is fixed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megacontext_memory import corpora
from megacontext_memory.eval import gist_eval
from megacontext_memory.models.base import BaseModel
from megacontext_memory.models.checkpoint import (
    SHIPPED,
    CheckpointMismatch,
    base_meta,
    load_gist_stack,
    save_gist_stack,
)
from megacontext_memory.models.gistnet import GistStack
from megacontext_memory.training import data
from megacontext_memory.training import gist_objective as obj
from megacontext_memory.training.gist_train import TrainConfig, train, window_loss


@pytest.fixture(scope="session")
def gist_base() -> BaseModel:
    return BaseModel.load("default", "cpu")


def _stack(base, seed=0) -> GistStack:
    torch.manual_seed(seed)
    return GistStack(base.width, hidden=96, heads=6, embed_rms=base.embed_rms)


def test_split_is_fixed_and_by_document():
    assert corpora.split_of("wiki", "Alan Turing") == corpora.split_of("wiki", "Alan Turing")
    splits = [corpora.split_of("kjv", f"1-1-{c}") for c in range(1, 400)]
    held = splits.count("heldout") / len(splits)
    assert 0.01 < held < 0.12


def test_windows_are_disjoint_from_training(gist_base):
    train_docs = {t for i, t in corpora.wiki_documents() if corpora.split_of("wiki", i) == "train"}
    held_docs = {t for i, t in corpora.wiki_documents() if corpora.split_of("wiki", i) == "heldout"}
    assert held_docs and not (train_docs & held_docs)
    spec = data.WindowSpec(prefix=4, n_spans=1, horizon=4)
    w1 = data.heldout_windows(gist_base, spec, per_source=3, seed=7)
    w2 = data.heldout_windows(gist_base, spec, per_source=3, seed=7)
    for src in corpora.SOURCES:
        assert w1[src].shape == (3, spec.length)
        assert np.array_equal(w1[src], w2[src])


def test_loss_falls_on_a_tiny_run(gist_base):
    cfg = TrainConfig(horizon=8, batch=2)
    stack = _stack(gist_base)
    sampler = data.WindowSampler(data.load_streams(gist_base, "train"), seed=0)
    ids = torch.as_tensor(sampler.sample(data.WindowSpec(8, 1, 8), 2)[0])
    opt = torch.optim.AdamW(stack.net(1).parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = window_loss(gist_base, stack, ids, 8, 1, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def test_gradients_reach_the_gist_through_the_frozen_model(gist_base):
    cfg = TrainConfig(horizon=4, batch=1)
    stack = _stack(gist_base)
    ids = torch.as_tensor(
        data.WindowSampler(data.load_streams(gist_base, "train"), seed=1).sample(
            data.WindowSpec(4, 2, 4), 1
        )[0]
    )
    window_loss(gist_base, stack, ids, 4, 2, cfg).backward()
    assert stack.net(1).up.weight.grad.abs().sum() > 0  # up starts at zero: its grad is first
    assert all(p.grad is None for p in gist_base.model.parameters())


def test_level2_trains_over_frozen_level1_with_several_spans(gist_base):
    cfg = TrainConfig(level=2, horizon=4, batch=1)
    stack = _stack(gist_base)
    stack.net(1).requires_grad_(False)
    spec = data.WindowSpec(4, 2, 4, span=cfg.span_tokens())  # two 1,024-token spans at once
    ids = torch.as_tensor(
        data.WindowSampler(data.load_streams(gist_base, "train"), seed=2).sample(spec, 1)[0]
    )
    window_loss(gist_base, stack, ids, 4, 2, cfg).backward()
    assert stack.net(2).up.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in stack.net(1).parameters())


def _tiny_run(out, **settings) -> TrainConfig:
    """One-window steps with a 4-token prefix and horizon, no held-out probe."""
    return TrainConfig(
        out=str(out),
        batch=1,
        horizon=4,
        prefixes="4",
        multi_prob=0.0,
        eval_every=0,
        precision="fp32",
        **settings,
    )


def test_train_loop_saves_and_resumes(gist_base, tmp_path):
    cfg = _tiny_run(tmp_path / "run", steps=2, hidden=96, heads=6, save_every=1)
    first = train(cfg, base=gist_base, progress=False)
    assert first["step"] == 2
    cfg.steps = 3
    again = train(cfg, base=gist_base, progress=False)
    assert again["step"] == 3 and again["losses"][:2] == first["losses"]
    stack, meta = load_gist_stack(tmp_path / "run" / "gistnet", gist_base, "compact")
    assert meta["training"]["L1"]["steps"] == 3 and meta["hidden"] == 96


def test_a_grown_net_computes_the_same_and_keeps_its_depth(gist_base, tmp_path):
    """Deepening a trained net (train-gist --init ... --depth N) must not undo its training."""
    stack = _stack(gist_base)
    save_gist_stack(stack, tmp_path / "shallow", base_meta(gist_base, "compact"))
    x = torch.randn(2, 32, gist_base.width) * gist_base.embed_rms
    with torch.no_grad():
        before = stack(x, 1)
        for net in stack.levels:
            net.grow(3)
        assert torch.allclose(stack(x, 1), before, atol=1e-6)
    with pytest.raises(ValueError, match="shrink"):
        stack.levels[0].grow(2)
    cfg = _tiny_run(tmp_path / "run", init=str(tmp_path / "shallow"), depth=2, steps=1)
    train(cfg, base=gist_base, progress=False)
    grown, meta = load_gist_stack(tmp_path / "run" / "gistnet", gist_base, "compact")
    assert meta["depth"] == 2 and all(net.depth == 2 for net in grown.levels)


def test_block_states_are_the_models_own_hidden_states(gist_base):
    ids = torch.randint(0, 1000, (2, 3, 32))
    every = gist_base.model.model.config.num_hidden_layers
    full = gist_base.model.model(input_ids=ids.reshape(6, 32)).last_hidden_state
    assert torch.allclose(gist_base.block_states(ids, every).reshape(6, 32, -1), full)
    shallow = gist_base.block_states(ids, 3)
    assert shallow.shape == (2, 3, 32, gist_base.width)
    assert not torch.allclose(shallow.reshape(6, 32, -1), full, atol=1e-2)
    # the short trunk shares the weights but leaves the model whole
    assert len(gist_base.model.model.layers) == every
    assert torch.allclose(
        gist_base.model.model(input_ids=ids.reshape(6, 32)).last_hidden_state, full
    )
    with pytest.raises(ValueError, match="layers must be in"):
        gist_base.block_states(ids, every + 1)


def test_a_net_given_features_computes_the_same_and_keeps_them(gist_base, tmp_path):
    """train-gist --init ... --feature-layers N must resume from the loaded net's quality."""
    stack = _stack(gist_base)
    save_gist_stack(stack, tmp_path / "plain", base_meta(gist_base, "compact"))
    ids = torch.randint(0, 1000, (2, 32))
    with torch.no_grad():
        before = stack.from_tokens(gist_base, ids)
        stack.read_features(4)
        assert torch.allclose(stack.from_tokens(gist_base, ids), before, atol=1e-6)
    with pytest.raises(ValueError, match="reads hidden-state features"):
        stack(gist_base.embed(ids), 1)
    cfg = _tiny_run(tmp_path / "run", init=str(tmp_path / "plain"), feature_layers=4, steps=2)
    train(cfg, base=gist_base, progress=False)
    trained, meta = load_gist_stack(tmp_path / "run" / "gistnet", gist_base, "compact")
    assert meta["feature_layers"] == 4 and trained.feature_layers == 4
    assert trained.levels[0].feature_in.weight.abs().sum() > 0  # it learned to use them
    assert trained.levels[1].feature_in is None  # level 2 reads level-1 gists only
    # the new input has its own learning rate: at scale 0 it stays at zero, the rest moves
    init = str(tmp_path / "plain")
    cfg0 = _tiny_run(tmp_path / "held", init=init, feature_layers=4, steps=1, feature_lr_scale=0.0)
    train(cfg0, base=gist_base, progress=False)
    held, _ = load_gist_stack(tmp_path / "held" / "gistnet", gist_base, "compact")
    plain, _ = load_gist_stack(init, gist_base, "compact")
    assert held.levels[0].feature_in.weight.abs().sum() == 0
    assert not torch.equal(held.levels[0].down.weight, plain.levels[0].down.weight)
    # level 2 starts as a copy of this level 1, without the hidden-state input
    cfg2 = _tiny_run(tmp_path / "l2", init=str(tmp_path / "run" / "gistnet"), level=2, steps=1)
    assert train(cfg2, base=gist_base, progress=False)["step"] == 1


def test_checkpoint_for_another_base_model_is_refused(gist_base, tmp_path):
    stack = _stack(gist_base)
    meta = base_meta(gist_base, "compact")
    save_gist_stack(stack, tmp_path / "ok", meta)
    load_gist_stack(tmp_path / "ok", gist_base, "compact")  # accepted
    other = dict(meta, base_model="SomeOther-1B", tokenizer_hash="0123456789abcdef")
    save_gist_stack(stack, tmp_path / "other", other)
    with pytest.raises(CheckpointMismatch, match="another base model.*base_model"):
        load_gist_stack(tmp_path / "other", gist_base, "compact")
    wide = dict(meta, width=gist_base.width * 2)
    save_gist_stack(stack, tmp_path / "wide", wide)
    with pytest.raises(CheckpointMismatch, match="width"):
        load_gist_stack(tmp_path / "wide", gist_base, "compact")


def test_eval_is_deterministic_for_a_seed(gist_base):
    stack = _stack(gist_base)
    kw = dict(levels=(1, 2), l1_windows=2, l2_windows=1, prefix=8, horizon=8, n_boot=50)
    a = gist_eval.evaluate(gist_base, stack, "test", seed=3, **kw)
    # the same seed again, level 1 only (an L2 window reads 1,024 tokens raw on one core)
    b = gist_eval.evaluate(gist_base, stack, "test", seed=3, **(kw | {"levels": (1,)}))
    a.pop("seconds"), b.pop("seconds")
    assert json.dumps(a["L1"], sort_keys=True) == json.dumps(b["L1"], sort_keys=True)
    for level in ("L1", "L2"):
        r = a[level]
        assert set(r) >= {"recovery", "ci95", "nll", "per_source"}
        assert set(r["per_source"]) == set(corpora.SOURCES)
        assert set(r["nll"]) >= {"full", "drop", "mean", "gist"}
    assert a["n_windows"] == 2 * 3 + 1 * 3
    # the horizon split covers tokens 0, 1, 2-3, 4-7 and adds up to the whole gap
    ranges = a["L1"]["by_horizon"]
    assert [b["tokens"] for b in ranges] == [[0, 0], [1, 1], [2, 3], [4, 7]]
    gap = sum(b["gap"] * (b["tokens"][1] - b["tokens"][0] + 1) for b in ranges) / 8
    assert gap == pytest.approx(a["L1"]["nll"]["drop"] - a["L1"]["nll"]["full"], abs=1e-5)
    # a free vector fitted to the scored horizon starts at the gist and does better
    kw.update(levels=(1,), free_steps=3)
    free = gist_eval.evaluate(gist_base, stack, "test", seed=3, **kw)["L1"]
    assert free["nll"]["free"] < free["nll"]["gist"] and "recovery_free" in free
    # with the engine's fit on, the headline scores the refined gists, GistNet's beside it
    kw.update(free_steps=0, refine=(2, 0.006, 2))
    with pytest.raises(ValueError, match="prefix of at least 32"):
        gist_eval.evaluate(gist_base, stack, "test", seed=3, **kw)
    r = gist_eval.evaluate(gist_base, stack, "test", seed=3, **(kw | {"prefix": 32}))
    assert r["refine"] == {"steps": 2, "lr": 0.006, "tokens": 2}
    assert "refined" in r["L1"]["nll"] and r["L1"]["recovery"] != r["L1"]["recovery_gistnet"]


def test_refined_gists_continue_more_like_their_block(gist_base):
    """refine_gists fits each gist to the model's own continuation of [context][block]."""
    stack = _stack(gist_base)
    ids = torch.as_tensor(
        data.WindowSampler(data.load_streams(gist_base, "train"), seed=4).sample(
            data.WindowSpec(32, 1, 1), 3
        )[0]
    )
    context, block = ids[:, :32], ids[:, 32:64]
    with torch.no_grad():
        g = stack.from_tokens(gist_base, block)
    refined = obj.refine_gists(gist_base, g, context, block, steps=4, lr=0.006, tokens=3)
    assert refined.shape == g.shape and refined.dtype == g.dtype
    cont, teacher, cache = obj.continuation_logprobs(gist_base, ids[:, :64], 32, 3)
    assert cont.shape == (3, 3) and teacher.shape[:2] == (3, 3)
    with torch.no_grad():

        def kl(v):
            lp = obj.student_logprobs(gist_base, cache, 32, v[:, None], cont)
            return obj.kl_to_teacher(teacher, lp)

        assert (kl(refined) < kl(g)).all()


def test_student_with_raw_span_matches_teacher(gist_base):
    """Sanity of the position convention: feeding the raw span embeddings as the 'middle'
    reproduces the teacher exactly."""
    ids = torch.as_tensor(
        data.WindowSampler(data.load_streams(gist_base, "train"), seed=2).sample(
            data.WindowSpec(6, 1, 5), 2
        )[0]
    )
    with torch.no_grad():
        teacher, cache = obj.teacher_logprobs(gist_base, ids, 6, 5)
        _, spans, hor = obj.split_window(ids, 6, 1, 32, 5)
        student = obj.student_logprobs(gist_base, cache, 6, gist_base.embed(spans[:, 0]), hor)
    assert torch.allclose(teacher, student, atol=1e-3)


@pytest.mark.skipif(not SHIPPED.with_suffix(".json").exists(), reason="no shipped checkpoint")
def test_shipped_checkpoint_loads_for_the_default_model(gist_base):
    stack, meta = load_gist_stack(SHIPPED, gist_base, "compact")
    assert meta["base_model"] == gist_base.name and meta.get("metrics")
    g = stack.from_tokens(gist_base, torch.randint(0, 1000, (2, 32)))
    assert g.shape == (2, gist_base.width) and torch.isfinite(g).all()


def test_engine_view_windows_come_from_documents_no_probe_saw(gist_base):
    from megacontext_memory.eval.gist_eval import (
        PROBE_PREFIX,
        PROBE_SEED,
        probe_free_streams,
        probe_settings,
    )
    from megacontext_memory.models.checkpoint import SHIPPED

    meta = json.loads(SHIPPED.with_suffix(".json").read_text())
    probes = probe_settings(meta)
    assert (1, 32) in probes
    free = probe_free_streams(gist_base, probes)
    for level, per_source in probes:
        spec = data.WindowSpec(PROBE_PREFIX, 1, 32, span=32**level)
        seen = data.heldout_windows(gist_base, spec, per_source, seed=PROBE_SEED)
        for src, windows in seen.items():
            assert 0 < len(free[src]) < len(data.token_stream(gist_base, src, "heldout"))
            haystack = free[src].astype("<u4").tobytes()
            for w in windows:
                assert haystack.find(w[:48].astype("<u4").tobytes()) == -1
