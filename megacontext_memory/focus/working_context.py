"""WorkingContext: a left-to-right tiling of the whole history at mixed levels of detail.

An entry is either a raw block (level 0: up to 32 tokens, each costing one position) or a
gist (level >= 1: one tree node, one position). The newest, incomplete block is raw.

With `shown_levels` set, gists above that level still tile the history (the focus scores,
expands and collapses them) but the reader is not shown them, and they cost no position.

`plain` names the level-1 gists shown as GistNet made them, not refined in their context
(a turn fits at most `Config.gist_refine_per_turn`). They stay plain while they stay in the
context, so the KV cache of what follows them stays valid; the focus moving one drops it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import BLOCK_SIZE as K
from ..tree import MegaContextTree


class InvariantError(AssertionError):
    """The working context broke one of the invariants of the design (DESIGN.md §2)."""


@dataclass(frozen=True)
class Entry:
    level: int  # 0: raw tokens of block `index`; >= 1: gist node `index` of that level
    index: int
    start: int  # token span [start, end)
    end: int

    @property
    def cost(self) -> int:
        return self.end - self.start if self.level == 0 else 1

    @classmethod
    def node(cls, level: int, index: int, n_tokens: int) -> Entry:
        """The entry for gist node (level, index), or for raw block `index` when level is 0."""
        start, end = MegaContextTree.span(max(level, 1), index)
        return cls(level, index, start, min(end, n_tokens) if level == 0 else end)


class WorkingContext:
    """The entries the frozen model sees, in time order."""

    def __init__(self, entries: list[Entry] | None = None, shown_levels: int | None = None):
        self.entries: list[Entry] = list(entries or [])
        self.shown_levels = shown_levels  # None: every level is shown
        self.plain: set[int] = set()  # level-1 gists shown unrefined (see the module doc)

    def shown(self, e: Entry) -> bool:
        return self.shown_levels is None or e.level <= self.shown_levels

    def cost(self, e: Entry) -> int:
        """Positions `e` takes: its tokens when raw, one when a shown gist, else none."""
        return e.cost if self.shown(e) else 0

    def growth(self, i: int, n_tokens: int) -> int:
        """Positions expanding entry `i` (a gist) adds."""
        e = self.entries[i]
        if e.level == 1:
            children = [Entry.node(0, e.index, n_tokens)]
        else:
            children = [Entry.node(e.level - 1, e.index * K, n_tokens)] * K
        return sum(self.cost(c) for c in children) - self.cost(e)

    @classmethod
    def coarse(
        cls,
        tree: MegaContextTree,
        raw_tokens: int,
        pinned: list[tuple[int, int]] = (),
        shown_levels: int | None = None,
    ) -> WorkingContext:
        """A fresh tiling in one pass: the blocks of the `pinned` token spans and the newest
        ~`raw_tokens` raw, everything else as the largest complete tree nodes. Refocusing
        refines it."""
        n = tree.n_tokens
        raw_from = max(0, n - raw_tokens) // K * K

        def free(start: int, end: int) -> bool:
            return not any(lo < end and start < hi for lo, hi in pinned)

        entries, pos = [], 0
        while pos < raw_from:
            if not free(pos, pos + K):
                entries.append(Entry.node(0, pos // K, n))
                pos += K
                continue
            level = 1
            while (
                pos % K ** (level + 1) == 0
                and pos // K ** (level + 1) < tree.count(level + 1)
                and pos + K ** (level + 1) <= raw_from
                and free(pos, pos + K ** (level + 1))
            ):
                level += 1
            entries.append(Entry.node(level, pos // K**level, n))
            pos += K**level
        entries += [Entry.node(0, b, n) for b in range(pos // K, -(-n // K))]
        return cls(entries, shown_levels)

    def __len__(self) -> int:
        """Positions in use (raw tokens count one each, shown gists one each)."""
        return sum(self.cost(e) for e in self.entries)

    def __iter__(self):
        return iter(self.entries)

    def per_level(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for e in self.entries:
            if self.shown(e):
                out[e.level] = out.get(e.level, 0) + e.cost
        return dict(sorted(out.items()))

    @property
    def n_tokens(self) -> int:
        return self.entries[-1].end if self.entries else 0

    def extend(self, n_tokens: int) -> None:
        """Cover newly appended tokens with raw blocks (the old partial tail is redone)."""
        if self.entries and self.entries[-1].level == 0 and self.entries[-1].cost < K:
            self.entries.pop()
        start = self.n_tokens
        for block in range(start // K, -(-n_tokens // K)):
            self.entries.append(Entry.node(0, block, n_tokens))

    def position_keys(self, tree: MegaContextTree, version: str) -> list[tuple]:
        """One hashable key per position, to find the prefix a KV cache can keep."""
        keys: list[tuple] = []
        for e in filter(self.shown, self.entries):
            if e.level == 0:
                toks = tree.tokens(e.start, e.end)
                keys.extend((0, e.start + i, int(t)) for i, t in enumerate(toks))
            else:
                keys.append((e.level, e.index, version, e.level == 1 and e.index in self.plain))
        return keys

    def embeddings(self, tree: MegaContextTree, base) -> torch.Tensor:
        """[positions, d] inputs_embeds: token embeddings for raw entries, gists as shown
        (`MegaContextTree.shown_gists`: level-1 gists refined in their context, except
        those in `plain`)."""
        parts: list[torch.Tensor] = []
        for level, run in _runs(list(filter(self.shown, self.entries))):
            if level == 0:
                ids = tree.tokens(run[0].start, run[-1].end)
                parts.append(base.embed(torch.as_tensor(ids)))
            else:
                vecs = tree.shown_gists(level, [e.index for e in run], self.plain)
                parts.append(torch.as_tensor(vecs, device=base.device))
        if not parts:
            return torch.zeros(0, base.width, dtype=base.dtype, device=base.device)
        return torch.cat(parts).to(base.dtype)

    def level_map(self, n_tokens: int) -> np.ndarray:
        """The level each history token is shown at (for focus maps)."""
        out = np.zeros(n_tokens, np.int8)
        for e in self.entries:
            out[e.start : e.end] = e.level
        return out


def _runs(entries: list[Entry]):
    """Consecutive entries of one level, so each run is one read and one tensor."""
    run: list[Entry] = []
    for e in entries:
        if run and (e.level != run[-1].level or e.start != run[-1].end):
            yield run[-1].level, run
            run = []
        run.append(e)
    if run:
        yield run[-1].level, run


def check_invariants(
    wc: WorkingContext, tree: MegaContextTree, budget: int | None, recent_raw: int
) -> None:
    """Raise InvariantError unless `wc` is a legal working context for `tree`.

    `budget=None` skips the budget check (used between the moves of one collapse pass).
    """
    n = tree.n_tokens
    pos = 0
    for i, e in enumerate(wc.entries):
        if e.start != pos:
            raise InvariantError(f"entry {i} {e} starts at {e.start}, expected {pos} (gap/overlap)")
        start, end = MegaContextTree.span(max(e.level, 1), e.index)
        if e.level == 0:
            if (e.start, e.end) != (start, min(end, n)):
                raise InvariantError(f"raw entry {i} {e} is not block-aligned")
        else:
            if e.index >= tree.count(e.level):
                raise InvariantError(f"gist entry {i} {e} names a node the tree does not have")
            if (e.start, e.end) != (start, end):
                raise InvariantError(f"gist entry {i} {e} does not cover exactly its node")
        pos = e.end
    if pos != n:
        raise InvariantError(f"working context covers [0, {pos}) but the history has {n} tokens")
    used = len(wc)
    if budget is not None and used > budget:
        raise InvariantError(f"working context uses {used} positions, budget is {budget}")
    protected = max(0, n - recent_raw)
    for e in wc.entries:
        if e.level > 0 and e.end > protected:
            raise InvariantError(f"gist {e} overlaps the recent window [{protected}, {n})")
        if e.level > 0 and e.end > n // K * K:
            raise InvariantError(f"gist {e} overlaps the raw tail")
