"""Prefill a working context, reusing what the KV cache of the last one still holds.

A refocus changes a few entries of the working context, usually early in it (the fact a
question needs is old), and every entry after a change moves to a new position. Two ways
to reuse the cache across that:

- "prefix": keep the cached prefix up to the first changed entry and prefill everything
  after it. Exact (the same logits as a fresh prefill), but a move near the start costs a
  full prefill.
- "shift": keep every unchanged entry, its key rotated to its new position (rotary
  embeddings compose: rotating a cached key by `delta` places it at `position + delta`),
  and prefill only the changed entries and the new tokens, in one forward pass whose mask
  lets each of them attend to what precedes it in the new order. The kept entries keep
  the keys and values they were computed with, in a context that differed only in how
  much detail a few spans showed: the approximation a gist already makes. The first
  layer's keys and values are exact either way.

The cache remembers how many of its leading positions are exact (as a fresh prefill would
make them): "prefix" keeps no more than those, so a "prefix" turn after "shift" turns
makes the whole window exact again. The engine does that every `kv_refresh_turns` turns,
so the approximation never ages past them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers import DynamicCache


class Prefilled(NamedTuple):
    logits: torch.Tensor  # [1, 1, V]: the last position's
    cache: DynamicCache
    reused: int  # positions taken from the old cache
    exact: int  # leading positions whose keys and values equal a fresh prefill's


def plan(old: list, new: list, mode: str, exact: int | None = None) -> list[int | None]:
    """For each position of `new`, the position of `old` (the keys the cache holds, one per
    position) whose keys and values it reuses, or None to compute it. "prefix" reuses the
    common prefix only, and no more than its first `exact` positions; the last position is
    always computed: its logits lead the reply."""
    last = len(new) - 1
    limit = min(len(old), last)
    if mode == "prefix" and exact is not None:
        limit = min(limit, exact)
    keep = 0
    while keep < limit and old[keep] == new[keep]:
        keep += 1
    where = {k: j for j, k in enumerate(old)} if mode == "shift" else {}
    return [*range(keep), *(where.get(k) for k in new[keep:last]), None]


def prefill(
    base,
    cache: DynamicCache | None,
    old: list,
    new: list,
    embeds: torch.Tensor,
    mode: str,
    exact: int | None = None,
) -> Prefilled:
    """The last position's logits and the cache for `new` (keys, one per position, with
    their input embeddings `embeds` [T, d]); `cache` holds the positions keyed by `old`, the
    first `exact` of them exact (None: all). "shift" falls back to "prefix" for a model
    without plain rotary position embeddings."""
    if cache is None:
        old = []
    exact = len(old) if exact is None else exact
    if mode == "shift" and base.rotary_inv_freq is None:
        mode = "prefix"
    sources = plan(old, new, mode, exact)
    kept = [i for i, j in enumerate(sources) if j is not None]
    fresh = [i for i, j in enumerate(sources) if j is None]
    same = next(i for i, j in enumerate(sources) if j != i)  # positions that stay put
    if same == len(kept):  # a prefix: crop the cache, prefill the rest
        if cache is not None and same:
            cache.crop(same - cache.get_seq_length())
        else:
            cache = None
        positions = torch.arange(same, len(new), device=base.device)[None]
        logits, cache = base.forward(embeds[same:][None], positions, cache)
        return Prefilled(logits, cache, same, len(new) if same <= exact else exact)
    out = DynamicCache()
    kept_at = torch.as_tensor(kept, device=base.device)
    src = torch.as_tensor([sources[i] for i in kept], device=base.device)
    shift = base.key_shift(kept_at - src)
    for layer, cached in enumerate(cache.layers):
        keys = shift(cached.keys[..., src, :])
        out.update(keys, cached.values[..., src, :], layer)
    at = torch.as_tensor(fresh, device=base.device)
    # Each computed position attends to every position before it in the new order (the
    # kept ones first in the cache, then the computed ones) and to itself.
    allowed = torch.cat([kept_at[None, :] < at[:, None], at[None, :] <= at[:, None]], dim=1)
    dtype = base.dtype
    mask = torch.zeros(allowed.shape, dtype=dtype, device=base.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    logits, out = base.forward(embeds[at][None], at[None], out, mask[None, None])
    order = torch.argsort(torch.cat([kept_at, at]))  # back to position order
    for cached in out.layers:
        cached.keys, cached.values = cached.keys[..., order, :], cached.values[..., order, :]
    return Prefilled(logits, out, len(kept), min(exact, same))
