"""LensNet: its inputs, its counterfactual labels, its checkpoint, and the engine using it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megacontext_memory.demo import conversation
from megacontext_memory.focus.scorers import LensScorer
from megacontext_memory.models.checkpoint import (
    LENS_SHIPPED,
    CheckpointMismatch,
    base_meta,
    load_lensnet,
    save_lensnet,
)
from megacontext_memory.models.lensnet import FEATURES, LensNet
from megacontext_memory.training.lens_train import (
    _batch,
    _load,
    _scores,
    answer_rank,
    block_utilities,
    hits,
)


def test_the_block_stating_the_answer_gets_the_largest_label(base):
    filler = " ".join(text for _, text in conversation(base, 400)[1:])
    ids = base.encode(filler)[: 8 * 32]
    fact = base.encode(" Note: Harwick's door code is 4417, and Marwick's is 9023. ")
    tokens = np.array(ids[: 4 * 32] + fact + ids[4 * 32 :])
    blocks = tokens[: len(tokens) // 32 * 32].reshape(-1, 32)
    u = block_utilities(base, blocks, "What is Harwick's door code?", "4417")
    holding = {
        i for i in range(len(blocks)) if (i + 1) * 32 > 4 * 32 and i * 32 < 4 * 32 + len(fact)
    }
    assert int(np.argmax(u)) in holding | {min(holding) - 1}  # a block and the one after it
    assert u.max() > 0.5 and np.median(u) < u.max() / 2
    # Long histories label only some blocks: those get the same labels, the rest 0.
    only = np.zeros(len(blocks), bool)
    only[[1, int(np.argmax(u))]] = True
    part = block_utilities(base, blocks, "What is Harwick's door code?", "4417", only=only)
    np.testing.assert_allclose(part[only], u[only], rtol=1e-3, atol=1e-3)
    assert (part[~only] == 0).all()


def test_the_answer_ranks_among_gists_with_ties_in_context_order():
    """Pure logic on made-up scores."""
    levels = np.array([1, 0, 2, 1, 1])
    scores = np.array([0.5, 9.0, 0.5, 0.7, 0.1])  # the raw entry's score does not count
    assert answer_rank(scores, levels, np.array([2])) == 3  # after 3, and 0 (a tie, earlier)
    assert answer_rank(scores, levels, np.array([4, 3])) == 1  # its best entry counts
    assert answer_rank(scores, levels, np.array([1, 2])) == 1  # partly raw: found
    assert hits(scores, levels, np.array([2]), 3) and not hits(scores, levels, np.array([2]), 2)


def test_labels_made_for_other_features_are_refused(tmp_path):
    n = 3
    old = tmp_path / "dev-2000-000-seed0.npz"
    np.savez(old, features=np.zeros((n, len(FEATURES) - 1), np.float32), labels=np.zeros(n))
    with pytest.raises(ValueError, match=f"{len(FEATURES) - 1} features per entry"):
        _load([old])


def test_scores_do_not_depend_on_padding_or_batching(engine_factory):
    e = engine_factory(working_budget=256, gist_refine_steps=0)
    s = e.session("lens")
    s.extend(conversation(e.base, 1500))
    torch.manual_seed(0)
    scorer = LensScorer(LensNet(e.base.width), e.base)
    wc, query = s.working_context(), e.base.encode("What did my sister say?")
    x = scorer.inputs(wc, s.tree, query)
    assert x["features"].shape == (len(wc.entries), len(FEATURES))
    assert np.isfinite(x["features"]).all() and np.isfinite(x["vectors"]).all()
    assert {int(v) for v in x["levels"]} >= {0, 1}
    alone = scorer.score(wc, s.tree, query)
    short = {k: v[:5] if k != "query" else v for k, v in x.items()} | {"labels": np.zeros(5)}
    full = dict(x, labels=np.zeros(len(wc.entries)))
    batched = _scores(scorer.net, _batch([short, full]))[1, : len(wc.entries)].detach().numpy()
    np.testing.assert_allclose(batched, alone, rtol=1e-4, atol=1e-4)
    assert hits(
        alone, x["levels"], np.array([int(np.argmax(np.where(x["levels"] > 0, alone, -np.inf)))]), 1
    )


def test_a_lensnet_for_another_base_model_is_refused(base, tmp_path):
    net = LensNet(base.width)
    meta = base_meta(base, "compact") | {"features": list(FEATURES)}
    path = tmp_path / "lens"
    save_lensnet(net, path, meta)
    loaded, _ = load_lensnet(path, base)
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.state_dict().values(), net.state_dict().values(), strict=True)
    )
    bad = json.loads(path.with_suffix(".json").read_text()) | {"tokenizer_hash": "0" * 16}
    path.with_suffix(".json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointMismatch, match="another base model"):
        load_lensnet(path, base)


@pytest.mark.skipif(
    not LENS_SHIPPED.with_suffix(".safetensors").exists(), reason="no shipped LensNet"
)
def test_the_engine_runs_turns_with_the_shipped_lensnet(engine_factory):
    e = engine_factory(working_budget=512, scorer="lensnet", gist_refine_steps=0)
    s = e.session("lens-turns")
    s.extend(conversation(e.base, 3000))
    s.append("user", "Where does my sister live?")
    assert s.generate(max_new_tokens=8).strip()
    assert s.telemetry[-1].positions_used <= 512


def test_eval_focus_reports_every_scorer():
    from megacontext_memory.eval.focus_eval import SCORERS, run, table

    if not LENS_SHIPPED.with_suffix(".safetensors").exists():
        pytest.skip("no shipped LensNet")
    result = run([2000], {2000: 1}, "dev", 0, {"working_budget": 512, "gist_refine_steps": 0})
    assert set(result["summary"]) == set(SCORERS)
    for by_size in result["summary"].values():
        m = by_size["2000"]
        assert m["tasks"] == 1 and 0 <= m["hit@1"] <= m["hit@4"] <= 1 and 0 < m["used"] <= 1
        assert m["hit@1"] <= m["mrr"] <= 1
        assert 0 <= m["lookalikes_raw"] <= 1
    assert "lensnet" in table(result)
