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

import torch
from transformers import DynamicCache

from ..models.refine import (
    continuation_logprobs,
    fit_middle,
    kl_to_teacher,
    refine_gists,
    run_model,
    student_logprobs,
)

__all__ = [  # the objective's vocabulary, shared with the engine's refinement
    "continuation_logprobs",
    "fit_middle",
    "kl_to_teacher",
    "refine_gists",
    "run_model",
    "student_logprobs",
]

POSITION_CONVENTION = "compact"


@torch.no_grad()
def prefix_cache(base, prefix_ids: torch.Tensor) -> DynamicCache | None:
    """KV cache of the prefix tokens [B, P] (None when P == 0)."""
    if prefix_ids.shape[1] == 0:
        return None
    return run_model(base, base.embed(prefix_ids), 0, None, 1)[1]


@torch.no_grad()
def teacher_logprobs(base, ids: torch.Tensor, n_prefix: int, horizon: int):
    """Teacher log-probs [B, H, V] for the horizon of raw windows `ids` [B, L], plus the
    prefix's KV cache (cropped from the same pass; None when there is no prefix)."""
    length = ids.shape[1]
    lp, cache = run_model(base, base.embed(ids), 0, None, horizon + 1)
    if n_prefix == 0:
        return lp[:, :-1], None
    cache.crop(n_prefix - length)  # keep the first n_prefix positions
    return lp[:, :-1], cache


@torch.no_grad()
def drop_logprobs(base, ids: torch.Tensor, n_prefix: int, horizon: int) -> torch.Tensor:
    """Log-probs [B, H, V] for the horizon when every span is simply removed:
    `[prefix][horizon]` at positions 0..P+H-1 (needs P >= 1)."""
    if n_prefix < 1:
        raise ValueError("a dropped span needs a prefix to predict the first horizon token")
    seq = torch.cat([ids[:, :n_prefix], ids[:, -horizon:]], dim=1)
    return run_model(base, base.embed(seq), 0, None, horizon + 1)[0][:, :-1]


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
