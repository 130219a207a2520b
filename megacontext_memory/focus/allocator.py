"""FocusAllocator: turns signed scores into legal expand/collapse moves under a hard budget.

Expanding a gist replaces it with its 32 children (+31 positions); collapsing 32 siblings
(or one raw block) replaces them with their parent (-31); gists the reader is not shown
cost nothing (`WorkingContext.shown_levels`). Moves never touch the tree.

The budget is there to be used. A refocus round, at most `max_moves` moves:
1. makes room when the working context is over budget: it collapses the lowest-scored
   (then oldest) spans down to `room(budget)`, a little under the budget, so the tokens of
   the next turns fit without a move (each move's new entries must be prefilled);
2. fills: free positions up to `room(budget)` go to the best-scored expansions, whatever
   their sign, so a context shown before a reply uses at least 90% of its budget;
3. swaps: otherwise, the best expansion replaces the lowest-scored collapse when it
   scores above zero and higher by more than `tau_expand`.
A score below zero is never a reason to collapse on its own, nor one at or below zero a
reason to expand in place of what is shown: the scorer asked for no more detail there, and
a swap costs a prefill of the expanded span (32 positions). Among spans that all ask for
less, swapping the less irrelevant in for the more irrelevant churned hundreds of positions
a turn on long histories and showed the reader nothing it needed. Ingest calls `fit` (collapse
until the budget holds) and rounds with `fill=False`: filling is for the context a reply
reads, and positions filled between replies would only be taken back by the next one.

A refocus event may be given an allowance: the positions its moves may newly show (the
entries expansions and swaps bring in, each prefilled before the reply). The engine gives
`Config.open_per_turn` when it holds a KV cache to reuse: a new question on a deep tree
would otherwise open a dozen spans of equal promise at once, and the prefill, not the
budget, would set the turn's cost. Under an allowance a round makes one expansion, so the
next is chosen on fresh scores: the allowance goes down the best path (a note's gist, then
its blocks) before it goes to the note's neighbours. What an event leaves closed, the next
ones may open.

A cooldown counts refocus events (one before each reply, one per message that completes a
block), not the rounds inside one, so a node moved in an event stays put for the rest of
it: otherwise rounds of one event undo each other and every turn prefills what they
churned. Collapses that make room do not start a cooldown: a span pushed out by new tokens
may come back as soon as a question asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import BLOCK_SIZE as K
from ..config import Config
from ..tree import MegaContextTree
from .working_context import Entry, WorkingContext


class BudgetError(RuntimeError):
    """Nothing more can be collapsed, yet the working context is over budget."""


@dataclass(frozen=True)
class Move:
    kind: str  # "expand" or "collapse"
    level: int  # the node expanded, or the parent a collapse produced
    index: int
    score: float


@dataclass(frozen=True)
class _Collapse:
    first: int  # entry index of the first child
    n: int  # number of entries replaced (1 for a raw block, 32 for gists)
    parent: Entry
    score: float


def room(budget: int) -> int:
    """Positions a refocus fills up to and makes room down to: the budget less a slack.

    One move changes 31 positions, so filling up to `room` leaves the context at least
    `room - 30` long; the slack is the most that keeps that at 90% of the budget.
    """
    return budget - max(0, budget // 10 - (K - 1))


class FocusAllocator:
    def __init__(self, config: Config):
        self.config = config
        self.tick = 0  # refocus events so far
        self.moved_at: dict[tuple[int, int], int] = {}
        self.opened = 0  # positions this refocus event's moves newly show ...
        self.allowance = float("inf")  # ... and how many they may
        # token spans that stay raw: the newest system message of each slot
        self.pinned: list[tuple[int, int]] = []

    # ---- candidates -------------------------------------------------------------------
    def _cooling(self, level: int, index: int) -> bool:
        last = self.moved_at.get((level, index))
        return last is not None and self.tick - last <= self.config.cooldown

    def collapses(
        self, wc: WorkingContext, tree: MegaContextTree, scores: np.ndarray
    ) -> list[_Collapse]:
        """Every legal collapse, lowest score (then oldest) first."""
        protected = max(0, tree.n_tokens - self.config.recent_raw)
        n_tok = tree.n_tokens
        out = []
        entries = wc.entries
        for i, e in enumerate(entries):
            if any(lo < e.end and e.start < hi for lo, hi in self.pinned):
                continue
            if e.level == 0:
                if e.cost == K and e.end <= protected and e.index < tree.count(1):
                    parent = Entry.node(1, e.index, n_tok)
                    out.append(_Collapse(i, 1, parent, float(scores[i])))
            elif e.index % K == 0 and i + K <= len(entries):
                group = entries[i : i + K]
                if all(g.level == e.level for g in group) and group[-1].index == e.index + K - 1:
                    p = e.index // K
                    if p < tree.count(e.level + 1) and group[-1].end <= protected:
                        score = float(np.mean(scores[i : i + K]))
                        out.append(_Collapse(i, K, Entry.node(e.level + 1, p, n_tok), score))
        out.sort(key=lambda c: (c.score, c.parent.start))
        return out

    def expansions(self, wc: WorkingContext, scores, unscored: set = frozenset()) -> list[int]:
        """Entry indices of the gists that may expand, best-scored first.

        Entries in `unscored` (children of this round's expansions) wait for the next
        round's scores rather than being opened on their parent's.
        """
        idx = [
            i
            for i, e in enumerate(wc.entries)
            if e.level > 0 and e not in unscored and not self._cooling(e.level, e.index)
        ]
        return sorted(idx, key=lambda i: -scores[i])

    def new_event(self, allowance: int | None = None) -> None:
        """A refocus event begins (its rounds share one tick of the cooldown), its moves
        newly showing at most `allowance` positions (None: no limit). Nodes whose
        cooldown is over are forgotten: the record stays as small as the recent moves
        however long the session runs."""
        self.tick += 1
        self.opened = 0
        self.allowance = float("inf") if allowance is None else allowance
        cooldown = self.config.cooldown
        self.moved_at = {k: t for k, t in self.moved_at.items() if self.tick - t <= cooldown}

    # ---- moves ------------------------------------------------------------------------
    def _expand(self, wc: WorkingContext, i: int, scores: list[float], n_tok: int) -> Move:
        e = wc.entries[i]
        if e.level == 1:  # an L1 gist opens into its one raw block of 32 tokens
            children = [Entry.node(0, e.index, n_tok)]
        else:
            children = [Entry.node(e.level - 1, e.index * K + j, n_tok) for j in range(K)]
        score = scores[i]
        wc.entries[i : i + 1] = children
        scores[i : i + 1] = [score] * len(children)
        self.moved_at[(e.level, e.index)] = self.tick
        return Move("expand", e.level, e.index, float(score))

    def _collapse(
        self, wc: WorkingContext, c: _Collapse, scores: list[float], cool: bool = True
    ) -> Move:
        wc.entries[c.first : c.first + c.n] = [c.parent]
        scores[c.first : c.first + c.n] = [c.score]
        if cool:  # collapses that make room do not stop a node from coming back into focus
            self.moved_at[(c.parent.level, c.parent.index)] = self.tick
        return Move("collapse", c.parent.level, c.parent.index, c.score)

    def fit(
        self, wc: WorkingContext, tree: MegaContextTree, budget: int, scores=None
    ) -> list[Move]:
        """Collapse until `len(wc) <= budget`, lowest-scored first (oldest when unscored)."""
        s = [0.0] * len(wc.entries) if scores is None else [float(x) for x in scores]
        return self._fit(wc, tree, budget, s)

    def _fit(self, wc: WorkingContext, tree: MegaContextTree, budget: int, s: list) -> list[Move]:
        moves: list[Move] = []
        while len(wc) > budget:
            options = self.collapses(wc, tree, np.asarray(s))
            if not options:
                raise BudgetError(
                    f"working context needs {len(wc)} positions but nothing more can be "
                    f"collapsed within budget {budget} (recent_raw={self.config.recent_raw})"
                )
            warm = [c for c in options if not self._cooling(c.parent.level, c.parent.index)]
            moves.append(self._collapse(wc, (warm or options)[0], s, cool=False))
        return moves

    def _opens(self, wc: WorkingContext, i: int, n_tokens: int) -> int:
        """Positions expanding entry `i` newly shows (its children's)."""
        return wc.growth(i, n_tokens) + wc.cost(wc.entries[i])

    def _cheapest(self, wc, tree, s: list, keep: int, need: int) -> _Collapse | None:
        """The lowest-scored collapse, not of entry `keep`, that frees `need` positions."""
        for c in self.collapses(wc, tree, np.asarray(s)):
            cooling = self._cooling(c.parent.level, c.parent.index)
            freed = sum(map(wc.cost, wc.entries[c.first : c.first + c.n])) - wc.cost(c.parent)
            if not cooling and not c.first <= keep < c.first + c.n and freed >= need:
                return c
        return None

    def refocus(
        self, wc: WorkingContext, tree: MegaContextTree, scores, budget: int, fill: bool = True
    ) -> list[Move]:
        """One refocus round: make room, fill (unless `fill=False`), then swap; at most
        `max_moves` moves in all (see the module docstring)."""
        s = [float(x) for x in scores]
        limit = room(budget)
        moves = self._fit(wc, tree, limit, s) if len(wc) > budget else []
        unscored: set[Entry] = set()
        while len(moves) < self.config.max_moves:
            left = self.allowance - self.opened
            fits = (
                i
                for i in self.expansions(wc, s, unscored)
                if self._opens(wc, i, tree.n_tokens) <= left
            )
            i = next(fits, None)
            if i is None:
                break
            opens = self._opens(wc, i, tree.n_tokens)
            growth = wc.growth(i, tree.n_tokens)
            if not (fill and len(wc) + growth <= limit):  # no filling: swap, or stop
                c = self._cheapest(wc, tree, s, keep=i, need=len(wc) + growth - budget)
                worth = c is not None and s[i] > 0 and s[i] - c.score > self.config.tau_expand
                if not worth or len(moves) + 2 > self.config.max_moves:
                    break
                if opens + wc.cost(c.parent) > left:
                    break  # the collapse would show its gist too
                moves.append(self._collapse(wc, c, s))
                self.opened += wc.cost(c.parent)
                if c.first < i:
                    i -= c.n - 1
            n_children = 1 if wc.entries[i].level == 1 else K
            self.opened += opens
            moves.append(self._expand(wc, i, s, tree.n_tokens))
            unscored.update(wc.entries[i : i + n_children])
            if self.allowance < float("inf"):
                break  # the next expansion waits for fresh scores (see the module docstring)
        return moves
