"""Scorers: one signed score per working-context entry (> 0: more detail, < 0: less).

`LensScorer` runs the trained LensNet. `HeuristicScorer` is the hand-made one it is
measured against (`megacontext eval-focus`): lexical relevance of each entry to the newest
query (rare query tokens weigh more, IDF over the session's blocks) plus a recency bonus.

Relevance is read where a fact is written: in a window of `window_blocks` consecutive
blocks (64 tokens). An entry's relevance is that of the best window starting inside it,
so a 32k-token gist scores as high as the note it holds, and the focus can descend to the
note level by level. Counting query tokens anywhere in a wide span instead says nothing
(a token found in 2% of blocks is in half of all 1,024-token spans); that rule
(`window_blocks=0`: a token is evidence only for spans narrow enough not to hold it by
chance, `max_span_chance`) left gists wider than a few thousand tokens unscored, and the
note they hid out of reach. LensNet reads both, as its `lexical` and `window` features.

Relevance is signed. Notes often share one template and differ in a name ("the deadline
for the Marwick project is ...", "... the Harwick project ..."); a small reader shown them
all picks the wrong one about as often as the right one. A window whose query tokens are
a subset of another window's (a sibling lacks the asked name, a superseded note the words
of its update) is a look-alike: its relevance turns negative, and the focus spends the
budget on anything else first, so look-alikes stay gists.

Notes also get updated ("the budget for the Marwick project is now ..."): the update holds
the question's tokens as the note it replaces does, and a small reader shown both often
gives the older value, though told to give the latest. With `prefer_latest`, a window whose
query tokens a later window holds too, all of them and no others, is a look-alike of it.

A match can also be too weak to count. A window holding a word or two of the question ("dog",
"name") but none of what sets the asked fact apart is not evidence, yet scored positive it
is where the budget left after the note goes, and a small reader answers from it ("her dog
Crystal"). With `relevance_floor`, a window matching less than that share of the best
match's query weight (the best before the question itself) counts as no match, and such
text is shown only as recency allows.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from ..config import BLOCK_SIZE as K
from ..models.lensnet import FEATURES
from ..tree import MegaContextTree
from .working_context import WorkingContext


class Scorer(Protocol):
    def score(self, wc: WorkingContext, tree: MegaContextTree, query: list[int]) -> np.ndarray:
        """Signed score per entry of `wc`, given the newest query's token ids."""
        ...


