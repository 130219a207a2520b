"""MegaContextTree: one session's history as tokens (level 0) and gists above.

Node `i` of level `l` stands for tokens [i * 32**l, (i + 1) * 32**l) and exists once all of
them do. Appending tokens gists every block they complete, then every group of 32 gists
that completes, level by level; payloads and the message row are committed together.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import BLOCK_SIZE
from .models.base import BaseModel
from .models.gistnet import GistStack
from .store import GistVersionMismatch, Message, SessionStore
from .store.sqlite import NEEDS_REGIST
from .training.gist_objective import refine_gists

K = BLOCK_SIZE


class Gister:
    """Turns token blocks and gist groups into gists with one GistStack.

    With `refine` = (steps, lr, tokens) and steps > 0, every level-1 gist that has a block
    before it is then fitted (`refine_gists`) so the model reading [previous block][gist]
    continues as it does after [previous block][block]; the version names the fit, so a
    store never mixes gists made with and without it.
    """

    def __init__(
        self,
        base: BaseModel,
        stack: GistStack,
        version: str,
        dtype: str,
        refine: tuple[int, float, int] = (0, 0.0, 0),
    ):
        self.base, self.stack = base, stack.to(base.device).eval()
        self.refine = refine
        steps, lr, tokens = refine
        self.version = f"{version}+refine{steps}x{lr:g}x{tokens}" if steps else version
        # bfloat16 gists are held as float32 values rounded to bfloat16 (numpy has no
        # bfloat16); the payload file stores their bits.
        self.np_dtype = np.float16 if dtype == "float16" else np.float32
        self.bf16 = dtype == "bfloat16"
        self.batch = 256

    @torch.no_grad()
    def gists(self, level: int, children: np.ndarray, previous: np.ndarray | None = None):
        """[n, 32] token ids (level 1) or [n, 32, d] gists (level > 1) -> [n, d].

        Level-1 blocks are consecutive; `previous` is the block before the first one (None
        when it is the session's first block).
        """
        out = []
        for i in range(0, len(children), self.batch):
            chunk = children[i : i + self.batch]
            if level == 1:
                before = children[i - 1] if i else previous
                g = self._block_gists(chunk.astype(np.int64), before)
            else:
                x = torch.as_tensor(np.asarray(chunk, np.float32), device=self.base.device)
                g = self.stack(x, level)
            if self.bf16:
                g = g.to(torch.bfloat16)
            out.append(g.float().cpu().numpy().astype(self.np_dtype))
        return np.concatenate(out) if out else np.zeros((0, self.base.width), self.np_dtype)

    def _block_gists(self, blocks: np.ndarray, previous: np.ndarray | None) -> torch.Tensor:
        """Gists of consecutive blocks [n, K]; `previous` is the block before blocks[0]."""
        ids = torch.as_tensor(blocks, device=self.base.device)
        g = self.stack.from_tokens(self.base, ids)
        if not self.refine[0]:
            return g
        if previous is None:  # the session's first block has no context: it stays as made
            g, first, context, ids = g[1:], g[:1], ids[:-1], ids[1:]
        else:
            first = g[:0]
            before = torch.as_tensor(previous.astype(np.int64), device=ids.device)[None]
            context = torch.cat([before, ids[:-1]])
        if len(ids):
            g = refine_gists(self.base, g, context, ids, *self.refine)
        return torch.cat([first, g])


class MegaContextTree:
    """One session's tree. Its gists are of one GistNet version: a session whose gists
    another version made is refused (GistVersionMismatch) unless opened with
    `reindex=True` (`megacontext reindex`), so two engines never re-gist under each other."""

    def __init__(self, store: SessionStore, gister: Gister, reindex: bool = False):
        self.store, self.gister = store, gister
        self.counts: dict[int, int] = {}
        self.version = ""
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
            f"engine uses {self.gister.version!r} (another checkpoint or gist_refine_* "
            f"setting); re-gist it with `megacontext reindex --store {path}` and the settings "
            "to use, or open it with the settings that made it"
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
        if not indices:
            return np.zeros((0, self.store.width), np.float32)
        lo, hi = min(indices), max(indices) + 1
        rows = self.store.gists(level, lo, hi, version=self.gister.version)
        return rows[np.asarray(indices) - lo].astype(np.float32)

    # ---- writes -----------------------------------------------------------------------
    def append(self, role: str, content: str, metadata: dict, ids: list[int]) -> Message:
        """Durably append one message's tokens and the gists they complete."""
        with self.store.lock():
            self.refresh(prepare=True)
            self._check_version()  # another process may have re-gisted: never mix
            n0 = self.n_tokens
            tokens = np.concatenate([self._tokens, np.asarray(ids, np.int64)])
            gists = self._new_gists(tokens)
            message = self.store.append(
                role, content, metadata, tokens[n0:], gists, self.gister.version
            )
            self._tokens = tokens
            self.counts[0] = len(tokens)
            for level, arr in gists.items():
                self.counts[level] = self.count(level) + len(arr)
            return message

    def _new_gists(self, tokens: np.ndarray) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        have = self.count(1)
        full = len(tokens) // K
        if full > have:
            previous = tokens[(have - 1) * K : have * K] if have else None
            out[1] = self.gister.gists(1, tokens[have * K : full * K].reshape(-1, K), previous)
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
        self.refresh()
