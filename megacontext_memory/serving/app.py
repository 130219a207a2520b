"""The engine as an HTTP service: an OpenAI-compatible chat API plus native session endpoints.

One process hosts one engine (the model loaded once). Clients that already speak the OpenAI
API (the OpenAI SDK, LangChain's `ChatOpenAI`, LlamaIndex's `OpenAILike`) point `base_url` at
it; memory is the difference: the session keeps the whole conversation, so a client may
resend the full list or only the newest message.

A session is named by the `X-Session-Id` header or the request's `user` field. Without
either, the resent message list is routed to the session that holds it, as the in-process
adapters do (`routing.py`), among the sessions this server created that way.

Extensions for the megacontext adapters' client mode (`integrations/`, `base_url=`); an
OpenAI client sends none of them and sees the OpenAI API unchanged:

- chat request fields `ephemeral` (an unnamed call runs in a throwaway session, deleted
  after the reply) and `max_tool_rounds`, `tool_call_threshold`, `max_string_tokens`,
  `system_refresh_tokens` (as in `chat.run_turn`; omitted: its defaults);
- a message may carry `metadata` (a JSON object stored with it; the keys the engine uses
  itself, `mc_origin` and `slot`, are dropped);
- a reply carries `session_id` and `megacontext` (the turn's engine statistics), on the
  last chunk when streamed;
- `POST /v1/sessions/{id}/messages` skips the messages a turn of that session ingested or
  wrote since the last append (a history object adds the turn afterwards; `Router.add`);
  with `"continues": true` the list must continue the session (hold its newest messages),
  only its new part is stored, and any other list is refused with 409 (`Router.extend`);
- `GET /v1/sessions/{id}/messages?view=history`: the messages a history object shows
  (split messages joined, the system prompts and tool lists ingested from chat prompts
  left out), each with its `metadata` and `tokens`;
- `/healthz` also names the base model and the working budget.

Each turn (ingest, refocus, decode, storing the reply) runs whole on one worker thread and
hands its pieces to the response through a queue, so a streamed reply never holds a lock
across the event loop, and turns of different sessions run side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import queue
import re
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from ..chat import Reply, reply_item, run_turn
from ..engine import MegaContextEngine
from ..operations.transfer import export_lines
from ..routing import ORIGIN, Item, get_router, merged_messages
from ..tool_calls import TextStream
from .metrics import Metrics

SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
ROLES |= {"tool": "tool", "function": "tool"}
ROUTER_NAME, ID_PREFIX = "openai", "oa-"
DEFAULT_MAX_BODY = 4 * 1024 * 1024
RESERVED_METADATA = {ORIGIN, "slot"}  # set by the engine, never by a client
HIDDEN = ("prompt-system", "tools")  # ingested from a chat prompt, not history
TURN_OPTIONS = ("max_tool_rounds", "tool_call_threshold", "max_string_tokens")
TURN_OPTIONS += ("system_refresh_tokens",)


class APIError(Exception):
    """An error answered as OpenAI-style JSON with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None

    tool_calls: list[dict[str, Any]] | None = None
    metadata: dict[str, Any] | None = None  # extension: stored with the message

    def item(self, index: int) -> Item:
        """The message as the session holds it (tool calls rendered as the model writes them)."""
        role = ROLES.get(self.role)
        if role is None:
            raise APIError(
                400, f"messages[{index}].role {self.role!r} is not one of {sorted(ROLES)}"
            )
        text = self.content if isinstance(self.content, str) else ""
        if isinstance(self.content, list):
            for part in self.content:
                if part.get("type") != "text":
                    raise APIError(
                        400, f"messages[{index}] has a {part.get('type')!r} part; text only"
                    )
                text += str(part.get("text", ""))
        if role == "assistant" and self.tool_calls:
            text = reply_item(text, [_call(c, index) for c in self.tool_calls]).text
        meta = {k: v for k, v in (self.metadata or {}).items() if k not in RESERVED_METADATA}
        return Item(role, text, meta)


