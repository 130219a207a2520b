"""LlamaIndex SimpleChatEngine with MegaContextMemory (persistent by session id).

python cookbook/llamaindex_chat_engine.py --store /tmp/mc-demo
"""

from __future__ import annotations

import argparse
import tempfile

from llama_index.core.chat_engine import SimpleChatEngine
from llama_index.llms.megacontext import MegaContextLLM
from llama_index.memory.megacontext import MegaContextMemory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=None)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    store = args.store or tempfile.mkdtemp(prefix="mc-llamaindex-")

    llm = MegaContextLLM(store=store, working_budget=args.budget, max_tokens=args.max_tokens)
    memory = MegaContextMemory.from_defaults(session_id="cookbook-user", llm=llm)
    engine = SimpleChatEngine.from_defaults(
        llm=llm, memory=memory, system_prompt="You are a concise assistant."
    )
    for question in ("Hello! I am planning a trip to Lisbon.", "Where am I going?"):
        response = engine.chat(question)
        print(f"user: {question}\nassistant: {response.response}")
    # A fresh memory object (or a new process) sees the same history: state is in the store.
    again = MegaContextMemory.from_defaults(session_id="cookbook-user", llm=llm)
    print(f"history in the store: {len(again.get())} messages")
    tel = llm.engine.session("cookbook-user").telemetry[-1]
    print(f"last turn: prefill={tel.prefill_tokens} positions={tel.positions_used}/{args.budget}")


if __name__ == "__main__":
    main()
