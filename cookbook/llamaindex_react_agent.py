"""LlamaIndex ReActAgent with MegaContextMemory across runs.

The agent is rebuilt for each run; only the memory's session id carries the
conversation, because its state lives in the store. The tiny default model usually
answers directly instead of writing ReAct steps; the plumbing is what this shows.

    python cookbook/llamaindex_react_agent.py
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile

from llama_index.core.agent.workflow import ReActAgent
from llama_index.core.tools import FunctionTool
from llama_index.llms.megacontext import MegaContextLLM
from llama_index.memory.megacontext import MegaContextMemory


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


async def run(store: str, budget: int, max_tokens: int) -> None:
    llm = MegaContextLLM(store=store, working_budget=budget, max_tokens=max_tokens)
    for question in ("Hi, I am Sam.", "What is 6 times 7?", "What is my name?"):
        agent = ReActAgent(tools=[FunctionTool.from_defaults(multiply)], llm=llm)
        memory = MegaContextMemory.from_defaults(session_id="react-user", llm=llm)
        out = await agent.run(question, memory=memory)
        print(f"user: {question}\nassistant: {str(out).strip()}")
    memory = MegaContextMemory.from_defaults(session_id="react-user", llm=llm)
    print(f"history in the store: {len(memory.get())} messages")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=None)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args()
    store = args.store or tempfile.mkdtemp(prefix="mc-react-")
    asyncio.run(run(store, args.budget, args.max_tokens))


if __name__ == "__main__":
    main()
