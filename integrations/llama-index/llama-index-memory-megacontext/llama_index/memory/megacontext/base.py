"""MegaContextMemory: LlamaIndex memory kept in a MegaContext store, keyed by session id."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.bridge.pydantic import Field, model_validator
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
from megacontext_memory.serving.client import (
    ENGINE_ARGS,
    Client,
    check_engine_args,
    client_for,
    no_engine,
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

    With `base_url=` (or `from_defaults(llm=...)` with a MegaContextLLM that has one) the
    session lives on a `megacontext serve` server: reads, puts, `set` and `reset` use its
    session endpoints.
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
    base_url: str | None = Field(
        default=None, description="A `megacontext serve` server holding the session."
    )
    api_key: str | None = Field(
        default=None,
        repr=False,
        exclude=True,
        description="The server's API key (with base_url); default $MEGACONTEXT_API_KEY.",
    )
    timeout: float = Field(default=600.0, description="Seconds to wait for the server.")

    @model_validator(mode="after")
    def _client_mode(self) -> MegaContextMemory:
        if self.base_url:
            check_engine_args("MegaContextMemory", set(ENGINE_ARGS) & self.model_fields_set)
            if self.api_key is None:
                self.api_key = os.environ.get("MEGACONTEXT_API_KEY")
        return self

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
        engine (store and every engine setting), or its server (`base_url`, `api_key`).
        `chat_history` is appended if given."""
        if llm is not None and llm.__class__.__name__ == "MegaContextLLM" and llm.base_url:
            for name in ("base_url", "api_key", "timeout"):
                kwargs.setdefault(name, getattr(llm, name))
        elif llm is not None and llm.__class__.__name__ == "MegaContextLLM":
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
        if self.base_url:
            raise no_engine("MegaContextMemory")
        return router_for(self, ROUTER_NAME, ID_PREFIX)

    @property
    def client(self) -> Client | None:
        """The server's client with `base_url` (None: in-process)."""
        return client_for(self.base_url, self.api_key, self.timeout) if self.base_url else None

    @property
    def engine(self):
        return self.router.engine

    # ---- reads --------------------------------------------------------------------------
    def get_all(self) -> list[ChatMessage]:
        """Every message of the session, oldest first."""
        return [message for message, _ in self._read()]

    def _read(self) -> list[tuple[ChatMessage, int | None]]:
        """(message, its tokens: known with `base_url`, else None) of every message."""
        if self.client is not None:
            rows = [
                (m["role"], m["content"], m["metadata"], m["tokens"])
                for m in self.client.messages(self.session_id)
            ]
        elif not self.engine.store.has_session(self.session_id):
            return []
        else:
            rows = [
                (role, content, meta, None)
                for role, content, meta in merged_messages(self.engine.session(self.session_id))
                if meta.get(ORIGIN) not in HIDDEN
            ]
        out = []
        for role, content, meta, tokens in rows:
            message = from_engine(role, content, meta)
            message.additional_kwargs[SESSION_TAG] = self.session_id
            out.append((message, tokens))
        return out

    def get(self, input: str | None = None, **kwargs: Any) -> list[ChatMessage]:
        """The history (all of it, or the newest messages within `token_limit`)."""
        if self.token_limit is None:
            return self.get_all()
        messages, total, keep = self._read(), 0, []
        encode = None if self.client is not None else self.engine.base.encode
        for m, tokens in reversed(messages):
            total += len(encode(m.content or "")) if tokens is None else tokens
            if total > self.token_limit and keep:
                break
            keep.append(m)
        return keep[::-1]

    # ---- writes -------------------------------------------------------------------------
    def put(self, message: ChatMessage) -> None:
        self.put_messages([message])

    def put_messages(self, messages: list[ChatMessage]) -> None:
        items = [it for it in (to_item(m) for m in messages) if it is not None]
        if self.client is not None:
            self.client.append(self.session_id, items)
            return
        self.router.add(self.session_id, items)

    def set(self, messages: list[ChatMessage]) -> None:
        """Make the history `messages`, never by deleting any of it: a list that continues
        the session (holds its newest messages) appends what is new; any other list raises
        ValueError (call reset() first to start over)."""
        items = [it for it in (to_item(m) for m in messages) if it is not None]
        if self.client is not None:
            continued = self.client.append(self.session_id, items, continues=True)
        else:
            continued = self.router.extend(self.session_id, items) is not None
        if not continued:
            raise ValueError(
                f"set() would replace the stored history of session {self.session_id!r}; "
                "the history is durable: call reset() first to delete it"
            )

    def reset(self) -> None:
        """Delete the session's history from the store."""
        if self.client is not None:
            self.client.delete(self.session_id)
            return
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