def _call(call: dict, index: int) -> dict:
    """An OpenAI tool call ({"function": {"name", "arguments": JSON text}}) as {"name", "args"}."""
    fn = call.get("function") or {}
    args = fn.get("arguments") or "{}"
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        raise APIError(400, f"messages[{index}].tool_calls: arguments are not JSON") from None
    if not isinstance(fn.get("name"), str) or not isinstance(args, dict):
        raise APIError(400, f"messages[{index}].tool_calls: need a name and object arguments")
    return {"name": fn["name"], "args": args}


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    user: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=1)
    # extensions (see the module docstring)
    ephemeral: bool = False
    max_tool_rounds: int | None = Field(default=None, ge=0)
    tool_call_threshold: float | None = Field(default=None, ge=0.0)
    max_string_tokens: int | None = Field(default=None, ge=1)
    system_refresh_tokens: int | None = Field(default=None, ge=0)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        return [v] if isinstance(v, str) else v


class AppendRequest(BaseModel):
    messages: list[ChatMessage]
    continues: bool = False  # extension: the list must continue the session


class Server:
    """The state behind the routes: the engine, its router, and per-session turn order."""

    def __init__(self, engine: MegaContextEngine, model_name: str, default_max_tokens: int):
        self.engine, self.model_name = engine, model_name
        self.default_max_tokens = default_max_tokens
        self.router = get_router(engine, ROUTER_NAME, ID_PREFIX)
        self.metrics = Metrics()

    # ---- sessions ---------------------------------------------------------------------
    @staticmethod
    def check_id(session_id: str) -> str:
        if not SESSION_ID.match(session_id or ""):
            raise APIError(
                400,
                f"invalid session id {session_id!r}: use 1-128 letters, digits and _.:@- "
                "starting with a letter or digit",
                param="session",
            )
        return session_id

    def existing(self, session_id: str):
        if not self.engine.store.has_session(self.check_id(session_id)):
            raise APIError(404, f"no session {session_id!r}", "not_found_error", "session")
        return self.engine.session(session_id)

    # ---- turns ------------------------------------------------------------------------
    def turn(
        self, req: ChatRequest, session_id: str | None, emit: Callable[[str], None]
    ) -> tuple[Reply, bool]:
        """Ingest what is new and write the reply, passing streamable text to `emit`; runs
        on a worker thread (see `chat.run_turn`). Returns the reply and whether its text
        went out through `emit` (a tool call comes whole at the end instead)."""
        items = [m.item(i) for i, m in enumerate(req.messages)]
        items = [it for it in items if it.text.strip()]
        if not any(it.role != "system" for it in items):
            raise APIError(400, "messages hold no user, assistant or tool text to answer")
        tools = req.tools or []
        for i, tool in enumerate(tools):
            if tool.get("type", "function") != "function" or "name" not in tool.get("function", {}):
                raise APIError(400, f"tools[{i}] is not a function tool with a name", param="tools")
        t0 = time.perf_counter()
        text = TextStream()
        turn = run_turn(
            self.router,
            items,
            session_id=session_id,
            tools=tools,
            tool_choice=_choice(req.tool_choice, tools),
            max_new_tokens=req.max_completion_tokens or req.max_tokens or self.default_max_tokens,
            stop=req.stop or [],
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            ephemeral=req.ephemeral,
            **{k: getattr(req, k) for k in TURN_OPTIONS if getattr(req, k) is not None},
        )
        for kind, value in turn:
            if kind == "call":
                text.calling = True
            elif kind == "text" and (piece := text.feed(value)):
                emit(piece)
            elif kind == "done":
                reply = value
        seconds = time.perf_counter() - t0
        # The reply's own record: the session may be gone (an ephemeral turn) or released
        # and reopened by now, with another turn's telemetry or none.
        self.metrics.turn(reply.telemetry, seconds)
        return reply, text.streaming

    def append(self, session_id: str, messages: list[ChatMessage], continues: bool) -> dict:
        """Append messages without a reply; every message is checked before any is stored.
        Those a turn just ingested or wrote are skipped (`Router.add`); `continues`: the
        list must continue the session and only its new part is stored (`Router.extend`)."""
        self.check_id(session_id)
        if not messages and not continues:
            raise APIError(400, "messages: give at least one message", param="messages")
        items = [m.item(i) for i, m in enumerate(messages)]
        for i, it in enumerate(items):
            if not it.text.strip():
                raise APIError(400, f"messages[{i}] has no text", param=f"messages[{i}]")
        t0 = time.perf_counter()
        if continues:
            added = self.router.extend(session_id, items)
            if added is None:
                raise APIError(
                    409,
                    f"the messages do not continue session {session_id!r} (they do not hold "
                    "its newest messages); delete the session to start it over",
                    "conflict_error",
                    "messages",
                )
        else:
            added = self.router.add(session_id, items)
        session = self.engine.session(session_id)
        tokens = sum(len(self.engine.base.encode(it.text)) for it in added)
        self.metrics.ingest(tokens, time.perf_counter() - t0)
        return {"session": session_id, "appended": len(added), "tokens": session.token_count()}


