"""FAISS RAG vs MegaContext on one long history with look-alike facts.

One session of the engine holds the history; a RagMemory persisted beside it in the same
store (`<store>/rag/<session>/`) indexes the same messages. The same frozen reader answers
the same question twice under the same budget: once from the retrieved chunks plus the
newest messages, once from MegaContext's working context. The task is a dev-split task of
`megacontext bench memory` (see rag_vs_megacontext.md for the measured comparison).

    python cookbook/rag_vs_megacontext.py --tokens 2000 --task 0
"""

from __future__ import annotations

import argparse
import tempfile
import time

from megacontext_memory import MegaContextEngine
from megacontext_memory.baselines import SYSTEM_PROMPT, prompt_ids, read
from megacontext_memory.baselines.rag import CHUNK_TOKENS, TOP_K, RagMemory
from megacontext_memory.eval.tasks import TaskGenerator, mentions, reader_counter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=None, help="store directory (default: a temp dir)")
    ap.add_argument("--tokens", type=int, default=2000, help="history length")
    ap.add_argument("--task", type=int, default=0, help="which dev task of that length")
    ap.add_argument("--budget", type=int, default=1024)
    args = ap.parse_args()
    store = args.store or tempfile.mkdtemp(prefix="mc-rag-vs-mc-")

    engine = MegaContextEngine(store=store, working_budget=args.budget)
    count = reader_counter(engine.base)
    task = TaskGenerator("dev", count).task(args.tokens, args.task)
    print(
        f"{task.tokens:,}-token history; facts about {task.entity} and {', '.join(task.siblings)}"
    )
    for i in task.fact_indices:
        print(f"  [{i:>3}] {task.messages[i][1]}")
    print(f"question: {task.question}   (answer: {task.answers[0]})\n")

    session = engine.session(task.id)
    t0 = time.perf_counter()
    session.extend([("system", SYSTEM_PROMPT), *task.messages])  # one durable batch
    session.make_gists()  # else the first turn makes them; ingest counts them, as RAG's embedding
    mc_ingest = time.perf_counter() - t0

    memory = RagMemory.beside(store, task.id, chunk_tokens=CHUNK_TOKENS)
    t0 = time.perf_counter()
    memory.sync(session)  # indexes the session's messages it does not hold yet
    rag_ingest = time.perf_counter() - t0

    # RAG: retrieved chunks and the newest messages fill what the prompt frame leaves.
    frame = prompt_ids(engine.base, [("system", SYSTEM_PROMPT), ("user", task.question)])
    room = args.budget - 32 - len(frame)
    shown = [m for m in memory.context(task.question, room, count, TOP_K) if m[0] != "system"]
    t0 = time.perf_counter()
    ids = prompt_ids(engine.base, [("system", SYSTEM_PROMPT), *shown, ("user", task.question)])
    rag_reply = read(engine.base, ids, 32)
    rag_turn = time.perf_counter() - t0

    t0 = time.perf_counter()
    session.append("user", task.question)
    mc_reply = session.generate(max_new_tokens=32)
    mc_turn = time.perf_counter() - t0
    used = session.telemetry[-1].positions_used

    for name, reply, positions, ingest, turn in (
        ("rag", rag_reply, len(ids), rag_ingest, rag_turn),
        ("megacontext", mc_reply, used, mc_ingest, mc_turn),
    ):
        ok = mentions(reply, task.answers) and not mentions(reply, task.distractors)
        print(f"{name:>11}: {reply!r}  [{'correct' if ok else 'wrong'}]")
        print(
            f"{'':>11}  {positions} positions, ingest {task.tokens / ingest:,.0f} tokens/s, "
            f"turn {turn:.2f} s"
        )
    print(f"\nstore: {store} (RAG index in {memory.path})")


if __name__ == "__main__":
    main()
