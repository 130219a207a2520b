"""Gister: token blocks and gist groups -> gists, many at a time, shared by every session.

Gisting is the costly part of ingest (the GistNet reads the base model's first layers, and
the refinement runs the whole model forward and backward), and at batch 1 it is bound by
overhead, not arithmetic. So the engine never gists on append: a session gathers every
block and node completed since its last gisting and hands them over together, and the
sessions of one process hand theirs to one `Gister`, which runs whatever is queued in
shared batches (the caller that finds it idle runs the queue; the others wait for it).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from .config import BLOCK_SIZE
from .models.base import BaseModel
from .models.gistnet import GistStack
from .models.refine import refine_gists


@dataclass
class _Job:
    """One session's request: level-1 blocks [n, K] with the block before each ([n, K];
    `has_context[i]` False for a session's first block), or level > 1 children [n, K, d]."""

    level: int
    x: np.ndarray
    context: np.ndarray | None = None
    has_context: np.ndarray | None = None
    result: np.ndarray | None = None
    error: BaseException | None = None
    done: bool = False

    @property
    def rows(self) -> int:
        return len(self.x)


class Gister:
    """Makes gists with one GistStack, for every session of an engine at once.

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
        batch: int = 32,
    ):
        self.base, self.stack = base, stack.to(base.device).eval()
        self.refine = refine
        steps, lr, tokens = refine
        self.version = f"{version}+refine{steps}x{lr:g}x{tokens}" if steps else version
        # bfloat16 gists are held as float32 values rounded to bfloat16 (numpy has no
        # bfloat16); the payload file stores their bits.
        self.np_dtype = np.float16 if dtype == "float16" else np.float32
        self.bf16 = dtype == "bfloat16"
        self.batch = batch
        self._cond = threading.Condition()
        self._queue: list[_Job] = []
        self._running = False

    def gists(self, level: int, children: np.ndarray, previous: np.ndarray | None = None):
        """[n, 32] consecutive token blocks (level 1; `previous` is the block before the
        first, None for a session's first block) or [n, 32, d] gists (level > 1) -> [n, d]."""
        if level == 1:
            blocks = np.asarray(children, np.int64).reshape(-1, BLOCK_SIZE)
            context = np.empty_like(blocks)
            context[1:] = blocks[:-1]
            has = np.ones(len(blocks), bool)
            if previous is None:
                has[:1] = False
            elif len(blocks):
                context[0] = previous
            return self._submit(_Job(1, blocks, context, has))
        return self._submit(_Job(level, np.asarray(children, np.float32)))

    # ---- shared batches ---------------------------------------------------------------
    def _submit(self, job: _Job) -> np.ndarray:
        """Queue `job`; whoever finds no batch running runs everything queued."""
        if job.rows == 0:
            return np.zeros((0, self.base.width), self.np_dtype)
        with self._cond:
            self._queue.append(job)
            while not job.done:
                if self._running:
                    self._cond.wait()
                    continue
                self._running, jobs, self._queue = True, self._queue, []
                self._cond.release()
                try:
                    self._run(jobs)
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
        if job.error is not None:
            raise job.error
        return job.result

    def _run(self, jobs: list[_Job]) -> None:
        for level in sorted({j.level for j in jobs}):
            group = [j for j in jobs if j.level == level]
            try:
                out = self._compute(level, group)
            except BaseException as e:  # every waiting caller sees the failure
                for j in group:
                    j.error, j.done = e, True
                continue
            start = 0
            for j in group:
                j.result, j.done = out[start : start + j.rows], True
                start += j.rows

    @torch.no_grad()
    def _compute(self, level: int, group: list[_Job]) -> np.ndarray:
        x = np.concatenate([j.x for j in group])
        if level == 1:
            context = np.concatenate([j.context for j in group])
            has = np.concatenate([j.has_context for j in group])
        out = []
        for i in range(0, len(x), self.batch):
            if level == 1:
                sl = slice(i, i + self.batch)
                g = self._block_gists(x[sl], context[sl], has[sl])
            else:
                chunk = torch.as_tensor(x[i : i + self.batch], device=self.base.device)
                g = self.stack(chunk, level)
            if self.bf16:
                g = g.to(torch.bfloat16)
            out.append(g.float().cpu().numpy().astype(self.np_dtype))
        return np.concatenate(out)

    def _block_gists(self, blocks: np.ndarray, context: np.ndarray, has: np.ndarray):
        """Gists [n, d] of blocks [n, K], refined in the context of the block before each
        where there is one."""
        ids = torch.as_tensor(blocks, device=self.base.device)
        g = self.stack.from_tokens(self.base, ids)
        if not self.refine[0] or not has.any():
            return g
        rows = torch.as_tensor(np.flatnonzero(has), device=ids.device)
        ctx = torch.as_tensor(context[has], device=ids.device)
        g = g.clone()
        g[rows] = refine_gists(self.base, g[rows], ctx, ids[rows], *self.refine)
        return g
