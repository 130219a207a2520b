"""Gister: token blocks and gist groups -> gists, many at a time, shared by every session.

Gisting is the costly part of ingest (the GistNet reads the base model's first layers), and
at batch 1 it is bound by overhead, not arithmetic. So the engine never gists on append: a
session gathers every block and node completed since its last gisting and hands them over
together, and the sessions of one process hand theirs to one `Gister`, which runs whatever
is queued in shared batches (the caller that finds it idle runs the queue; the others wait
for it).

The in-context refinement of level-1 gists (`refine_gists`: the whole model forward and
backward, about eight times GistNet's cost) is not part of ingest: the store holds
GistNet's gists, which the level-2 net was trained on, and a level-1 gist is refined only
when a working context first shows it (`MegaContextTree.shown_gists`), and only with
`Config.gist_refine_steps` > 0 (off by default). Most blocks of a long history are only ever
seen inside a level-2 gist, so most are never refined.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
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
    """One session's request: level-1 blocks [n, K] or level > 1 children [n, K, d] to gist
    (`level` >= 1), or level-1 gists [n, d] to refine (`level` 0) in the context of the
    block before each ([n, K]) with their blocks ([n, K])."""

    level: int
    x: np.ndarray
    context: np.ndarray | None = None
    blocks: np.ndarray | None = None
    result: np.ndarray | None = None
    error: BaseException | None = None
    done: bool = False

    @property
    def rows(self) -> int:
        return len(self.x)


class Gister:
    """Makes gists with one GistStack, for every session of an engine at once.

    `version` names GistNet, whose gists the store holds. With `refine` = (steps, lr,
    tokens) and steps > 0, `refine` fits a level-1 gist (`refine_gists`) so the model
    reading [previous block][gist] continues as it does after [previous block][block];
    `refine_version` names the fit, so shown gists of other settings are never reused.
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
        self.fit = refine
        steps, lr, tokens = refine
        self.version = version
        self.refine_version = f"refine{steps}x{lr:g}x{tokens}" if steps else ""
        # bfloat16 gists are held as float32 values rounded to bfloat16 (numpy has no
        # bfloat16); the payload file stores their bits.
        self.np_dtype = np.float16 if dtype == "float16" else np.float32
        self.bf16 = dtype == "bfloat16"
        self.batch = batch
        self._cond = threading.Condition()
        self._queue: list[_Job] = []
        self._running = False

    def gists(self, level: int, children: np.ndarray) -> np.ndarray:
        """[n, 32] token blocks (level 1) or [n, 32, d] gists (level > 1) -> [n, d]."""
        if level == 1:
            return self._submit(_Job(1, np.asarray(children, np.int64).reshape(-1, BLOCK_SIZE)))
        return self._submit(_Job(level, np.asarray(children, np.float32)))

    def refine(self, gists: np.ndarray, context: np.ndarray, blocks: np.ndarray) -> np.ndarray:
        """Level-1 gists [n, d] of `blocks` [n, 32], each fitted in the context of the block
        before it (`context` [n, 32]) -> [n, d]. Needs `refine_version`."""
        if not self.refine_version:
            raise ValueError("this Gister was made without a refinement (steps = 0)")
        job = _Job(0, np.asarray(gists, np.float32), np.asarray(context, np.int64))
        job.blocks = np.asarray(blocks, np.int64)
        return self._submit(job)

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
        release_freed_memory()

    @torch.no_grad()
    def _compute(self, level: int, group: list[_Job]) -> np.ndarray:
        dev = self.base.device
        x = np.concatenate([j.x for j in group])
        if level == 0:
            context = np.concatenate([j.context for j in group])
            blocks = np.concatenate([j.blocks for j in group])
        out = []
        for i in range(0, len(x), self.batch):
            sl = slice(i, i + self.batch)
            chunk = torch.as_tensor(x[sl], device=dev)
            if level == 0:
                ctx, ids = (torch.as_tensor(a[sl], device=dev) for a in (context, blocks))
                g = refine_gists(self.base, chunk, ctx, ids, *self.fit)
            elif level == 1:
                g = self.stack.from_tokens(self.base, chunk)
            else:
                g = self.stack(chunk, level)
            if self.bf16:
                g = g.to(torch.bfloat16)
            out.append(g.float().cpu().numpy().astype(self.np_dtype))
        return np.concatenate(out)


@functools.cache
def _malloc_trim():
    libc = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None


def release_freed_memory() -> None:
    """Hand freed heap pages back to the system. A batch's activations (several hundred MB
    in a refinement) or a long import's token lists are freed into glibc's arenas, which
    keep them otherwise, so a process would hold its peak for good. Elsewhere (no glibc)
    this does nothing."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
