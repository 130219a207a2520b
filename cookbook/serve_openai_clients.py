"""MegaContext as an OpenAI-compatible server, used by clients that already speak the API.

Starts `megacontext serve` on a free localhost port (as you would run it yourself with
`megacontext serve --store DIR --port 8000`), then talks to it with the plain OpenAI SDK,
LangChain's `ChatOpenAI` and LlamaIndex's `OpenAILike`. The session is named by the
`X-Session-Id` header (or the request's `user` field); each client sends only the new turn
and the server's memory holds the rest.

    python cookbook/serve_openai_clients.py
"""

from __future__ import annotations

import argparse
import tempfile

from langchain_openai import ChatOpenAI
from llama_index.core.llms import ChatMessage
from llama_index.llms.openai_like import OpenAILike
from openai import OpenAI

from megacontext_memory.serving.process import ServerProcess


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=None, help="store directory (default: a temp dir)")
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args()
    store = args.store or tempfile.mkdtemp(prefix="mc-serve-")
    fact = "My storage unit code is 7391."
    question = "What is my storage unit code? Answer with the number."

    with ServerProcess(store, api_key="sk-local", options=["gist_refine_steps=0"]) as server:
        base_url = server.url + "/v1"

        client = OpenAI(base_url=base_url, api_key="sk-local")
        for text in (fact, question):
            r = client.chat.completions.create(
                model="megacontext",
                messages=[{"role": "user", "content": text}],
                user="openai-sdk-user",  # the session
                max_tokens=args.max_tokens,
            )
            print(f"[openai] user: {text}\n[openai] assistant: {r.choices[0].message.content}")

        llm = ChatOpenAI(
            base_url=base_url,
            api_key="sk-local",
            model="megacontext",
            max_tokens=args.max_tokens,
            default_headers={"X-Session-Id": "langchain-user"},
        )
        llm.invoke(fact)
        print("[langchain] assistant: ", end="")
        for chunk in llm.stream(question):
            print(chunk.content, end="", flush=True)
        print()

        li = OpenAILike(
            api_base=base_url,
            api_key="sk-local",
            model="megacontext",
            is_chat_model=True,
            max_tokens=args.max_tokens,
            default_headers={"X-Session-Id": "llamaindex-user"},
        )
        li.chat([ChatMessage(role="user", content=fact)])
        answer = li.chat([ChatMessage(role="user", content=question)]).message.content
        print(f"[llamaindex] assistant: {answer}")


if __name__ == "__main__":
    main()
