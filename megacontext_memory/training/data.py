"""Training windows from the packaged corpora (`corpora.py`): token streams and gist windows.

Each (source, split) is tokenized once into one long stream (documents in a fixed order,
separated the way the source separates them) and cached as .npy. A window is a slice of a
stream: `[prefix][span x n_spans][horizon]`; the spans are what gets gisted.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import BLOCK_SIZE
from ..corpora import SOURCES, SPLITS, documents, split_of

DATA_VERSION = 1  # bump when rendering changes (invalidates cached token streams)


# ---- token streams -----------------------------------------------------------------------
def stream_path(cache: Path, base, source: str, split: str) -> Path:
    return cache / f"{source}-{split}-{base.tokenizer_hash}-v{DATA_VERSION}.npy"


def token_stream(base, source: str, split: str, cache: Path | None = None) -> np.ndarray:
    """All documents of (source, split) tokenized and concatenated, as uint32."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if cache is None:
        from ..models.base import cache_dir

        cache = cache_dir() / "gist-data"
    path = stream_path(cache, base, source, split)
    if path.exists():
        return np.load(path)
    docs = [text for doc_id, text in documents(source, base) if split_of(source, doc_id) == split]
    # Order is fixed but not alphabetical, so neighbouring documents are unrelated.
    docs.sort(key=lambda t: hashlib.sha1(t.encode()).hexdigest())
    ids: list[int] = []
    batch = 256
    for i in range(0, len(docs), batch):
        for enc in base.tokenizer(docs[i : i + batch], add_special_tokens=False)["input_ids"]:
            ids.extend(enc)
    arr = np.asarray(ids, dtype=np.uint32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{random.randrange(1 << 30)}.npy")
    np.save(tmp, arr)
    tmp.replace(path)
    return arr


# ---- windows -----------------------------------------------------------------------------
@dataclass(frozen=True)
class WindowSpec:
    """Shape of a window: prefix tokens, `n_spans` spans of `span` tokens, horizon tokens."""

    prefix: int
    n_spans: int
    horizon: int
    span: int = BLOCK_SIZE

    @property
    def length(self) -> int:
        return self.prefix + self.n_spans * self.span + self.horizon


class WindowSampler:
    """Random windows from the token streams of one split, sources mixed evenly."""

    def __init__(self, streams: dict[str, np.ndarray], seed: int):
        self.streams = streams
        self.sources = sorted(streams)
        self.rng = np.random.default_rng(seed)

    def sample(self, spec: WindowSpec, batch: int) -> tuple[np.ndarray, list[str]]:
        """[batch, spec.length] token ids and the source of each row."""
        out = np.empty((batch, spec.length), dtype=np.int64)
        names = []
        for i in range(batch):
            src = self.sources[int(self.rng.integers(len(self.sources)))]
            stream = self.streams[src]
            start = int(self.rng.integers(0, len(stream) - spec.length))
            out[i] = stream[start : start + spec.length]
            names.append(src)
        return out, names

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def load_streams(base, split: str, sources=SOURCES, cache: Path | None = None) -> dict:
    return {s: token_stream(base, s, split, cache) for s in sources}


def heldout_windows(base, spec: WindowSpec, per_source: int, seed: int, cache=None) -> dict:
    """A fixed set of held-out windows per source: {source: [n, length] int64}.

    Start offsets are spread evenly over each held-out stream, jittered by `seed`, so the
    set covers many documents and is the same on every run with the same seed.
    """
    out = {}
    for src, stream in load_streams(base, "heldout", cache=cache).items():
        rng = np.random.default_rng([seed, SOURCES.index(src)])
        room = len(stream) - spec.length
        if room <= per_source:
            raise ValueError(f"held-out {src} stream too short for {per_source} windows")
        stride = room // per_source
        starts = np.arange(per_source) * stride + rng.integers(0, stride, per_source)
        out[src] = np.stack([stream[s : s + spec.length].astype(np.int64) for s in starts])
    return out
