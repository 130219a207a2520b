"""GistNet: 32 vectors in the LLM's input space -> 1 vector in the same space.

    x[32, d] -> down-project to h, + in-block position
                (+ the base model's own states of the block, projected, when it reads them)
             -> `depth` layers of self-attention over the block (bidirectional)
             -> slot A cross-attends to the 32          (32 -> 1)
             -> slot A is broadcast back, the 32 are refined
             -> slot B cross-attends to the refined 32  (32 -> 1)
             -> up-project to d, added to the last input (a skip connection),
                rescaled to the size of real token embeddings

The up-projection starts at zero, so an untrained net outputs (the direction of) the
span's last input: on its own that already recovers a good part of what dropping the span
loses, whereas the mean of the span's embeddings is far worse than dropping it. Training
then adds what the rest of the span contributes.

One GistNet per level: L1 reads token embeddings, L2 reads L1 gists; levels above 2 reuse
the L2 network (gists of gists look alike from there on).

The level-1 net may also read what the frozen base model makes of the block: its hidden
states after its first few layers, the block read alone (`BaseModel.block_states`). They
hold what the model understood of the words, which a small encoder cannot work out from
embeddings alone. `read_features` adds that input at zero, so a trained net starts from
where it was.

`grow` deepens a trained net without changing what it computes: the new self-attention
layers start as the identity (their output projections are zero), so training resumes
from the trained net's quality with more capacity to spend.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import BLOCK_SIZE


class _Block(nn.Module):
    """Pre-norm transformer layer; `context` set = cross-attention, else self-attention."""

    def __init__(self, h: int, heads: int):
        super().__init__()
        self.norm_q = nn.LayerNorm(h)
        self.norm_kv = nn.LayerNorm(h)
        self.attn = nn.MultiheadAttention(h, heads, batch_first=True)
        self.norm_ff = nn.LayerNorm(h)
        self.ff = nn.Sequential(nn.Linear(h, 4 * h), nn.GELU(), nn.Linear(4 * h, h))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        q = self.norm_q(x)
        kv = q if context is None else self.norm_kv(context)
        x = x + self.attn(q, kv, kv, need_weights=False)[0]
        return x + self.ff(self.norm_ff(x))


class GistNet(nn.Module):
    """Compress [..., 32, d] -> [..., d]."""

    def __init__(
        self,
        width: int,
        hidden: int = 384,
        heads: int = 6,
        embed_rms: float = 1.0,
        depth: int = 1,
        features: bool = False,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"GistNet depth must be at least 1, got {depth}")
        self.width, self.hidden = width, hidden
        self.down = nn.Linear(width, hidden)
        self.pos = nn.Parameter(torch.randn(BLOCK_SIZE, hidden) * 0.02)
        self.encode = _Block(hidden, heads)
        self.encode_more = nn.ModuleList(_Block(hidden, heads) for _ in range(depth - 1))
        self.slot_a = nn.Parameter(torch.randn(1, hidden) * 0.02)
        self.pool_a = _Block(hidden, heads)
        self.refine = _Block(hidden, heads)
        self.slot_b = nn.Parameter(torch.randn(1, hidden) * 0.02)
        self.pool_b = _Block(hidden, heads)
        self.up = nn.Linear(hidden, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        # Output is RMS-normalised then scaled: starts at the size of real token embeddings.
        self.log_scale = nn.Parameter(torch.tensor(float(embed_rms)).log())
        self.input_scale = 1.0 / max(embed_rms, 1e-6)
        self.feature_norm: nn.LayerNorm | None = None
        self.feature_in: nn.Linear | None = None
        if features:
            self.read_features()

    def read_features(self) -> None:
        """Add an input for the reader's own hidden states of the block. It starts at zero,
        so a trained net computes the same until training teaches it to use them."""
        if self.feature_in is not None:
            return
        ref = self.down.weight
        self.feature_norm = nn.LayerNorm(self.width).to(ref)
        self.feature_in = nn.Linear(self.width, self.hidden).to(ref)
        nn.init.zeros_(self.feature_in.weight)
        nn.init.zeros_(self.feature_in.bias)

    def forward(self, x: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-2:] != (BLOCK_SIZE, self.width):
            raise ValueError(
                f"GistNet expects [..., {BLOCK_SIZE}, {self.width}], got {tuple(x.shape)}"
            )
        if (features is None) != (self.feature_in is None):
            raise ValueError(
                "this GistNet reads hidden-state features"
                if features is None
                else "this GistNet takes no hidden-state features"
            )
        lead = x.shape[:-2]
        x = x.reshape(-1, BLOCK_SIZE, self.width).to(self.down.weight.dtype)
        h = self.down(x * self.input_scale) + self.pos
        if features is not None:
            f = features.reshape(x.shape).to(x.dtype)
            h = h + self.feature_in(self.feature_norm(f))
        h = self.encode(h)
        for block in self.encode_more:
            h = block(h)
        a = self.pool_a(self.slot_a.expand(h.shape[0], 1, -1), context=h)
        h = self.refine(h + a)
        b = self.pool_b(self.slot_b.expand(h.shape[0], 1, -1) + a, context=h)
        out = self.up(b[:, 0]) + x[:, -1] * self.input_scale
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + 1e-6) * self.log_scale.exp()
        return out.reshape(*lead, self.width)

    @property
    def depth(self) -> int:
        return 1 + len(self.encode_more)

    def grow(self, depth: int) -> None:
        """Add identity-initialised self-attention layers until there are `depth`."""
        if depth < self.depth:
            raise ValueError(f"cannot shrink a depth-{self.depth} GistNet to {depth}")
        ref = self.encode
        while self.depth < depth:
            block = _Block(self.hidden, ref.attn.num_heads).to(ref.norm_q.weight)
            for layer in (block.attn.out_proj, block.ff[-1]):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
            self.encode_more.append(block)


class GistStack(nn.Module):
    """The per-level GistNets of one checkpoint: level 1 and level 2 (reused above 2).

    With `feature_layers` > 0 the level-1 net also reads the base model's hidden states
    after that many layers (`BaseModel.block_states`); `from_tokens` supplies them.
    """

    def __init__(
        self,
        width: int,
        hidden: int = 384,
        heads: int = 6,
        embed_rms: float = 1.0,
        depth: int = 1,
        feature_layers: int = 0,
    ):
        super().__init__()
        self.levels = nn.ModuleList(
            [
                GistNet(
                    width, hidden, heads, embed_rms, depth, features=lv == 1 and feature_layers > 0
                )
                for lv in (1, 2)
            ]
        )
        self.feature_layers = feature_layers

    def read_features(self, layers: int) -> None:
        """Let level 1 read hidden states after `layers` layers (see GistNet.read_features)."""
        if layers < 1:
            raise ValueError(f"feature layers must be at least 1, got {layers}")
        self.levels[0].read_features()
        self.feature_layers = layers

    def from_tokens(self, base, ids: torch.Tensor) -> torch.Tensor:
        """Level-1 gists [..., d] of token blocks [..., 32] (`base` a BaseModel)."""
        features = base.block_states(ids, self.feature_layers) if self.feature_layers else None
        return self.levels[0](base.embed(ids), features)

    def net(self, level: int) -> GistNet:
        if level < 1:
            raise ValueError(f"gists start at level 1, got {level}")
        return self.levels[min(level, 2) - 1]

    def forward(self, children: torch.Tensor, level: int) -> torch.Tensor:
        """Gists of `level` from their 32 children: [..., 32, d] -> [..., d]."""
        return self.net(level)(children)
