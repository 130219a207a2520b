"""MegaContextLLM: a LlamaIndex LLM whose memory is a MegaContext engine."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from megacontext_memory.routing import ORIGIN, Item, Router, router_for

ROUTER_NAME, ID_PREFIX = "llamaindex", "li-"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_ROLES = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.TOOL: "tool",
    MessageRole.FUNCTION: "tool",
}


def message_text(message: ChatMessage) -> str:
    text = message.content
    return text if isinstance(text, str) else ""


def to_item(message: ChatMessage) -> Item | None:
    """A LlamaIndex message as the engine ingests it (None: nothing to ingest)."""
    role = _ROLES.get(message.role, "user")
    text = message_text(message)
    if not text.strip():
        return None
    meta: dict[str, Any] = {"li_role": str(message.role.value)}
    return Item(role, text, meta)


def from_engine(role: str, content: str, meta: dict) -> ChatMessage:
    li_role = meta.get("li_role") or {"user": "user", "system": "system", "tool": "tool"}.get(
        role, "assistant"
    )
    return ChatMessage(role=MessageRole(li_role), content=content)


class MegaContextLLM(CustomLLM):
    """LlamaIndex LLM backed by a MegaContext engine: unbounded memory at a fixed budget.

    Each call routes to an engine session and ingests only the messages it does not hold
    yet (chat engines and agents resend the whole history every turn); `session_id` pins a
    session. `metadata.context_window` is the working budget.

    ```python
    from llama_index.llms.megacontext import MegaContextLLM

    llm = MegaContextLLM(store="memory", working_budget=1024, max_tokens=64)
    ```
    """

    store: str = Field(
        default_factory=lambda: os.environ.get("MEGACONTEXT_STORE", "megacontext-store"),
        description="Directory of the engine's store.",
    )
    working_budget: int = Field(default=1024, description="Positions the model ever sees.")
    model: str = Field(default="default", description="Base model ('default' or an HF id/path).")
    device: str | None = Field(default=None)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    session_id: str | None = Field(default=None, description="Pin calls to this session.")
    max_tokens: int = Field(default=256, description="Tokens per reply.")
    temperature: float = Field(default=0.0)
    top_p: float = Field(default=1.0)
    stop: list[str] | None = Field(default=None)
    seed: int | None = Field(default=None)
    system_refresh_tokens: int | None = Field(default=None)

    @classmethod
    def class_name(cls) -> str:
        return "MegaContextLLM"

    @property
    def model_name(self) -> str:
        return DEFAULT_MODEL_NAME if self.model in ("default", DEFAULT_MODEL_NAME) else self.model

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.working_budget,
            num_output=self.max_tokens,
            is_chat_model=True,
            is_function_calling_model=False,
            model_name=self.model_name,
        )

    @property
    def router(self) -> Router:
        """This adapter's router (engine loaded on first use, shared per store in a process)."""
        return router_for(self, ROUTER_NAME, ID_PREFIX)

    @property
    def engine(self):
        return self.router.engine

    # ---- the turn -------------------------------------------------------------------------
    def _turn(self, messages: Sequence[ChatMessage], kwargs: dict) -> Iterator[tuple[str, Any]]:
        engine = self.engine
        items = [it for it in (to_item(m) for m in messages) if it is not None]
        for it in items:
            if it.role == "system":
                it.metadata[ORIGIN] = "prompt-system"
        max_new = int(kwargs.get("max_tokens") or self.max_tokens)
        sid = kwargs.get("session_id") or self.session_id
        with self.router.turn(items, sid, (), self.system_refresh_tokens) as turn:
            session = turn.session
            room = self.working_budget - session.config.recent_raw - 2 * 32 - 16
            pieces = session.generate(
                max(1, min(max_new, room)),
                stream=True,
                temperature=float(kwargs.get("temperature", self.temperature)),
                top_p=float(kwargs.get("top_p", self.top_p)),
                stop=list(kwargs.get("stop") or self.stop or []),
                seed=kwargs.get("seed", self.seed),
            )
            out: list[str] = []
            try:
                for piece in pieces:
                    out.append(piece)
                    yield "text", piece
            finally:
                pieces.close()
                text = "".join(out)
                turn.commit_reply(Item("assistant", text))
            tel = session.telemetry[-1]
            n_out = len(engine.base.encode(text)) if text else 0
            n_in = tel.prefill_tokens + tel.reused_prefix
            info = {
                "model_name": engine.base.name,
                "session_id": session.id,
                "prompt_tokens": n_in,
                "completion_tokens": n_out,
                "total_tokens": n_in + n_out,
                "cached_tokens": tel.reused_prefix,
                "prefill_tokens": tel.prefill_tokens,
                "positions_used": tel.positions_used,
                "history_tokens": session.token_count(),
                "ingested_messages": len(turn.ingested),
            }
        yield "done", (text, info)

    def _response(self, text: str, info: dict, delta: str | None = None) -> ChatResponse:
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=text),
            delta=delta,
            raw=info,
            additional_kwargs=dict(info),
        )

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        result = None
        for kind, value in self._turn(messages, kwargs):
            if kind == "done":
                result = value
        return self._response(*result)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        def gen() -> ChatResponseGen:
            text = ""
            for kind, value in self._turn(messages, kwargs):
                if kind == "text":
                    text += value
                    yield self._response(text, {}, delta=value)
                else:
                    yield self._response(value[0], value[1], delta="")

        return gen()

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        r = self.chat([ChatMessage(role=MessageRole.USER, content=prompt)], **kwargs)
        return CompletionResponse(text=r.message.content or "", raw=r.raw)

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        def gen() -> CompletionResponseGen:
            for r in self.stream_chat(
                [ChatMessage(role=MessageRole.USER, content=prompt)], **kwargs
            ):
                yield CompletionResponse(text=r.message.content or "", delta=r.delta, raw=r.raw)

        return gen()

    # ---- native async: the engine runs in a worker thread -------------------------------
    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await asyncio.to_thread(self.chat, messages, **kwargs)

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        return _threaded(lambda: self.stream_chat(messages, **kwargs))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any):
        return await asyncio.to_thread(self.complete, prompt, formatted, **kwargs)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any):
        return _threaded(lambda: self.stream_complete(prompt, formatted, **kwargs))


async def _threaded(make_iter) -> AsyncIterator[Any]:
    """Run a blocking iterator in a worker thread; yield its items on the event loop."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in make_iter():
                if stop.is_set():
                    break
                loop.call_soon_threadsafe(queue.put_nowait, ("ok", item))
        except BaseException as e:
            loop.call_soon_threadsafe(queue.put_nowait, ("err", e))
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, ("end", None))

    worker = loop.run_in_executor(None, work)
    try:
        while True:
            kind, value = await queue.get()
            if kind == "end":
                break
            if kind == "err":
                raise value
            yield value
    finally:
        stop.set()
        await worker
