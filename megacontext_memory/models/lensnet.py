"""LensNet: one signed focus score per working-context entry, given the newest question.

    per entry: what the entry holds (its tokens' embeddings for a raw block or an L1 gist,
               its gist for a wider node) and cheap match signals against the question
               (per question token, the best cosine to the entry's tokens; the lexical
               matches of `HeuristicScorer`, over the whole span and in the best window
               of two blocks inside it, signed for look-alikes; distance to the end; level)
            -> an MLP, then one layer of self-attention across the entries, so an entry
               is scored against the others (one of four look-alike notes is the one asked
               about, not all four)
            -> a signed score (> 0: worth more detail; < 0: may be collapsed)

It is non-causal by design: the newest question decides which old span matters. It is
trained from counterfactual labels (`training/lens_train.py`): how much the answer's
negative log-likelihood falls when the block is shown raw before the question.
`FEATURES` names the per-entry scalars `focus.scorers.LensScorer.features` computes.
"""

from __future__ import annotations

import torch
from torch import nn

FEATURES = (
    "lexical",  # HeuristicScorer.relevance: IDF-weighted query tokens found in the span
    "maxsim_mean",  # mean over question tokens of the best cosine to the entry's tokens
    "maxsim_max",
    "maxsim_top3",
    "cosine",  # question mean vs the entry's vector
    "distance",  # log2(1 + tokens from the entry's end to the history's end, in blocks)
    "width",  # log2 of the span in blocks
    "raw",  # 1 for a raw block
    # HeuristicScorer's default relevance: the best window of 2 blocks inside the entry,
    # negative for a look-alike. It reaches into gists of any width, which the span rule
    # above leaves unscored beyond a few thousand tokens.
    "window",
)
LEVELS = 4  # levels 0, 1, 2 and 3+ have an embedding each


class LensNet(nn.Module):
    """[entries, width] vectors, [width] question vector, [entries, F] features,
    [entries] levels -> [entries] scores."""

    def __init__(self, width: int, hidden: int = 128, project: int = 64, heads: int = 4):
        super().__init__()
        self.width, self.hidden, self.project_dim = width, hidden, project
        self.entry_proj = nn.Linear(width, project, bias=False)
        self.query_proj = nn.Linear(width, project, bias=False)
        self.level = nn.Embedding(LEVELS, 8)
        self.mlp = nn.Sequential(
            nn.Linear(project + len(FEATURES) + 8, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
        )
        self.norm = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 1))

    def forward(
        self,
        vectors: torch.Tensor,
        query: torch.Tensor,
        features: torch.Tensor,
        levels: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Batched: vectors [B, N, d], query [B, d], features [B, N, F], levels [B, N],
        mask [B, N] (True = a real entry) -> scores [B, N]."""
        v = nn.functional.normalize(vectors.float(), dim=-1)
        q = nn.functional.normalize(query.float(), dim=-1)
        match = self.entry_proj(v) * self.query_proj(q)[:, None]
        lv = self.level(levels.clamp(0, LEVELS - 1))
        h = self.mlp(torch.cat([match, features.float(), lv], -1))
        pad = None if mask is None else ~mask
        a = self.norm(h)
        h = h + self.attn(a, a, a, key_padding_mask=pad, need_weights=False)[0]
        return self.head(h)[..., 0]