def _error(status: int, message: str, kind: str, param=None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def _choice(choice, tools: list[dict]):
    """OpenAI's `tool_choice` in the engine's terms ("any" for "required", a name for one)."""
    if not tools or choice in (None, "auto", "none"):
        return choice
    if choice == "required":
        return "any"
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    names = [t["function"]["name"] for t in tools]
    if name not in names:
        raise APIError(400, f"tool_choice {choice!r} names none of the tools {names}")
    return name


def _usage(r: Reply) -> dict:
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "total_tokens": r.prompt_tokens + r.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": r.cached_tokens},
    }


def _stats(r: Reply) -> dict:
    """The turn's engine statistics (extension field `megacontext`)."""
    return {
        "prefill_tokens": r.prefill_tokens,
        "positions_used": r.positions_used,
        "history_tokens": r.history_tokens,
        "ingested_messages": r.ingested_messages,
        "model_name": r.model_name,
    }


def _tool_calls(r: Reply) -> list[dict]:
    return [
        {
            "index": i,
            "id": c["id"],
            "type": "function",
            "function": {"name": c["name"], "arguments": json.dumps(c["args"])},
        }
        for i, c in enumerate(r.calls)
    ]


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def _chunk(cid: str, model: str, delta: dict, finish: str | None = None, **extra) -> str:
    body = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return f"data: {json.dumps(body)}\n\n"


