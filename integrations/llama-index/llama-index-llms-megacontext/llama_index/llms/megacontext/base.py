"""MegaContextLLM: a LlamaIndex LLM whose memory is a MegaContext engine."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import os
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from llama_index.core.bridge.pydantic import Field, model_validator
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection

from megacontext_memory import tool_calls
from megacontext_memory.chat import Reply, run_turn
from megacontext_memory.routing import Item, Router, router_for
from megacontext_memory.serving.client import (
    ENGINE_ARGS,
    Client,
    check_engine_args,
    client_for,
    no_engine,
)

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

ROUTER_NAME, ID_PREFIX = "llamaindex", "li-"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
SESSION_TAG = "megacontext_session"
"""`additional_kwargs` key naming the session of a message read from MegaContextMemory."""
_ONE_OFF = contextvars.ContextVar("megacontext_one_off", default=False)
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


def message_calls(message: ChatMessage) -> list[dict]:
    """Tool calls of an assistant message as [{"id", "name", "args"}] (ours or OpenAI's)."""
    out = []
    for c in message.additional_kwargs.get("tool_calls") or []:
        if not isinstance(c, dict):
            c = c.model_dump() if hasattr(c, "model_dump") else {}
        fn = c.get("function") or c
        args = fn.get("arguments", fn.get("args", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = {}
        if isinstance(fn.get("name"), str):
            out.append({"id": c.get("id", ""), "name": fn["name"], "args": args or {}})
    return out


def to_item(message: ChatMessage) -> Item | None:
    """A LlamaIndex message as the engine ingests it (None: nothing to ingest)."""
    role = _ROLES.get(message.role, "user")
    text = message_text(message)
    if role == "assistant":
        calls = "".join(
            tool_calls.render_call(c["name"], c["args"]) for c in message_calls(message)
        )
        text = text + ("\n" if text and calls else "") + calls
    if not text.strip():
        return None
    meta: dict[str, Any] = {"li_role": str(message.role.value)}
    return Item(role, text, meta)


def from_engine(role: str, content: str, meta: dict) -> ChatMessage:
    li_role = meta.get("li_role") or {"user": "user", "system": "system", "tool": "tool"}.get(
        role, "assistant"
    )
    return ChatMessage(role=MessageRole(li_role), content=content)


def tagged_session(messages: Sequence[ChatMessage]) -> str | None:
    """The session named by messages read from a memory (ValueError if several)."""
    tags = {m.additional_kwargs.get(SESSION_TAG) for m in messages} - {None}
    if len(tags) > 1:
        raise ValueError(f"messages from several sessions {sorted(tags)} in one call")
    return tags.pop() if tags else None


@contextlib.contextmanager
def one_off() -> Iterator[None]:
    """Calls inside run ephemeral unless they name a session (prompts, not conversations)."""
    token = _ONE_OFF.set(True)
    try:
        yield
    finally:
        _ONE_OFF.reset(token)


class MegaContextLLM(FunctionCallingLLM):
    """LlamaIndex LLM backed by a MegaContext engine: unbounded memory at a fixed budget.

    Each call routes to an engine session and ingests only the messages it does not hold
    yet (chat engines and agents resend the whole history every turn). The session is, in
    order: `session_id` of the call, of this object, the session of messages read from a
    `MegaContextMemory`; otherwise an automatic session matched by content. Prompts
    (`complete`, `predict`, structured output, condense prompts) that name no session run
    ephemeral and leave nothing behind; `ephemeral=True` does the same for chats.
    Tools are described to the model and calls decoded under their JSON schema, so
    `FunctionAgent` and `AgentWorkflow` work. `metadata.context_window` is the budget.

    ```python
    from llama_index.llms.megacontext import MegaContextLLM

    llm = MegaContextLLM(store="memory", working_budget=1024, max_tokens=64)
    ```

    With `base_url=` (and `api_key=`) the turns run on a `megacontext serve` server
    instead, alike: the session it knows goes as `X-Session-Id` (none: the server routes
    by content), one-off prompts run ephemeral there, replies stream as server-sent events.
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
    ephemeral: bool = Field(
        default=False, description="Chats that name no session run in a throwaway session."
    )
    max_tokens: int = Field(default=256, description="Tokens per reply.")
    temperature: float = Field(default=0.0)
    top_p: float = Field(default=1.0)
    stop: list[str] | None = Field(default=None)
    seed: int | None = Field(default=None)
    system_refresh_tokens: int | None = Field(default=None)
    tool_call_threshold: float = Field(
        default=0.004,
        description="Open a tool call when the model's first-step probability of it is at "
        "least this (tools bound, no forced choice).",
    )
    max_string_tokens: int = Field(default=24, description="Tokens per string tool argument.")
    max_tool_rounds: int = Field(
        default=1, description="Tool calls per user turn before the model must answer."
    )
    base_url: str | None = Field(
        default=None,
        description="A `megacontext serve` server to run the turns on instead of an engine "
        "in this process (not together with store/model/engine settings).",
    )
    api_key: str | None = Field(
        default=None,
        repr=False,
        exclude=True,
        description="The server's API key (with base_url); default $MEGACONTEXT_API_KEY.",
    )
    timeout: float = Field(default=600.0, description="Seconds to wait for the server.")

    @model_validator(mode="after")
    def _client_mode(self) -> MegaContextLLM:
        if self.base_url:
            check_engine_args("MegaContextLLM", set(ENGINE_ARGS) & self.model_fields_set)
            if self.api_key is None:
                self.api_key = os.environ.get("MEGACONTEXT_API_KEY")
        return self

    @classmethod
    def class_name(cls) -> str:
        return "MegaContextLLM"

    @property
    def model_name(self) -> str:
        if self.base_url:
            return Path(self.client.info()["base_model"]).name
        return DEFAULT_MODEL_NAME if self.model in ("default", DEFAULT_MODEL_NAME) else self.model

    @property
    def metadata(self) -> LLMMetadata:
        """`context_window` is the budget (with `base_url`, the server's)."""
        budget = self.client.info()["working_budget"] if self.base_url else self.working_budget
        return LLMMetadata(
            context_window=budget,
            num_output=self.max_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=self.model_name,
        )

    @property
    def router(self) -> Router:
        """This adapter's router (engine loaded on first use, shared per store in a process)."""
        if self.base_url:
            raise no_engine("MegaContextLLM")
        return router_for(self, ROUTER_NAME, ID_PREFIX)

    @property
    def client(self) -> Client | None:
        """The server's client with `base_url` (None: in-process)."""
        return client_for(self.base_url, self.api_key, self.timeout) if self.base_url else None

    @property
    def engine(self):
        return self.router.engine

    # ---- the turn -------------------------------------------------------------------------
    def _session_for(self, messages: Sequence[ChatMessage], kwargs: dict) -> str | None:
        named = kwargs.get("session_id") or self.session_id
        tagged = tagged_session(messages)
        if named and tagged and named != tagged:
            raise ValueError(
                f"this call is for session {named!r} but its messages come from the memory "
                f"of session {tagged!r}"
            )
        return named or tagged

    def _turn(self, messages: Sequence[ChatMessage], kwargs: dict) -> Iterator[tuple[str, Any]]:
        """Yields ("call" | "text", ""), ("text", piece)..., then ("done", (text, calls,
        info)); the turn itself is `megacontext_memory.chat.run_turn`, here or on the
        server (`base_url`)."""
        client = self.client
        turn = (client.turn if client else functools.partial(run_turn, self.router))(
            [it for it in (to_item(m) for m in messages) if it is not None],
            session_id=self._session_for(messages, kwargs),
            tools=kwargs.get("tools") or [],
            tool_choice=kwargs.get("tool_choice"),
            max_tool_rounds=self.max_tool_rounds,
            max_new_tokens=int(kwargs.get("max_tokens") or self.max_tokens),
            stop=list(kwargs.get("stop") or self.stop or []),
            temperature=float(kwargs.get("temperature", self.temperature)),
            top_p=float(kwargs.get("top_p", self.top_p)),
            seed=kwargs.get("seed", self.seed),
            tool_call_threshold=self.tool_call_threshold,
            max_string_tokens=self.max_string_tokens,
            system_refresh_tokens=self.system_refresh_tokens,
            ephemeral=bool(kwargs.get("ephemeral", self.ephemeral or _ONE_OFF.get())),
        )
        for kind, value in turn:
            if kind != "done":
                yield kind, value
                continue
            r: Reply = value
            usage = {
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens,
                "total_tokens": r.prompt_tokens + r.completion_tokens,
                "cached_tokens": r.cached_tokens,
            }
            info = {
                "model_name": r.model_name,
                "session_id": r.session_id,
                "usage": usage,
                **usage,
                "prefill_tokens": r.prefill_tokens,
                "positions_used": r.positions_used,
                "history_tokens": r.history_tokens,
                "ingested_messages": r.ingested_messages,
                "finish_reason": r.finish_reason,
            }
            yield "done", (r.content, r.calls, info)

    @staticmethod
    def _response(
        content: str, calls: list[dict], info: dict, delta: str | None = None
    ) -> ChatResponse:
        return ChatResponse(message=_reply(content, calls), delta=delta, raw=info)

    def _chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        result = None
        for kind, value in self._turn(messages, kwargs):
            if kind == "done":
                result = value
        return self._response(*result)

    def _stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        """Text streams piece by piece; a tool call comes whole in the last response."""
        text, stream = "", tool_calls.TextStream()
        for kind, value in self._turn(messages, kwargs):
            if kind == "call":
                stream.calling = True
            elif kind == "text" and (piece := stream.feed(value)):
                text += piece
                yield self._response(text, [], {}, delta=piece)
            elif kind == "done":
                content, calls, info = value
                yield self._response(
                    content, calls, info, delta="" if stream.streaming else content
                )

    # ---- LlamaIndex API: each public call emits its events once --------------------------
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._chat(messages, **kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._stream_chat(messages, **kwargs)

    def _complete(self, prompt: str, **kwargs: Any) -> CompletionResponse:
        with one_off():
            r = self._chat([ChatMessage(role=MessageRole.USER, content=prompt)], **kwargs)
        return CompletionResponse(text=r.message.content or "", raw=r.raw)

    def _stream_complete(self, prompt: str, **kwargs: Any) -> CompletionResponseGen:
        with one_off():
            for r in self._stream_chat(
                [ChatMessage(role=MessageRole.USER, content=prompt)], **kwargs
            ):
                yield CompletionResponse(text=r.message.content or "", delta=r.delta, raw=r.raw)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._complete(prompt, **kwargs)

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        return self._stream_complete(prompt, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> str:
        with one_off():
            return super().predict(*args, **kwargs)

    async def apredict(self, *args: Any, **kwargs: Any) -> str:
        with one_off():
            return await super().apredict(*args, **kwargs)

    def structured_predict(self, *args: Any, **kwargs: Any) -> Any:
        with one_off():
            return super().structured_predict(*args, **kwargs)

    async def astructured_predict(self, *args: Any, **kwargs: Any) -> Any:
        with one_off():
            return await super().astructured_predict(*args, **kwargs)

    # ---- native async: the engine runs in a worker thread -------------------------------
    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await asyncio.to_thread(self._chat, messages, **kwargs)

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        return _threaded(lambda: self._stream_chat(messages, **kwargs))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any):
        return await asyncio.to_thread(self._complete, prompt, **kwargs)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any):
        return _threaded(lambda: self._stream_complete(prompt, **kwargs))

    # ---- function calling -----------------------------------------------------------------
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        messages = list(chat_history or [])
        if isinstance(user_msg, str):
            user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
        if user_msg is not None:
            messages.append(user_msg)
        choice = kwargs.pop("tool_choice", None)
        return {
            "messages": messages,
            "tools": [t.metadata.to_openai_tool() for t in tools],
            "tool_choice": "any" if tool_required and choice is None else choice,
            **kwargs,
        }

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        calls = message_calls(response.message)
        if not calls and error_on_no_tool_call:
            raise ValueError(f"expected a tool call, got {response.message.content!r}")
        return [
            ToolSelection(tool_id=c["id"], tool_name=c["name"], tool_kwargs=c["args"])
            for c in calls
        ]


def _reply(content: str, calls: list[dict]) -> ChatMessage:
    kwargs = {"tool_calls": [{"id": c["id"], "name": c["name"], "args": c["args"]} for c in calls]}
    return ChatMessage(
        role=MessageRole.ASSISTANT, content=content, additional_kwargs=kwargs if calls else {}
    )


async def _threaded(make_iter) -> AsyncIterator[Any]:
    """Run a blocking iterator in a worker thread (in this context); yield on the loop."""
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

    worker = loop.run_in_executor(None, contextvars.copy_context().run, work)
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
