"""MegaContextMemory: LlamaIndex memory kept in a MegaContext store, keyed by session id."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.bridge.pydantic import Field
from llama_index.core.memory.types import BaseMemory
from llama_index.llms.megacontext.base import (
    ID_PREFIX,
    ROUTER_NAME,
    SESSION_TAG,
    from_engine,
    to_item,
)

from megacontext_memory.routing import (
    ORIGIN,
    Router,
    merged_messages,
    router_for,
)

HIDDEN = ("prompt-system", "tools")  # system prompts an LLM ingested from its prompt


class MegaContextMemory(BaseMemory):
    """Chat memory whose state lives in the engine's store, not in this object.

    Agent workflows copy or drop memory objects between runs; any MegaContextMemory with
    the same `store` and `session_id` (in this or another process) sees the same history.
    Messages read from it name their session (`additional_kwargs`), so MegaContextLLM runs
    a prompt built from them in this session and no other; messages the LLM ingested during
    a turn are recognised when the chat engine or agent puts them, and not stored twice.

    ```python
    from llama_index.memory.megacontext import MegaContextMemory

    memory = MegaContextMemory.from_defaults(session_id="user-42", store="memory")
    ```
    """

    session_id: str = Field(default="default", description="The engine session.")
    store: str = Field(
        default_factory=lambda: os.environ.get("MEGACONTEXT_STORE", "megacontext-store")
    )
    working_budget: int = Field(default=1024)
    model: str = Field(default="default")
    device: str | None = Field(default=None)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    token_limit: int | None = Field(
        default=None,
        description="get() returns the newest messages within this many tokens; None: all "
        "(MegaContextLLM needs the full list to recognise what it already holds, and only "
        "ingests what is new).",
    )

    @classmethod
    def class_name(cls) -> str:
        return "MegaContextMemory"

    @classmethod
    def from_defaults(
        cls,
        session_id: str = "default",
        store: str | None = None,
        chat_history: list[ChatMessage] | None = None,
        llm: Any = None,
        **kwargs: Any,
    ) -> MegaContextMemory:
        """A memory for `session_id`; with `llm` a MegaContextLLM, it shares the LLM's
        engine (store and every engine setting). `chat_history` is appended if given."""
        if llm is not None and llm.__class__.__name__ == "MegaContextLLM":
            store = store or llm.store
            for name in ("working_budget", "model", "device", "engine_kwargs"):
                kwargs.setdefault(name, getattr(llm, name))
        if store is not None:
            kwargs["store"] = store
        memory = cls(session_id=session_id, **kwargs)
        if chat_history:
            memory.put_messages(chat_history)
        return memory

    @property
    def router(self) -> Router:
        """This adapter's router (engine loaded on first use, shared per store in a process)."""
        return router_for(self, ROUTER_NAME, ID_PREFIX)

    @property
    def engine(self):
        return self.router.engine

    # ---- reads --------------------------------------------------------------------------
    def get_all(self) -> list[ChatMessage]:
        """Every message of the session, oldest first."""
        if not self.engine.store.has_session(self.session_id):
            return []
        out = []
        for role, content, meta in merged_messages(self.engine.session(self.session_id)):
            if meta.get(ORIGIN) in HIDDEN:
                continue
            message = from_engine(role, content, meta)
            message.additional_kwargs[SESSION_TAG] = self.session_id
            out.append(message)
        return out

    def get(self, input: str | None = None, **kwargs: Any) -> list[ChatMessage]:
        """The history (all of it, or the newest messages within `token_limit`)."""
        messages = self.get_all()
        if self.token_limit is None:
            return messages
        encode, total, keep = self.engine.base.encode, 0, []
        for m in reversed(messages):
            total += len(encode(m.content or ""))
            if total > self.token_limit and keep:
                break
            keep.append(m)
        return keep[::-1]

    # ---- writes -------------------------------------------------------------------------
    def put(self, message: ChatMessage) -> None:
        self.put_messages([message])

    def put_messages(self, messages: list[ChatMessage]) -> None:
        items = [it for it in (to_item(m) for m in messages) if it is not None]
        self.router.add(self.session_id, items)

    def set(self, messages: list[ChatMessage]) -> None:
        """Make the history `messages`, never by deleting any of it: a list that continues
        the session (holds its newest messages) appends what is new; any other list raises
        ValueError (call reset() first to start over)."""
        items = [it for it in (to_item(m) for m in messages) if it is not None]
        if self.router.extend(self.session_id, items) is None:
            raise ValueError(
                f"set() would replace the stored history of session {self.session_id!r}; "
                "the history is durable: call reset() first to delete it"
            )

    def reset(self) -> None:
        """Delete the session's history from the store."""
        self.router.discard(self.session_id)

    # ---- async: the store is blocking I/O, so run it off the event loop -----------------
    async def aget(self, input: str | None = None, **kwargs: Any) -> list[ChatMessage]:
        return await asyncio.to_thread(self.get, input, **kwargs)

    async def aget_all(self) -> list[ChatMessage]:
        return await asyncio.to_thread(self.get_all)

    async def aput(self, message: ChatMessage) -> None:
        await asyncio.to_thread(self.put, message)

    async def aput_messages(self, messages: list[ChatMessage]) -> None:
        await asyncio.to_thread(self.put_messages, messages)

    async def aset(self, messages: list[ChatMessage]) -> None:
        await asyncio.to_thread(self.set, messages)

    async def areset(self) -> None:
        await asyncio.to_thread(self.reset)


__all__ = ["MegaContextMemory"]
