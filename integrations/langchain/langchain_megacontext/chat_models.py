"""ChatMegaContext: a LangChain chat model whose memory is a MegaContext engine."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.chat_models import LangSmithParams
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
    message_to_dict,
)
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, ensure_config
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, SecretStr, model_validator

from megacontext_memory import tool_calls as _guide
from megacontext_memory.chat import Reply, run_turn
from megacontext_memory.routing import Item, Router, router_for
from megacontext_memory.serving.client import (
    ENGINE_ARGS,
    Client,
    check_engine_args,
    client_for,
    no_engine,
)

ROUTER_NAME, ID_PREFIX = "langchain", "lc-"
SESSION_TAG = "megacontext_session"
"""`additional_kwargs` key naming the session of a message read from a history object."""
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_UNSUPPORTED_BLOCKS = {"image", "image_url", "audio", "input_audio", "file", "video"}


def content_text(content: Any) -> str:
    """The text of a message's content (str or a list of content blocks)."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content or []:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict):
            kind = block.get("type")
            if kind == "text":
                parts.append(block.get("text", ""))
            elif kind in _UNSUPPORTED_BLOCKS:
                raise ValueError(
                    f"ChatMegaContext is a text-only model; {kind!r} content is not supported"
                )
    return "".join(parts)


def to_item(message: BaseMessage) -> Item | None:
    """A LangChain message as the engine ingests it (None: nothing to ingest)."""
    text = content_text(message.content)
    meta: dict[str, Any] = {}
    if isinstance(message, SystemMessage):
        role = "system"
    elif isinstance(message, HumanMessage):
        role = "user"
    elif isinstance(message, AIMessage):
        role = "assistant"
        calls = "".join(_guide.render_call(c["name"], c["args"]) for c in message.tool_calls)
        text = text + ("\n" if text and calls else "") + calls
    elif isinstance(message, ToolMessage):
        role = "tool"
    elif isinstance(message, ChatMessage):
        role = {"human": "user", "ai": "assistant"}.get(message.role, message.role)
        if role not in ("system", "user", "assistant", "tool"):
            role = "user"
    else:
        role = "user"
    if not text.strip():
        return None
    try:
        lc = message_to_dict(message)
        lc["data"].get("additional_kwargs", {}).pop(SESSION_TAG, None)  # stored untagged
        json.dumps(lc)
        meta["lc"] = lc
    except (TypeError, ValueError):
        pass
    return Item(role, text, meta)


def tagged_session(messages: Sequence[BaseMessage]) -> str | None:
    """The session named by messages read from a history object (ValueError if several)."""
    tags = {m.additional_kwargs.get(SESSION_TAG) for m in messages} - {None}
    if len(tags) > 1:
        raise ValueError(f"messages from several sessions {sorted(tags)} in one call")
    return tags.pop() if tags else None


def reply_message(text: str, tools_bound: bool, base: str) -> tuple[str, list[dict]]:
    """(content, tool calls) of a generated reply; ids are derived from the chain."""
    if not tools_bound and _guide.OPEN not in text:
        return text, []
    content, calls = _guide.parse_calls(text)
    tool_calls = [
        {"name": c["name"], "args": c["args"], "id": _guide.call_id(base, i), "type": "tool_call"}
        for i, c in enumerate(calls)
    ]
    return content, tool_calls


