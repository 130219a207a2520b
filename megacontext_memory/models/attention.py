"""Attention for the frozen model on CPU: SDPA, except for one query token.

Decoding feeds one token at a time, and SDPA's CPU kernel then spends more on setting up its
blocks than on the arithmetic (a 1 x ~1,000 score row per head). Two small matrix products in
float32 do the same for less: bfloat16 decoding a third faster (`bench latency`, README).
Registered with transformers as `NAME`; the masks are SDPA's.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "megacontext_cpu"


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, H, Q, D], key and value [B, KV, T, D] -> ([B, Q, H, D], None). One query
    token attends to every key it is allowed (the mask, if any, is SDPA's: boolean keep or
    additive); longer queries go to SDPA."""
    batch, heads, q_len, dim = query.shape
    if q_len != 1 or module.training:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    kv_heads = key.shape[1]
    scale = dim**-0.5 if scaling is None else scaling
    # Grouped-query attention without copying the keys: each key head serves its group.
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim).float()
    scores = torch.matmul(grouped, key.transpose(2, 3).float()) * scale
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    out = torch.matmul(scores.softmax(-1), value.float()).to(value.dtype)
    return out.reshape(batch, 1, heads, dim), None


AttentionInterface.register(NAME, attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
