"""A LangGraph agent (langchain.agents.create_agent) with a tool, on MegaContext memory.

The agent state is checkpointed per thread; the thread id names the engine session, and
every model call ingests only the messages the session has not seen (the user turn, the tool call's
result). `tool_call_threshold=0` makes the tiny default model consult its tool on every
user turn, so the loop is visible: user -> tool call -> tool result -> answer.

    python cookbook/langgraph_agent_tool.py
"""

from __future__ import annotations

import argparse
import tempfile

from langchain.agents import create_agent
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_megacontext import ChatMegaContext
from langgraph.checkpoint.memory import InMemorySaver

INVENTORY = {"apples": 12, "pears": 4, "plums": 0}


@tool
def count_fruit(fruit: str) -> str:
    """How many of a fruit are in stock."""
    n = INVENTORY.get(fruit.strip().lower().rstrip("s") + "s")
    return f"{n} {fruit} in stock" if n is not None else f"no record of {fruit}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=None)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    store = args.store or tempfile.mkdtemp(prefix="mc-langgraph-")

    llm = ChatMegaContext(
        store=store,
        working_budget=args.budget,
        max_tokens=args.max_tokens,
        tool_call_threshold=0.0,
        max_string_tokens=8,
    )
    agent = create_agent(
        llm,
        tools=[count_fruit],
        system_prompt="You run a fruit shop. Use count_fruit to check the stock.",
        checkpointer=InMemorySaver(),
    )
    config = {"configurable": {"thread_id": "shop-1"}}
    for question in ("How many apples do we have?", "And pears?"):
        state = agent.invoke({"messages": [HumanMessage(question)]}, config)
        print(f"user: {question}")
        for m in state["messages"][-3:]:
            if isinstance(m, AIMessage) and m.tool_calls:
                print(f"  tool call: {m.tool_calls[0]['name']}({m.tool_calls[0]['args']})")
            elif isinstance(m, ToolMessage):
                print(f"  tool result: {m.content}")
        final = state["messages"][-1]
        print(f"assistant: {final.content}")
    sid = final.response_metadata["session_id"]
    log = llm.engine.session(sid).messages()
    print(
        f"graph state: {len(state['messages'])} messages; engine session {sid}: "
        f"{len(log)} messages ({sum(m.role == 'system' for m in log)} system), "
        f"{llm.engine.session(sid).token_count()} tokens"
    )


if __name__ == "__main__":
    main()
