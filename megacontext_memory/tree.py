"""MegaContextTree: one session's history as tokens (level 0) and gists above.

Node `i` of level `l` stands for tokens [i * 32**l, (i + 1) * 32**l). An append commits
the messages and their tokens and returns; the gists lag behind. `make_gists` then gists,
in batches, every block and every group of 32 gists completed since it last ran, level by
level (a refocus needs them, so the engine calls it before every turn). A crash in between
loses nothing: the tokens are committed and the gists are made on the next call.

The store holds GistNet's gists. With a refinement set (`Config.gist_refine_steps`), a
level-1 gist is shown refined in its context (`shown_gists`), fitted the first time a
working context shows it and kept in the store's cache of refined gists.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import numpy as np

from .config import BLOCK_SIZE
from .gisting import Gister
from .store import GistVersionMismatch, Message, SessionStore
from .store.sqlite import NEEDS_REGIST

K = BLOCK_SIZE
ROUND_BLOCKS = 512  # `make_gists` commits after at most this many level-1 gists
REFINED_KEPT = 4096  # refined level-1 gists kept in memory (the store keeps them all)


class MegaContextTree:
    """One session's tree. Its gists are of one GistNet version: a session whose gists
    another version made is refused (GistVersionMismatch) unless opened with
    `reindex=True` (`megacontext reindex`), so two engines never re-gist under each other."""

    def __init__(self, store: SessionStore, gister: Gister, reindex: bool = False):
        self.store, self.gister = store, gister
        self.counts: dict[int, int] = {}
        self.version = ""
        # level-1 gists as shown, by block, least recently shown first
        self._refined: dict[int, np.ndarray] = {}
        with store.lock():
            self.refresh(prepare=True)
            self._check_version(reindex)

    def refresh(self, prepare: bool = False) -> None:
        """Reload committed extents (another process may have appended). Raises
        SessionDeleted when the session is no longer the incarnation this tree was opened on."""
        self.counts, self.version = self.store._prepare() if prepare else self.store.state()
        n, have = self.counts.get(0, 0), len(getattr(self, "_tokens", ()))
        if n < have or have == 0:
            self._tokens = self.store.tokens(0, n)
        elif n > have:  # read only what other writers added
            self._tokens = np.concatenate([self._tokens, self.store.tokens(have, n)])
        else:
            return
        self.store.row()  # the tokens just read are still this incarnation's

    def sync(self) -> None:
        """Catch up with other writers; refuses gists of another GistNet version."""
        self.refresh()
        if self.version != self.gister.version:
            with self.store.lock():
                self.refresh(prepare=True)
                self._check_version()

    def reindex(self, force: bool = False) -> bool:
        """Re-gist with this tree's GistNet if the session holds another's (or `force`)."""
        with self.store.lock():
            self.refresh(prepare=True)
            if force or self.version != self.gister.version:
                self.regist()
                return True
            return False

    def _check_version(self, reindex: bool = False) -> None:
        """Under the lock: gists must be this GistNet's. Nothing to rewrite (no gists yet,
        or gists dropped by `fsck --repair`) is adopted at once; anything else is refused
        unless `reindex`."""
        if self.version == self.gister.version:
            return
        if reindex or self.version == NEEDS_REGIST or not self.count(1):
            self.regist()
            return
        path = self.store.store.path
        raise GistVersionMismatch(
            f"session {self.store.id!r} holds gists of GistNet {self.version!r}, but this "
            f"engine uses {self.gister.version!r} (another checkpoint); re-gist it with "
            f"`megacontext reindex --store {path}` and the settings to use, or open it with "
            "the settings that made it"
        )

    # ---- queries ----------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return self.counts.get(0, 0)

    def count(self, level: int) -> int:
        return self.counts.get(level, 0)

    @property
    def top_level(self) -> int:
        return max((lv for lv, c in self.counts.items() if c), default=0)

    @staticmethod
    def span(level: int, index: int) -> tuple[int, int]:
        width = K**level
        return index * width, (index + 1) * width

    def tokens(self, start: int = 0, end: int | None = None) -> np.ndarray:
        return self._tokens[start : self.n_tokens if end is None else end]

    def gist_vectors(self, level: int, indices: list[int]) -> np.ndarray:
        """Stored gists [len(indices), d] of `level`, read a run of neighbours at a time (a
        working context's gists are spread over the whole history; only they are read)."""
        if not indices:
            return np.zeros((0, self.store.width), np.float32)
        wanted = np.asarray(indices)
        have = np.unique(wanted)
        runs = np.split(have, np.flatnonzero(np.diff(have) > 1) + 1)
        v = self.gister.version
        rows = [self.store.gists(level, int(r[0]), int(r[-1]) + 1, version=v) for r in runs]
        return np.concatenate(rows)[np.searchsorted(have, wanted)].astype(np.float32)

    def unrefined(self, indices: list[int]) -> list[int]:
        """The level-1 gists among `indices` that have no fit yet, in memory or in the
        store (a session's first block never gets one); [] when no refinement is set."""
        if not self.gister.refine_version:
            return []
        todo = [i for i in dict.fromkeys(indices) if i > 0 and i not in self._refined]
        if todo:
            self._refined.update(self.store.refined(todo, self.gister.refine_version))
        return [i for i in todo if i not in self._refined]

    def shown_gists(
        self, level: int, indices: list[int], plain: Collection[int] = ()
    ) -> np.ndarray:
        """Gists [len(indices), d] as a working context shows them: level-1 gists refined in
        the context of the block before each (all but a session's first block), refined now
        where no earlier turn (of any process) did, except those in `plain`, shown as
        GistNet made them; other levels as stored."""
        fit = self.gister.refine_version
        if level != 1 or not fit:
            return self.gist_vectors(level, indices)
        todo = self.unrefined([i for i in indices if i not in plain])  # plain: no lookup
        if todo:
            blocks = np.stack([self._tokens[i * K : (i + 1) * K] for i in todo])
            context = np.stack([self._tokens[(i - 1) * K : i * K] for i in todo])
            made = self.gister.refine(self.gist_vectors(1, todo), context, blocks)
            fresh = dict(zip(todo, made, strict=True))
            self.store.add_refined(fresh, fit, self.gister.version)
            self._refined.update(fresh)
        out = self.gist_vectors(1, indices)
        for row, i in enumerate(indices):
            if i in self._refined and i not in plain:
                out[row] = self._refined[i] = self._refined.pop(i)  # now the newest used
        while len(self._refined) > REFINED_KEPT:  # drop the least recently shown
            del self._refined[next(iter(self._refined))]
        return out

    @property
    def missing(self) -> int:
        """Blocks and nodes completed but not gisted yet (`make_gists` makes them)."""
        total, level, children = 0, 1, self.n_tokens
        while children >= K:
            total += children // K - self.count(level)
            level, children = level + 1, children // K
        return total

    # ---- writes -----------------------------------------------------------------------
    def append(self, role: str, content: str, metadata: dict, ids: list[int]) -> Message:
        """Durably append one message and its tokens (its gists come with `make_gists`)."""
        return self.extend([(role, content, metadata, ids, None)])[0]

    def extend(self, messages: list[tuple]) -> list[Message]:
        """Durably append `(role, content, metadata, token ids, created or None)` messages
        in one commit."""
        with self.store.lock():
            out = self.store.extend(messages)
            self.refresh()
        return out

    def make_gists(self, progress: Callable[[int], None] | None = None) -> int:
        """Gist everything completed since the last gisting, in batches; returns how many
        gists were made.

        Rounds of at most `ROUND_BLOCKS` blocks (and the nodes they complete) are each
        computed outside the store's lock (other processes go on appending) and committed
        under it, unless another process committed them first; so a long backlog keeps
        its progress through a crash. `progress(tokens)` hears of each round committed.
        """
        self.sync()
        made = 0
        while self.missing:
            based_on, version = dict(self.counts), self.version
            gists = self._new_gists(ROUND_BLOCKS)
            with self.store.lock():
                self.refresh(prepare=True)
                self._check_version()  # another process may have re-gisted: never mix
                if version != self.version or any(
                    self.count(lv) != based_on.get(lv, 0) for lv in gists
                ):
                    continue  # someone else gisted meanwhile: start from what they did
                self.store.add_gists(gists, self.gister.version)
                for level, arr in gists.items():
                    self.counts[level] = self.count(level) + len(arr)
                made += sum(len(arr) for arr in gists.values())
            if progress is not None:
                progress(len(gists.get(1, ())) * K)
        return made

    def _new_gists(self, max_blocks: int) -> dict[int, np.ndarray]:
        """The gists missing from the committed state: the next `max_blocks` blocks at
        level 1, and every node above that they (or earlier gists) complete."""
        out: dict[int, np.ndarray] = {}
        tokens, have = self._tokens, self.count(1)
        full = min(self.n_tokens // K, have + max_blocks)
        if full > have:
            out[1] = self.gister.gists(1, tokens[have * K : full * K].reshape(-1, K))
        level = 1
        while True:
            total = self.count(level) + len(out.get(level, ()))
            have_up = self.count(level + 1)
            if total // K <= have_up:
                break
            lo, hi = have_up * K, (total // K) * K
            stored = self.store.gists(level, lo, min(hi, self.count(level))).astype(np.float32)
            fresh = out.get(level, np.zeros((0, self.store.width)))
            first_new = self.count(level)
            children = np.concatenate([stored, fresh[max(0, lo - first_new) : hi - first_new]])
            out[level + 1] = self.gister.gists(level + 1, children.reshape(-1, K, self.store.width))
            level += 1
        return out

    def regist(self) -> None:
        """Rebuild every gist level with the current GistNet (under the lock)."""
        tokens = self.tokens()
        gists: dict[int, np.ndarray] = {}
        children, level = tokens[: len(tokens) // K * K].reshape(-1, K), 1
        while len(children):
            gists[level] = self.gister.gists(level, children)
            n = len(gists[level]) // K * K
            children = gists[level][:n].astype(np.float32).reshape(-1, K, self.store.width)
            level += 1
        self.store.replace_gists(gists, self.gister.version)
        self._refined.clear()
        self.refresh()
