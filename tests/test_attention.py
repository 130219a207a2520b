"""The CPU attention for one query token, against SDPA on the real model's first layer."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from megacontext_memory.models import attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_token_attends_as_sdpa_does(base, dtype):
    """Grouped heads, with no mask, a boolean one and an additive one (SDPA's formats)."""
    assert base.model.config._attn_implementation == attention.NAME  # the CPU default
    module = base.model.model.layers[0].self_attn
    heads, kv_heads = base.model.config.num_attention_heads, base.model.config.num_key_value_heads
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    q, k, v = rand(1, heads, 1, 64), rand(1, kv_heads, 300, 64), rand(1, kv_heads, 300, 64)
    keep = torch.rand(1, 1, 1, 300, generator=gen) > 0.3
    additive = torch.zeros(1, 1, 1, 300, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bfloat16 keeps 8 bits
    for mask in (None, keep, additive):
        got, _ = attention.attention(module, q, k, v, mask, scaling=module.scaling)
        want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=module.scaling)
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    # Longer queries are SDPA's own.
    q4 = rand(1, heads, 4, 64)
    got, _ = attention.attention(module, q4, k, v, None, scaling=module.scaling)
    want, _ = sdpa_attention_forward(module, q4, k, v, None, scaling=module.scaling)
    assert torch.equal(got, want)