class HeuristicScorer:
    def __init__(
        self,
        recency_scale: float = 1024.0,
        relevance_weight: float = 2.0,
        bias: float = -0.5,
        max_doc_freq: float = 0.05,
        max_span_chance: float = 0.5,
        neighbour_share: float = 0.6,
        window_blocks: int = 2,
        lookalike_share: float = 0.5,
        relevance_floor: float = 0.0,
        prefer_latest: bool = False,
    ):
        # an older note that a later one matches as well as it (an update) is a look-alike
        self.prefer_latest = prefer_latest
        self.window_blocks = window_blocks  # 0: the span rule (see the module docstring)
        self.lookalike_share = lookalike_share  # 1.0: no window is a look-alike
        self.relevance_floor = relevance_floor  # 0: every match counts (LensNet's feature)
        self.neighbour_share = neighbour_share
        self.recency_scale, self.relevance_weight, self.bias = recency_scale, relevance_weight, bias
        self.max_doc_freq = max_doc_freq  # query tokens in more blocks than this are not evidence
        self.max_span_chance = max_span_chance
        self._cache: tuple | None = None
        self._signed: tuple | None = None  # (prefix, query length, signed windows)

    def _presence(self, tree: MegaContextTree, query: list[int]):
        """Prefix sums over blocks of each informative query token, the tokens' weights, and
        the share of blocks that hold each token.

        Incremental: while the query stays the same, only blocks new since the last call
        (and the one that was still filling) are scanned, so each completed block costs
        the same however long the history is.
        """
        terms = np.unique(np.asarray(query, np.int64))
        key = (tree, tuple(terms.tolist()))  # the tree itself: an id() could be reused
        n = tree.n_tokens
        if self._cache is None or self._cache[0] != key or self._cache[1] > n:
            self._cache = (key, 0, np.zeros((len(terms), 0), bool), None)
        _, done, present, result = self._cache
        if done == n and result is not None:
            return result
        first = done // K  # the block that may still have been filling
        toks = tree.tokens(first * K, n)
        new = np.zeros((len(terms), -(-len(toks) // K)), bool)
        if len(terms) and len(toks):
            # one pass over the tokens: each one's term number (-1: not a query term)
            term_of = np.full(int(max(terms.max(), toks.max())) + 1, -1, np.int32)
            term_of[terms] = np.arange(len(terms))
            found = term_of[toks]
            at = np.flatnonzero(found >= 0)
            new[found[at], at // K] = True
        present = np.concatenate([present[:, :first], new], 1)
        nb = -(-n // K)
        df = present.sum(1)
        weight = np.log((nb + 1) / (df + 1))
        weight[(df == 0) | (df > max(1.0, self.max_doc_freq * nb))] = 0.0
        prefix = np.concatenate([np.zeros((len(terms), 1), np.int64), present.cumsum(1)], axis=1)
        result = (prefix, weight, df / max(nb, 1))
        self._cache = (key, n, present, result)
        return result

    def relevance(self, wc: WorkingContext, tree: MegaContextTree, query: list[int]) -> np.ndarray:
        """IDF-weighted share of the query's informative tokens found in each entry: in its
        best window of `window_blocks` blocks, or (0) anywhere in its span."""
        prefix, weight, share = self._presence(tree, query)
        if weight.sum() <= 0:
            return np.zeros(len(wc.entries))
        b0 = np.array([e.start // K for e in wc.entries])
        if self.window_blocks:
            nb = prefix.shape[1] - 1
            window = self._signed_windows(prefix, weight, tree.n_tokens, len(query))
            # Entries tile the history in order: each takes its strongest window (a segment
            # max), signed: a look-alike only where no better match shares the entry.
            at = np.minimum(b0, nb - 1)
            best = np.maximum.reduceat(np.maximum(window, 0.0), at)
            worst = np.maximum.reduceat(np.maximum(-window, 0.0), at)
            rel = np.where(best >= worst, best, -worst)
        else:
            b1 = np.array([-(-e.end // K) for e in wc.entries])
            found = (prefix[:, b1] - prefix[:, b0]) > 0  # [terms, entries]
            by_chance = 1.0 - (1.0 - share[:, None]) ** (b1 - b0)[None, :]
            found &= by_chance <= self.max_span_chance
            rel = (weight[:, None] * found).sum(0) / weight.sum()
        # Facts straddle block edges: a relevant entry lends part of its relevance to its
        # neighbours, so the blocks around a hit come into focus too (look-alikes stay out).
        spill = np.zeros_like(rel)
        spill[1:] = np.maximum(spill[1:], rel[:-1])
        spill[:-1] = np.maximum(spill[:-1], rel[1:])
        return np.where(rel < 0, rel, np.maximum(rel, self.neighbour_share * spill))

    def _signed_windows(
        self, prefix: np.ndarray, weight: np.ndarray, n_tokens: int, query_len: int
    ) -> np.ndarray:
        """Each window's relevance: negative for look-alikes, 0 below the floor. It depends
        on the history and the query alone, so a turn's refocus rounds share it (the same
        `prefix`)."""
        if self._signed is not None and self._signed[0] is prefix and self._signed[1] == query_len:
            return self._signed[2]
        found, window = self._windows(prefix, weight)
        # the question itself (the newest tokens) holds every query token: it is no rival
        asked = max(0, (n_tokens - query_len - K) // K - self.window_blocks + 1)
        window[self._lookalikes(found, weight, window, asked)] *= -1.0
        best = window[:asked].max(initial=0.0)
        window[(window > 0) & (window < self.relevance_floor * best)] = 0.0
        self._signed = (prefix, query_len, window)
        return window

    def _windows(self, prefix: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """found [terms, windows]: each informative query token in each window of
        `window_blocks` blocks (window b starts at block b); and each window's IDF-weighted
        share of the query."""
        nb = prefix.shape[1] - 1
        starts = np.arange(nb)
        ends = np.minimum(starts + max(self.window_blocks, 1), nb)
        found = (prefix[:, ends] - prefix[:, starts]) > 0
        return found, (weight[:, None] * found).sum(0) / max(weight.sum(), 1e-12)

    def window_matches(self, tree: MegaContextTree, query: list[int]) -> np.ndarray:
        """Per block b, the share of the query's informative tokens found in blocks b to
        b + `window_blocks` - 1 (unsigned; 0 everywhere when no token is informative)."""
        prefix, weight, _ = self._presence(tree, query)
        return self._windows(prefix, weight)[1]

    def _lookalikes(
        self, found: np.ndarray, weight: np.ndarray, window: np.ndarray, asked: int
    ) -> np.ndarray:
        """Windows that look like the answer but are not: each holds at least
        `lookalike_share` of the query weight of a window elsewhere (not overlapping it)
        that holds every query token this one holds and more, and starts before the
        window `asked`, where the question itself begins.

        Several notes often share one template ("the deadline for the Marwick project is
        ...") and differ in a name; the question names one. The notes that miss its name
        are the ones a small reader confuses with the answer, so they stay gists. A window
        that merely shares a few of the question's words is no look-alike, nor is one that
        a window overlapping it covers (a note straddling a block edge is seen whole only
        by the window that starts before the edge). With `prefer_latest`, a window holding
        at least `lookalike_share` of the best window's query weight is a look-alike of a
        later one that holds exactly its query tokens (the note an update replaces).
        """
        out = np.zeros(len(window), bool)
        if self.lookalike_share >= 1.0:
            return out
        cand = np.flatnonzero(window > 0)
        cand = cand[np.argsort(-window[cand], kind="stable")[:512]]  # the strongest matches
        if len(cand) < 2:
            return out
        has = torch.from_numpy(found[:, cand].T.astype(np.float32))  # [cand, terms]
        wmask = torch.from_numpy((weight > 0).astype(np.float32))
        # missing[w, v]: informative terms window w holds and window v lacks. A torch
        # product, not numpy's: numpy's BLAS threads spin for a while after each call and
        # on a small CPU took a core from the model's prefill and decoding (README, "numpy's
        # BLAS threads").
        missing = ((has * wmask) @ (1.0 - has).T).numpy()
        strict = window[cand][None, :] > window[cand][:, None]  # v holds more weight than w
        near = np.abs(cand[:, None] - cand[None, :]) < self.window_blocks  # overlapping
        close = window[cand][:, None] >= self.lookalike_share * window[cand][None, :]
        before = cand[None, :] < asked  # windows from `asked` on hold the question
        alike = ((missing == 0) & strict & ~near & close & before).any(1)
        if self.prefer_latest:  # the same query tokens again, later: an update of the note
            same = (missing == 0) & (missing.T == 0) & (cand[None, :] > cand[:, None])
            strong = window[cand] >= self.lookalike_share * window[cand].max()
            alike |= (same & ~near & before).any(1) & strong
        # ... unless a window overlapping it holds all it holds and more and is no look-alike
        # itself: then it is a piece of a better match (the tail of the answer note, whose
        # own windows only see part of it), not a rival.
        part = ((missing == 0) & strict & near & ~alike[None, :]).any(1)
        out[cand[alike & ~part]] = True
        return out

    def score(self, wc: WorkingContext, tree: MegaContextTree, query: list[int]) -> np.ndarray:
        ends = np.array([e.end for e in wc.entries], np.float64)
        recency = np.exp(-(tree.n_tokens - ends) / self.recency_scale)
        rel = self.relevance(wc, tree, query)
        return self.relevance_weight * rel + recency + self.bias


class LensScorer:
    """LensNet's scores (`models/lensnet.py`), from inputs computed here at each refocus:
    the entries' tokens (raw blocks and L1 gists) or gists (wider nodes), matched against
    the question's token embeddings, plus the heuristic's lexical matches and the geometry."""

    def __init__(self, net, base):
        self.net, self.base = net.eval(), base
        self.lexical = HeuristicScorer(window_blocks=0)  # the span rule
        self.window = HeuristicScorer()  # the windowed, signed relevance

    @torch.no_grad()
    def inputs(self, wc: WorkingContext, tree: MegaContextTree, query: list[int]) -> dict:
        """The LensNet inputs for `wc` (numpy arrays; see `LensNet.forward`)."""
        entries, d = wc.entries, self.base.width
        n = len(entries)
        vectors = np.zeros((n, d), np.float32)
        features = np.zeros((n, len(FEATURES)), np.float32)
        levels = np.array([min(e.level, 3) for e in entries], np.int64)
        q = self.base.embed(query).float() if query else torch.zeros(0, d)
        q = torch.nn.functional.normalize(q, dim=-1)
        qmean = q.mean(0) if len(q) else torch.zeros(d)
        near = [i for i, e in enumerate(entries) if e.level <= 1]
        if near:
            ids = np.zeros((len(near), K), np.int64)
            valid = np.zeros((len(near), K), bool)
            for row, i in enumerate(near):
                toks = tree.tokens(entries[i].start, entries[i].end)
                ids[row, : len(toks)], valid[row, : len(toks)] = toks, True
            emb = torch.nn.functional.normalize(self.base.embed(ids).float(), dim=-1)
            emb = emb * torch.as_tensor(valid)[..., None]
            vectors[near] = (emb.sum(1) / torch.as_tensor(valid.sum(1, keepdims=True))).numpy()
            if len(q):
                sim = torch.einsum("qd,mkd->mqk", q, emb).masked_fill(
                    ~torch.as_tensor(valid)[:, None], -1.0
                )
                best = sim.max(-1).values  # [entries, query tokens]
                top = best.topk(min(3, best.shape[1]), dim=-1).values
                col = {name: FEATURES.index(name) for name in FEATURES}
                features[near, col["maxsim_mean"]] = best.mean(-1).numpy()
                features[near, col["maxsim_max"]] = best.max(-1).values.numpy()
                features[near, col["maxsim_top3"]] = top.mean(-1).numpy()
        for level in sorted({e.level for e in entries if e.level >= 2}):
            rows = [i for i, e in enumerate(entries) if e.level == level]
            vectors[rows] = tree.gist_vectors(level, [entries[i].index for i in rows])
        unit = torch.nn.functional.normalize(torch.as_tensor(vectors), dim=-1)
        features[:, FEATURES.index("cosine")] = (unit @ qmean).numpy()
        features[:, FEATURES.index("lexical")] = self.lexical.relevance(wc, tree, query)
        features[:, FEATURES.index("window")] = self.window.relevance(wc, tree, query)
        ends = np.array([e.end for e in entries], np.float64)
        spans = np.array([e.end - e.start for e in entries], np.float64)
        features[:, FEATURES.index("distance")] = np.log2(1 + (tree.n_tokens - ends) / K)
        features[:, FEATURES.index("width")] = np.log2(np.maximum(spans, 1) / K + 1)
        features[:, FEATURES.index("raw")] = levels == 0
        return {"vectors": vectors, "query": qmean.numpy(), "features": features, "levels": levels}

    @torch.no_grad()
    def score(self, wc: WorkingContext, tree: MegaContextTree, query: list[int]) -> np.ndarray:
        x = self.inputs(wc, tree, query)
        out = self.net(
            torch.as_tensor(x["vectors"])[None],
            torch.as_tensor(x["query"])[None],
            torch.as_tensor(x["features"])[None],
            torch.as_tensor(x["levels"])[None],
        )
        return out[0].numpy().astype(np.float64)
