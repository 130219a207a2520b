"""MegaContextChatMessageHistory: a persistent LangChain chat history in a MegaContext store."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
    messages_from_dict,
)

from megacontext_memory.routing import ORIGIN, Item, digest, get_engine, get_router, merged_messages
from megacontext_memory.serving.client import Client, check_engine_args, client_for

from .chat_models import (
    ID_PREFIX,
    ROUTER_NAME,
    SESSION_TAG,
    ChatMegaContext,
    reply_message,
    to_item,
)

HIDDEN = ("prompt-system", "tools")  # ingested by the chat model from its prompt, not history


class MegaContextChatMessageHistory(BaseChatMessageHistory):
    """Chat history stored in an engine session (`session_id`), durable across processes.

    Use it as the factory of RunnableWithMessageHistory, built with `llm=` to share the
    chat model's engine. Its messages name their session (`additional_kwargs`), so the
    model routes a prompt built from them to this session even where no `configurable`
    session id reaches it; the messages the model ingested during a turn are not stored
    twice.

    ```python
    history = MegaContextChatMessageHistory("user-42", llm=llm)
    history.add_user_message("hi")
    ```

    With `base_url=` (or `llm=` a ChatMegaContext with one) the session lives on a
    `megacontext serve` server: reads, appends and `clear()` use its session endpoints.
    """

    def __init__(
        self,
        session_id: str,
        store: str | None = None,
        working_budget: int = 1024,
        model: str = "default",
        device: str | None = None,
        engine: Any = None,
        llm: ChatMegaContext | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        **engine_kwargs: Any,
    ):
        """`llm` (or `engine`) gives the engine; otherwise the settings name one, on `store`
        (default $MEGACONTEXT_STORE, then "megacontext-store"). `base_url` (and `api_key`,
        default $MEGACONTEXT_API_KEY), or `llm` built with one: the server's session."""
        if not isinstance(session_id, str) or not session_id:
            raise ValueError("session_id must be a non-empty string")
        self.session_id = session_id
        self.client: Client | None = None
        if base_url or (llm is not None and llm.base_url):
            named = {"store": store, "device": device, "engine": engine}
            given = [k for k, v in named.items() if v is not None] + list(engine_kwargs)
            given += ["working_budget"] if working_budget != 1024 else []
            given += ["model"] if model != "default" else []
            check_engine_args("MegaContextChatMessageHistory", given)
            if llm is not None and llm.base_url != (base_url or llm.base_url):
                raise ValueError(
                    "MegaContextChatMessageHistory: llm= runs in-process or on another server "
                    f"than base_url={base_url!r}"
                )
            if llm is not None:
                self.client = llm.client
            else:
                key = api_key or os.environ.get("MEGACONTEXT_API_KEY")
                self.client = client_for(base_url, key, timeout)
            return
        if llm is not None:
            engine = llm.engine
        if engine is None:
            store = store or os.environ.get("MEGACONTEXT_STORE", "megacontext-store")
            engine = get_engine(store, working_budget, model, device, engine_kwargs)
        self.engine = engine
        self.router = get_router(self.engine, ROUTER_NAME, ID_PREFIX)

    def _stored(self) -> list[tuple[str, str, dict]]:
        """The session's messages as history shows them: (role, content, metadata)."""
        if self.client is not None:
            return [
                (m["role"], m["content"], m["metadata"])
                for m in self.client.messages(self.session_id)
            ]
        if not self.engine.store.has_session(self.session_id):
            return []
        return [
            (role, content, meta)
            for role, content, meta in merged_messages(self.engine.session(self.session_id))
            if meta.get(ORIGIN) not in HIDDEN
        ]

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        """Every message of the session, oldest first (rebuilt from the lossless log)."""
        out: list[BaseMessage] = []
        chain = ""
        for role, content, meta in self._stored():
            msg = _rebuild(role, content, meta, chain)
            if msg is None:
                continue
            item = to_item(msg)
            if item is not None and item.role != "system":
                chain = digest(chain, item)
            msg.additional_kwargs[SESSION_TAG] = self.session_id
            out.append(msg)
        return out

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        items: list[Item] = []
        for m in messages:
            item = to_item(m)
            if item is not None:
                items.append(item)
        if self.client is not None:
            self.client.append(self.session_id, items)
            return
        self.router.add(self.session_id, items)

    def clear(self) -> None:
        if self.client is not None:
            self.client.delete(self.session_id)
            return
        self.router.discard(self.session_id)

    async def aget_messages(self) -> list[BaseMessage]:
        return await asyncio.to_thread(lambda: self.messages)

    async def aadd_messages(self, messages: Sequence[BaseMessage]) -> None:
        await asyncio.to_thread(self.add_messages, messages)

    async def aclear(self) -> None:
        await asyncio.to_thread(self.clear)


def _rebuild(role: str, content: str, meta: dict, chain: str) -> BaseMessage | None:
    if "lc" in meta:
        try:
            return messages_from_dict([meta["lc"]])[0]
        except (KeyError, TypeError, ValueError):
            pass
    if role == "assistant":
        text, calls = reply_message(content, True, chain)
        return AIMessage(content=text, tool_calls=calls)
    if role == "user":
        return HumanMessage(content=content)
    if role == "system":
        return SystemMessage(content=content)
    if role == "tool":
        return ToolMessage(content=content, tool_call_id=meta.get("tool_call_id", ""))
    return None