def create_app(
    engine: MegaContextEngine,
    *,
    api_key: str | None = None,
    model_name: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    default_max_tokens: int = 256,
    close_engine: bool = False,
) -> FastAPI:
    """The FastAPI app serving `engine` (one per process; see `megacontext serve`). With
    `close_engine`, the engine is closed when the app shuts down, after the requests in
    flight have finished (for an app that owns its engine, as `megacontext serve`'s)."""
    name = model_name or ("megacontext-" + Path(engine.base.name).name)
    server = Server(engine, name, default_max_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if close_engine:
            engine.close()

    app = FastAPI(title="megacontext", version="0.1.0", lifespan=lifespan)
    app.state.server = server

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key and request.url.path not in ("/healthz",):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "missing or wrong API key", "authentication_error")
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > max_body_bytes):
            # Read (and drop) what the client is sending, so it gets the answer rather than
            # a reset connection; a body far past the limit is cut off.
            seen = 0
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > 16 * max_body_bytes:
                    break
            return _error(413, f"request body over {max_body_bytes} bytes", "invalid_request_error")
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return _error(e.status, e.message, e.kind, e.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return _error(
            400,
            f"{where or 'body'}: {first.get('msg', 'invalid request')}",
            "invalid_request_error",
            where,
        )

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return _error(e.status_code, str(e.detail), "invalid_request_error")

    @app.exception_handler(ValueError)
    async def bad_value(_, e: ValueError):
        return _error(400, str(e), "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal(_, e: Exception):
        return _error(500, f"{type(e).__name__}: {e}", "server_error")

    @app.get("/healthz")
    def healthz() -> dict:
        return {
            "status": "ok",
            "model": name,
            "device": str(engine.base.device),
            "base_model": engine.base.name,
            "working_budget": engine.config.working_budget,
        }

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    @app.get("/v1/models")
    def models() -> dict:
        card = {"id": name, "object": "model", "created": 0, "owned_by": "megacontext"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        session_id = request.headers.get("x-session-id") or req.user
        if session_id is not None:
            server.check_id(session_id)
        cid = _completion_id()
        if not req.stream:
            reply, _ = await asyncio.to_thread(server.turn, req, session_id, lambda _: None)
            message = {"role": "assistant", "content": reply.content or None}
            if reply.calls:
                message["tool_calls"] = _tool_calls(reply)
            else:
                message["content"] = reply.content
            return {
                "id": cid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": name,
                "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason}],
                "usage": _usage(reply),
                "session_id": reply.session_id,
                "megacontext": _stats(reply),
            }
        return StreamingResponse(
            _stream(server, req, session_id, cid, name),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    @app.post("/v1/sessions/{session_id}/messages")
    async def append(session_id: str, body: AppendRequest) -> dict:
        return await asyncio.to_thread(server.append, session_id, body.messages, body.continues)

    @app.get("/v1/sessions/{session_id}/messages")
    def messages(session_id: str, view: str = "log") -> dict:
        """The lossless log; `view=history`: what a history object shows (extension)."""
        if view not in ("log", "history"):
            raise APIError(400, f"view {view!r} is not 'log' or 'history'", param="view")
        session = server.existing(session_id)
        if view == "log":
            return {"session": session_id, "messages": [m.to_dict() for m in session.messages()]}
        encode = engine.base.encode
        rows = [
            {"role": role, "content": content, "metadata": meta, "tokens": len(encode(content))}
            for role, content, meta in merged_messages(session)
            if meta.get(ORIGIN) not in HIDDEN
        ]
        return {"session": session_id, "messages": rows}

    @app.delete("/v1/sessions/{session_id}")
    def delete(session_id: str) -> dict:
        server.existing(session_id)
        server.router.discard(session_id)
        return {"session": session_id, "deleted": True}

    @app.get("/v1/sessions/{session_id}/export")
    def export(session_id: str) -> Response:
        server.existing(session_id)
        lines = export_lines(engine.store.open_session(session_id))
        return Response("".join(line + "\n" for line in lines), media_type="application/x-ndjson")

    @app.get("/v1/sessions/{session_id}/focus.png")
    def focus_png(session_id: str) -> Response:
        from ..plots import focus_map

        session = server.existing(session_id)
        with server.router.lock(session_id):
            session.refocus()
            row = session.level_map()
        with tempfile.TemporaryDirectory() as tmp:
            png = focus_map([row], Path(tmp) / "focus.png", [session_id])
            return Response(png.read_bytes(), media_type="image/png")

    return app


async def _stream(
    server: Server, req: ChatRequest, session_id: str | None, cid: str, model: str
) -> AsyncIterator[str]:
    """Server-sent events of one turn; the turn itself runs on a worker thread."""
    pieces: queue.Queue = queue.Queue()
    done = object()
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["result"] = server.turn(req, session_id, pieces.put)
        except BaseException as e:  # surfaced to the client as an error event
            outcome["error"] = e
        finally:
            pieces.put(done)

    threading.Thread(target=work, name=f"turn-{cid}", daemon=True).start()
    yield _chunk(cid, model, {"role": "assistant", "content": ""})
    while (piece := await asyncio.to_thread(pieces.get)) is not done:
        yield _chunk(cid, model, {"content": piece})
    if "error" in outcome:
        e = outcome["error"]
        status, kind = (e.status, e.kind) if isinstance(e, APIError) else (500, "server_error")
        message = e.message if isinstance(e, APIError) else f"{type(e).__name__}: {e}"
        yield f"data: {json.dumps({'error': {'message': message, 'type': kind, 'code': status}})}\n\n"
    else:
        reply, streamed = outcome["result"]
        delta: dict[str, Any] = {}
        if not streamed and reply.content:
            delta["content"] = reply.content
        if reply.calls:
            delta["tool_calls"] = _tool_calls(reply)
        extra = {"session_id": reply.session_id, "megacontext": _stats(reply)}
        yield _chunk(cid, model, delta, reply.finish_reason, usage=_usage(reply), **extra)
    yield "data: [DONE]\n\n"
