"""The substitutability objective: does a gist stand in for the span it replaces?

A window is `[prefix][span_1 .. span_n][horizon]`. The teacher is the frozen LLM on the raw
tokens. A student sees the same prefix, then one vector per span (a gist, the mean of the
span's embeddings, or nothing at all for "drop"), then the horizon. Positions follow the
engine's 'compact' convention: an entry's position id is its index in the student
sequence, so a gist takes exactly one position and the horizon starts right after it.

Both sides score the same H predictions: the token after the last span entry predicts
horizon[0], ..., horizon[H-2] predicts horizon[H-1]. The prefix is run once (no grad) and
its KV cache shared by teacher and student.
"""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache

POSITION_CONVENTION = "compact"


def _positions(base, start: int, length: int, batch: int) -> torch.Tensor:
    return torch.arange(start, start + length, device=base.device).expand(batch, length)


def _run(base, embeds: torch.Tensor, start: int, cache, last: int):
    """Run the frozen LLM on `embeds` [B, T, d] at positions start..start+T-1 after `cache`;
    log-probs [B, last, V] of the final `last` positions (the LM head runs only there)."""
    b, t, _ = embeds.shape
    cache = cache if cache is not None else DynamicCache()
    out = base.model.model(
        inputs_embeds=embeds.to(base.model.dtype),
        position_ids=_positions(base, start, t, b),
        use_cache=True,
        **{base.cache_kwarg: cache},
    )
    logits = base.model.lm_head(out.last_hidden_state[:, t - last :])
    return logits.float().log_softmax(-1), cache


@torch.no_grad()
def prefix_cache(base, prefix_ids: torch.Tensor) -> DynamicCache | None:
    """KV cache of the prefix tokens [B, P] (None when P == 0)."""
    if prefix_ids.shape[1] == 0:
        return None
    return _run(base, base.embed(prefix_ids), 0, None, 1)[1]


@torch.no_grad()
def teacher_logprobs(base, ids: torch.Tensor, n_prefix: int, horizon: int):
    """Teacher log-probs [B, H, V] for the horizon of raw windows `ids` [B, L], plus the
    prefix's KV cache (cropped from the same pass; None when there is no prefix)."""
    length = ids.shape[1]
    lp, cache = _run(base, base.embed(ids), 0, None, horizon + 1)
    if n_prefix == 0:
        return lp[:, :-1], None
    cache.crop(n_prefix - length)  # keep the first n_prefix positions
    return lp[:, :-1], cache


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
    x = torch.cat([middle.to(base.model.dtype), base.embed(horizon_ids[:, :-1])], dim=1)
    cache = copy.deepcopy(cache) if cache is not None else None
    return _run(base, x, n_prefix, cache, h)[0]


@torch.no_grad()
def drop_logprobs(base, ids: torch.Tensor, n_prefix: int, horizon: int) -> torch.Tensor:
    """Log-probs [B, H, V] for the horizon when every span is simply removed:
    `[prefix][horizon]` at positions 0..P+H-1 (needs P >= 1)."""
    if n_prefix < 1:
        raise ValueError("a dropped span needs a prefix to predict the first horizon token")
    seq = torch.cat([ids[:, :n_prefix], ids[:, -horizon:]], dim=1)
    return _run(base, base.embed(seq), 0, None, horizon + 1)[0][:, :-1]


@torch.no_grad()
def continuation_logprobs(base, ids: torch.Tensor, n_prefix: int, tokens: int):
    """The model's own greedy continuation [B, tokens] of windows `ids` [B, L], its
    log-probs [B, tokens, V] at each step, and the KV cache of the first `n_prefix` positions.
    """
    lp, cache = _run(base, base.embed(ids), 0, None, 1)
    steps = [lp]
    for i in range(1, tokens):
        nxt = steps[-1][:, -1].argmax(-1, keepdim=True)
        steps.append(_run(base, base.embed(nxt), ids.shape[1] + i - 1, cache, 1)[0])
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


def nll(lp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per window [B] of `targets` [B, H] under `lp`."""
    return -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).mean(-1)


def split_window(ids: torch.Tensor, n_prefix: int, n_spans: int, span: int, horizon: int):
    """(prefix [B,P], spans [B,n,span], horizon [B,H]) of windows [B, L]."""
    b = ids.shape[0]
    spans = ids[:, n_prefix : n_prefix + n_spans * span].reshape(b, n_spans, span)
    return ids[:, :n_prefix], spans, ids[:, -horizon:]


def horizon_targets(ids: torch.Tensor, horizon: int) -> torch.Tensor:
    return ids[:, -horizon:]
