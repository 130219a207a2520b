"""The engine as an HTTP service: an OpenAI-compatible chat API plus native session endpoints.

One process hosts one engine (the model loaded once). Clients that already speak the OpenAI
API (the OpenAI SDK, LangChain's `ChatOpenAI`, LlamaIndex's `OpenAILike`) point `base_url` at
it; memory is the difference: the session keeps the whole conversation, so a client may
resend the full list or only the newest message.

A session is named by the `X-Session-Id` header or the request's `user` field. Without
either, the resent message list is routed to the session that holds it, as the in-process
adapters do (`routing.py`), among the sessions this server created that way.

Each turn (ingest, refocus, decode, storing the reply) runs whole on one worker thread and
hands its pieces to the response through a queue, so a streamed reply never holds a lock
across the event loop, and turns of different sessions run side by side.
"""

from __future__ import annotations

import asyncio
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

from ..engine import MegaContextEngine
from ..routing import Item, get_router
from ..store.transfer import export_lines
from .metrics import Metrics

SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
ROLES |= {"tool": "tool", "function": "tool"}
ROUTER_NAME, ID_PREFIX = "openai", "oa-"
DEFAULT_MAX_BODY = 4 * 1024 * 1024


class APIError(Exception):
    """An error answered as OpenAI-style JSON with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None

    def item(self, index: int) -> Item:
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
        return Item(role, text)


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
    n: int = Field(default=1, ge=1, le=1)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        return [v] if isinstance(v, str) else v


class AppendRequest(BaseModel):
    messages: list[ChatMessage] = Field(min_length=1)


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
    def turn(self, req: ChatRequest, session_id: str | None, emit: Callable[[str], None]) -> dict:
        """Ingest what is new, write the reply (each piece passed to `emit`); runs on a
        worker thread and returns the turn's summary."""
        items = [m.item(i) for i, m in enumerate(req.messages)]
        items = [it for it in items if it.text.strip()]
        if not any(it.role != "system" for it in items):
            raise APIError(400, "messages hold no user, assistant or tool text to answer")
        max_tokens = req.max_completion_tokens or req.max_tokens or self.default_max_tokens
        t0 = time.perf_counter()
        with self.router.turn(items, session_id) as turn:
            session, out = turn.session, []
            for piece in session.generate(
                max_new_tokens=max_tokens,
                stream=True,
                temperature=req.temperature,
                top_p=req.top_p,
                stop=req.stop,
                seed=req.seed,
            ):
                out.append(piece)
                emit(piece)
            reply = "".join(out)
            turn.commit_reply(Item("assistant", reply) if reply.strip() else None)
            tel = session.telemetry[-1]
            completion = len(self.engine.base.encode(reply)) if reply else 0
        self.metrics.turn(tel, time.perf_counter() - t0)
        return {
            "session": session.id,
            "reply": reply,
            "finish_reason": "length" if completion >= max_tokens else "stop",
            "usage": {
                "prompt_tokens": tel.positions_used,
                "completion_tokens": completion,
                "total_tokens": tel.positions_used + completion,
            },
        }

    def append(self, session_id: str, messages: list[ChatMessage]) -> dict:
        """Append messages without a reply; every message is checked before any is stored."""
        self.check_id(session_id)
        items = [m.item(i) for i, m in enumerate(messages)]
        for i, it in enumerate(items):
            if not it.text.strip():
                raise APIError(400, f"messages[{i}] has no text", param=f"messages[{i}]")
        t0 = time.perf_counter()
        added = self.router.add(session_id, items)
        session = self.engine.session(session_id)
        tokens = sum(len(self.engine.base.encode(it.text)) for it in added)
        self.metrics.ingest(tokens, time.perf_counter() - t0)
        return {"session": session_id, "appended": len(added), "tokens": session.token_count()}


def _error(status: int, message: str, kind: str, param=None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


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
) -> FastAPI:
    """The FastAPI app serving `engine` (one per process; see `megacontext serve`)."""
    name = model_name or ("megacontext-" + Path(engine.base.name).name)
    server = Server(engine, name, default_max_tokens)
    app = FastAPI(title="megacontext", version="0.1.0")
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
        return {"status": "ok", "model": name, "device": str(engine.base.device)}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    @app.get("/v1/models")
    def models() -> dict:
        card = {"id": name, "object": "model", "created": 0, "owned_by": "megacontext"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        if req.tools:
            raise APIError(400, "tools are not supported by this server", param="tools")
        session_id = request.headers.get("x-session-id") or req.user
        if session_id is not None:
            server.check_id(session_id)
        cid = _completion_id()
        if not req.stream:
            result = await asyncio.to_thread(server.turn, req, session_id, lambda _: None)
            return {
                "id": cid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result["reply"]},
                        "finish_reason": result["finish_reason"],
                    }
                ],
                "usage": result["usage"],
                "session_id": result["session"],
            }
        return StreamingResponse(
            _stream(server, req, session_id, cid, name),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    @app.post("/v1/sessions/{session_id}/messages")
    async def append(session_id: str, body: AppendRequest) -> dict:
        return await asyncio.to_thread(server.append, session_id, body.messages)

    @app.get("/v1/sessions/{session_id}/messages")
    def messages(session_id: str) -> dict:
        session = server.existing(session_id)
        return {"session": session_id, "messages": [m.to_dict() for m in session.messages()]}

    @app.delete("/v1/sessions/{session_id}")
    def delete(session_id: str) -> dict:
        server.existing(session_id)
        with server.router.lock(session_id):
            deleted = engine.delete_session(session_id)
            server.router.forget(session_id)
        return {"session": session_id, "deleted": deleted}

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
        result = outcome["result"]
        yield _chunk(cid, model, {}, result["finish_reason"], usage=result["usage"])
    yield "data: [DONE]\n\n"
