"""Fitting level-1 gists in their context: the refinement the engine runs at gisting.

GistNet reads a block alone; the tokens right after a gist hang on the block's last words
*in their context*, which it never sees. `refine_gists` nudges each gist by a few Adam
steps so that the frozen model reading [previous block][gist] continues as it does after
[previous block][block]. Training (`training/gist_objective.py`) and evaluation share
these functions; the engine imports them from here so inference never imports training.
"""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache


def _positions(base, start: int, length: int, batch: int) -> torch.Tensor:
    return torch.arange(start, start + length, device=base.device).expand(batch, length)


def run_model(base, embeds: torch.Tensor, start: int, cache, last: int):
    """Run the frozen LLM on `embeds` [B, T, d] at positions start..start+T-1 after `cache`;
    log-probs [B, last, V] of the final `last` positions (the LM head runs only there)."""
    b, t, _ = embeds.shape
    cache = cache if cache is not None else DynamicCache()
    out = base.model.model(
        inputs_embeds=embeds.to(base.dtype),
        position_ids=_positions(base, start, t, b),
        use_cache=True,
        **{base.cache_kwarg: cache},
    )
    logits = base.model.lm_head(out.last_hidden_state[:, t - last :])
    return logits.float().log_softmax(-1), cache


def student_logprobs(
    base,
    cache: DynamicCache | None,
    n_prefix: int,
    middle: torch.Tensor,
    horizon_ids: torch.Tensor,
) -> torch.Tensor:
    """Student log-probs [B, H, V] for the horizon after the prefix (held in `cache`) and
    the `middle` vectors [B, m, d], m >= 1 (gists, or means of span embeddings).

    The cache is copied, so one prefix cache serves several students. Gradients flow from
    the result into `middle`. (A dropped span is `drop_logprobs`.)
    """
    h = horizon_ids.shape[1]
    if middle.shape[1] < 1:
        raise ValueError("student_logprobs needs at least one middle vector")
    x = torch.cat([middle.to(base.dtype), base.embed(horizon_ids[:, :-1])], dim=1)
    cache = copy.deepcopy(cache) if cache is not None else None
    return run_model(base, x, n_prefix, cache, h)[0]


@torch.no_grad()
def continuation_logprobs(base, ids: torch.Tensor, n_prefix: int, tokens: int):
    """The model's own greedy continuation [B, tokens] of windows `ids` [B, L], its
    log-probs [B, tokens, V] at each step, and the KV cache of the first `n_prefix` positions.
    """
    lp, cache = run_model(base, base.embed(ids), 0, None, 1)
    steps = [lp]
    for i in range(1, tokens):
        nxt = steps[-1][:, -1].argmax(-1, keepdim=True)
        steps.append(run_model(base, base.embed(nxt), ids.shape[1] + i - 1, cache, 1)[0])
    lps = torch.cat(steps, 1)
    cache.crop(n_prefix - (ids.shape[1] + tokens - 1))
    return lps.argmax(-1), lps, cache


def refine_gists(
    base,
    gists: torch.Tensor,
    context_ids: torch.Tensor,
    block_ids: torch.Tensor,
    steps: int,
    lr: float,
    tokens: int = 4,
) -> torch.Tensor:
    """Fit gists [B, d] of blocks `block_ids` [B, K] so that the model reading
    [context][gist] continues as it does after [context][block].

    The tokens right after a gist are where it loses most (`eval-gist`'s by_horizon): they
    hang on the block's last words *in their context*, which GistNet never sees. The target
    is the model's own greedy continuation of [context][block] (`tokens` tokens) and its
    distributions there, so nothing after the block is used and the fit runs at ingest;
    `context_ids` [B, C >= 1] are the tokens before each block.
    """
    n_ctx = context_ids.shape[1]
    ids = torch.cat([context_ids, block_ids], 1)
    continuation, teacher, cache = continuation_logprobs(base, ids, n_ctx, tokens)
    v = fit_middle(base, cache, n_ctx, gists[:, None], continuation, teacher, steps, lr)
    return v[:, 0].to(gists.dtype)


def fit_middle(base, cache, n_prefix: int, start, horizon_ids, teacher_lp, steps: int, lr: float):
    """Middle vectors [B, 1, d] fitted by Adam from `start` so the student matches the
    teacher's log-probs over `horizon_ids` (per window: the loss is summed, not averaged)."""
    v = start.detach().float().clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            lp = student_logprobs(base, cache, n_prefix, v, horizon_ids)
            loss = kl_to_teacher(teacher_lp, lp).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return v.detach()


def kl_to_teacher(teacher_lp: torch.Tensor, student_lp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per window [B], averaged over the horizon."""
    kl = (teacher_lp.exp() * (teacher_lp - student_lp)).sum(-1)
    return kl.mean(-1)