class ChatMegaContext(BaseChatModel):
    """Chat model backed by a MegaContext engine: unbounded memory at a fixed budget.

    Every call routes to an engine session and ingests only the messages it does not hold
    (see `megacontext_memory.routing`). The session is, in order: the `session_id` of the
    call, of this object, `configurable.session_id` / `thread_id` of the run's config, the
    session of messages read from a `MegaContextChatMessageHistory`; otherwise an automatic
    session matched by content (`ephemeral=True`: a throwaway one). The session is part of
    the cache key.

    ```python
    from langchain_megacontext import ChatMegaContext

    llm = ChatMegaContext(store="memory", working_budget=1024, max_tokens=64)
    llm.invoke("My locker code is 4417.")
    ```

    With `base_url=` (and `api_key=`) the turns run on a `megacontext serve` server
    instead, alike: the session it knows goes as `X-Session-Id` (none: the server routes
    by content), replies stream as server-sent events, tools go in OpenAI's shape.
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    store: str = Field(
        default_factory=lambda: os.environ.get("MEGACONTEXT_STORE", "megacontext-store")
    )
    """Directory of the engine's store (created if missing); default $MEGACONTEXT_STORE."""
    working_budget: int = 1024
    """Positions the frozen model ever sees (history + prompt + reply)."""
    model: str = Field(default="default", alias="model_name")
    """Base model: "default" (SmolLM2-135M-Instruct) or a Hugging Face id/path."""
    device: str | None = None
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Further engine Config fields (e.g. {"gist_checkpoint": None})."""
    session_id: str | None = None
    """Pin every call to this session; None routes by content."""
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] | None = None
    seed: int | None = None
    streaming: bool = False
    config_session_keys: list[str] = Field(default_factory=lambda: ["session_id", "thread_id"])
    """`configurable` keys naming the session (RunnableWithMessageHistory, LangGraph)."""
    ephemeral: bool = False
    """Calls that name no session run in a throwaway session (one-off prompts, batch jobs,
    structured output over a dataset); also per call: `invoke(..., ephemeral=True)`."""
    max_tool_rounds: int = 1
    """Tool calls per user turn; after this many the model must answer (a small model
    tends to call its tool again and again)."""
    tool_call_threshold: float = 0.004
    """With tools bound and no forced choice: open a tool call when the model's first-step
    probability of doing so is at least this."""
    max_string_tokens: int = 24
    """Cap on tokens per string argument of a tool call."""
    system_refresh_tokens: int | None = None
    """Re-ingest a system prompt (or tool list) once it is this many tokens back; None: once."""
    base_url: str | None = None
    """A `megacontext serve` server (e.g. "http://127.0.0.1:8000") to run the turns on,
    instead of an engine in this process; not together with store/model/engine settings."""
    api_key: SecretStr | None = None
    """The server's API key (with `base_url`); default $MEGACONTEXT_API_KEY."""
    timeout: float = 600.0
    """Seconds to wait for the server (with `base_url`)."""

    @model_validator(mode="after")
    def _client_mode(self) -> ChatMegaContext:
        if self.base_url:
            check_engine_args("ChatMegaContext", set(ENGINE_ARGS) & self.model_fields_set)
            if self.api_key is None and os.environ.get("MEGACONTEXT_API_KEY"):
                self.api_key = SecretStr(os.environ["MEGACONTEXT_API_KEY"])
        return self

    # ---- langchain plumbing -------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "megacontext"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        if self.base_url:
            engine = {"base_url": self.base_url}
        else:
            engine = {
                "model": self.model,
                "store": self.store,
                "working_budget": self.working_budget,
            }
        return {
            **engine,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "session_id": self.session_id,
        }

    def _get_llm_string(self, stop: list[str] | None = None, **kwargs: Any) -> str:
        """Cache key: another session's cached answer must never be served."""
        session = kwargs.pop("session_id", None) or self.session_id or self._session_from_config()
        return super()._get_llm_string(stop, **kwargs) + f"---session={session!r}"

    @property
    def model_name_resolved(self) -> str:
        return DEFAULT_MODEL_NAME if self.model in ("default", DEFAULT_MODEL_NAME) else self.model

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="megacontext",
            ls_model_name=kwargs.get("model") or self.model_name_resolved,
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
        )
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if isinstance(max_tokens, int):
            params["ls_max_tokens"] = max_tokens
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    @property
    def router(self) -> Router:
        """This adapter's router (engine loaded on first use, shared per store in a process)."""
        if self.base_url:
            raise no_engine("ChatMegaContext")
        return router_for(self, ROUTER_NAME, ID_PREFIX)

    @property
    def client(self) -> Client | None:
        """The server's client with `base_url` (None: in-process)."""
        if not self.base_url:
            return None
        key = self.api_key.get_secret_value() if self.api_key else None
        return client_for(self.base_url, key, self.timeout)

    @property
    def engine(self):
        return self.router.engine

    def _session_from_config(self, config: RunnableConfig | None = None) -> str | None:
        """The session named under `configurable` (RunnableWithMessageHistory's session_id,
        LangGraph's thread_id) of `config`, or of the running config."""
        configurable = ensure_config(config).get("configurable") or {}
        for key in self.config_session_keys:
            value = configurable.get(key)
            if isinstance(value, str) and value:
                return value
        return None

    def _with_session(self, config: RunnableConfig | None, kwargs: dict) -> dict:
        """Direct calls get no runnable context: take the session from their config."""
        if not (kwargs.get("session_id") or self.session_id):
            sid = self._session_from_config(config)
            if sid:
                kwargs = {**kwargs, "session_id": sid}
        return kwargs

    def invoke(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ):
        return super().invoke(input, config, **self._with_session(config, kwargs))

    async def ainvoke(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ):
        return await super().ainvoke(input, config, **self._with_session(config, kwargs))

    def stream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ):
        return super().stream(input, config, **self._with_session(config, kwargs))

    def astream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ):
        return super().astream(input, config, **self._with_session(config, kwargs))

    def _session_for(self, messages: list[BaseMessage], kwargs: dict) -> str | None:
        named = kwargs.get("session_id") or self.session_id or self._session_from_config()
        tagged = tagged_session(messages)
        if named and tagged and named != tagged:
            raise ValueError(
                f"this call is for session {named!r} but its messages come from the history "
                f"of session {tagged!r}"
            )
        return named or tagged

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: dict | str | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools; `tool_choice` may be None/"auto", "none", "any"/"required"/True or a
        tool name (forced calls are decoded under the tool's JSON schema)."""
        formatted = [convert_to_openai_tool(t) for t in tools]
        if tool_choice is True:
            tool_choice = "any"
        if tool_choice == "required":
            tool_choice = "any"
        if isinstance(tool_choice, str) and tool_choice not in ("auto", "none", "any"):
            names = [t["function"]["name"] for t in formatted]
            if tool_choice not in names:
                raise ValueError(f"tool_choice {tool_choice!r} is not one of the tools {names}")
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    # ---- the turn -------------------------------------------------------------------------
    def _turn(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict
    ) -> Iterator[tuple[str, Any]]:
        """Yields ("call" | "text", ""), ("text", piece)..., then ("done", (content, tool
        calls, usage, metadata)); the turn itself is `megacontext_memory.chat.run_turn`, here
        or on the server (`base_url`)."""
        model = kwargs.get("model")
        if model and model not in (self.model, self.model_name_resolved):
            raise ValueError(
                f"ChatMegaContext serves {self.model_name_resolved!r}; per-call model "
                f"override {model!r} is not supported"
            )
        client = self.client
        turn = (client.turn if client else functools.partial(run_turn, self.router))(
            [it for it in (to_item(m) for m in messages) if it is not None],
            session_id=self._session_for(messages, kwargs),
            tools=kwargs.get("tools") or [],
            tool_choice=kwargs.get("tool_choice"),
            max_tool_rounds=self.max_tool_rounds,
            max_new_tokens=int(kwargs.get("max_tokens") or self.max_tokens),
            stop=list(stop or kwargs.get("stop") or self.stop or []),
            temperature=float(kwargs.get("temperature", self.temperature)),
            top_p=float(kwargs.get("top_p", self.top_p)),
            seed=kwargs.get("seed", self.seed),
            tool_call_threshold=self.tool_call_threshold,
            max_string_tokens=self.max_string_tokens,
            system_refresh_tokens=self.system_refresh_tokens,
            ephemeral=bool(kwargs.get("ephemeral", self.ephemeral)),
        )
        for kind, value in turn:
            if kind != "done":
                yield kind, value
                continue
            r: Reply = value
            tool_calls = [
                {"name": c["name"], "args": c["args"], "id": c["id"], "type": "tool_call"}
                for c in r.calls
            ]
            usage = {
                "input_tokens": r.prompt_tokens,
                "output_tokens": r.completion_tokens,
                "total_tokens": r.prompt_tokens + r.completion_tokens,
                "input_token_details": {"cache_read": r.cached_tokens},
            }
            meta = {
                "model_name": r.model_name,
                "model_provider": "megacontext",
                "session_id": r.session_id,
                "positions_used": r.positions_used,
                "history_tokens": r.history_tokens,
                "prefill_tokens": r.prefill_tokens,
                "ingested_messages": r.ingested_messages,
                "finish_reason": r.finish_reason,
            }
            yield "done", (r.content, tool_calls, usage, meta)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        result = None
        for kind, value in self._turn(messages, stop, kwargs):
            if kind == "text" and value and run_manager and not kwargs.get("tools"):
                run_manager.on_llm_new_token(value)
            elif kind == "done":
                result = value
        content, tool_calls, usage, meta = result
        message = AIMessage(
            content=content,
            tool_calls=tool_calls,
            usage_metadata=usage,
            response_metadata=meta,
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        """Text streams token by token, also with tools bound; a tool call comes whole."""
        text = _guide.TextStream()
        for kind, value in self._turn(messages, stop, kwargs):
            if kind == "call":
                text.calling = True
            elif kind == "text" and (piece := text.feed(value)):
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
                if run_manager:
                    run_manager.on_llm_new_token(chunk.message.content, chunk=chunk)
                yield chunk
            if kind != "done":
                continue
            content, tool_calls, usage, meta = value
            chunks = [
                tool_call_chunk(name=c["name"], args=json.dumps(c["args"]), id=c["id"], index=i)
                for i, c in enumerate(tool_calls)
            ]
            last = AIMessageChunk(
                content="" if text.streaming else content,
                tool_call_chunks=chunks,
                usage_metadata=usage,
                response_metadata=meta,
                chunk_position="last",
            )
            chunk = ChatGenerationChunk(message=last)
            if run_manager and last.content:
                run_manager.on_llm_new_token(last.content, chunk=chunk)
            yield chunk

    # ---- native async: the engine runs in a worker thread, the event loop stays free -------
    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        chunks = []
        async for chunk in self._astream(messages, stop, run_manager, _buffer=True, **kwargs):
            chunks.append(chunk)
        content, tool_calls, usage, meta = chunks[-1]
        message = AIMessage(
            content=content, tool_calls=tool_calls, usage_metadata=usage, response_metadata=meta
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        _buffer: bool = False,
        **kwargs: Any,
    ) -> AsyncIterator[Any]:
        if not (kwargs.get("session_id") or self.session_id):
            kwargs["session_id"] = self._session_from_config()  # contextvars stay on this thread
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        done = object()

        def work() -> None:
            try:
                if _buffer:
                    for item in self._turn(messages, stop, kwargs):
                        if cancelled.is_set():
                            break
                        if item[0] == "done":
                            loop.call_soon_threadsafe(queue.put_nowait, ("ok", item[1]))
                else:
                    for chunk in self._stream(messages, stop, None, **kwargs):
                        if cancelled.is_set():
                            break
                        loop.call_soon_threadsafe(queue.put_nowait, ("ok", chunk))
            except BaseException as e:  # handed to the awaiting side
                loop.call_soon_threadsafe(queue.put_nowait, ("err", e))
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, ("end", done))

        worker = loop.run_in_executor(None, work)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "end":
                    break
                if kind == "err":
                    raise value
                if not _buffer and run_manager and value.message.content:
                    await run_manager.on_llm_new_token(value.message.content, chunk=value)
                yield value
        finally:
            cancelled.set()
            await worker
