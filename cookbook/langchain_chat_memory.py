"""LangChain chat with persistent MegaContext memory.

A prompt | ChatMegaContext chain wrapped in RunnableWithMessageHistory, with
MegaContextChatMessageHistory as the history factory. Each turn ingests only the new
message; the history lives in the store and survives restarts (run it twice with the
same --store to see the history grow).

    python cookbook/langchain_chat_memory.py --store /tmp/mc-demo
"""

from __future__ import annotations

import argparse
import tempfile

from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables.history import RunnableWithMessageHistory
from langchain_megacontext import ChatMegaContext, MegaContextChatMessageHistory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=None, help="store directory (default: a temp dir)")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    store = args.store or tempfile.mkdtemp(prefix="mc-langchain-")

    llm = ChatMegaContext(store=store, working_budget=args.budget, max_tokens=args.max_tokens)
    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", "You are a friendly assistant. Answer in one short sentence."),
            MessagesPlaceholder("history"),
            ("human", "{question}"),
        ]
    )
    chat = RunnableWithMessageHistory(
        prompt | llm,
        lambda sid: MegaContextChatMessageHistory(sid, llm=llm),  # one engine for both
        input_messages_key="question",
        history_messages_key="history",
    )
    config = {"configurable": {"session_id": "cookbook-user"}}
    for question in ("Hi! My name is Ada.", "I keep bees.", "What is my name?"):
        reply = chat.invoke({"question": question}, config=config)
        meta = reply.response_metadata
        print(f"user: {question}")
        print(f"assistant: {reply.content}")
        print(
            f"  [session={meta['session_id']} ingested={meta['ingested_messages']} "
            f"prefill={meta['prefill_tokens']} positions={meta['positions_used']}/{args.budget} "
            f"history_tokens={meta['history_tokens']}]"
        )
    history = MegaContextChatMessageHistory("cookbook-user", llm=llm)
    print(f"stored history: {len(history.messages)} messages in {store}")


if __name__ == "__main__":
    main()
