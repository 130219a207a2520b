"""Client mode: an adapter talks to `megacontext serve` (`base_url=`) instead of an engine.

Shared by the LangChain and LlamaIndex adapters. `Client.turn` takes what `megacontext_memory.chat.run_turn` takes and yields what it
yields (text pieces, then a `Reply`), over the server's OpenAI-compatible streaming API, so
the adapter maps a remote turn exactly as a local one. The history side uses the native
session endpoints. The server extensions used here are listed in `serving/app.py`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import quote

import httpx

from megacontext_memory import tool_calls
from megacontext_memory.chat import Reply
from megacontext_memory.routing import Item

ENGINE_ARGS = ("store", "working_budget", "model", "device", "engine_kwargs")
"""Constructor arguments that name an in-process engine (not allowed with `base_url`)."""


class ServerError(RuntimeError):
    """The server refused a request or could not be reached."""

    def __init__(self, status: int | None, message: str):
        super().__init__(message)
        self.status = status


class AuthenticationError(ServerError, PermissionError):
    """401: the server wants another API key."""


class BadRequestError(ServerError, ValueError):
    """400, 404, 409, 413: the request itself was wrong (ValueError, as in-process)."""


def check_engine_args(owner: str, given: Sequence[str]) -> None:
    """ValueError when a client-mode object was also given in-process engine arguments."""
    if given:
        raise ValueError(
            f"{owner}: base_url= talks to a megacontext server, which has its own engine; "
            f"drop the in-process engine arguments {sorted(given)} (or drop base_url)"
        )


def no_engine(owner: str) -> RuntimeError:
    return RuntimeError(
        f"{owner} was built with base_url=: it talks to a megacontext server and has no "
        "in-process engine (read the session through the server's endpoints instead)"
    )


class Client:
    """A megacontext server at `base_url` (with or without the trailing /v1)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0):
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self._info: dict | None = None

    # ---- plumbing -------------------------------------------------------------------------
    def _fail(self, response: httpx.Response) -> ServerError:
        try:
            error = response.json().get("error") or {}
        except ValueError:
            error = {}
        message = error.get("message") or response.text[:500] or response.reason_phrase
        return _error(response.status_code, f"{self.base_url}: {message}")

    def request(self, method: str, path: str, **kwargs: Any) -> dict | None:
        """The JSON answer; None for a 404 about a session that does not exist."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise ServerError(None, f"cannot reach {self.base_url}: {e}") from e
        if response.status_code == 404 and _session_missing(response):
            return None
        if response.status_code >= 400:
            raise self._fail(response)
        return response.json()

    def info(self) -> dict:
        """/healthz: the served model and working budget (asked once)."""
        if self._info is None:
            self._info = self.request("GET", "/healthz")
        return self._info

    # ---- the chat model side ---------------------------------------------------------------
    def turn(
        self,
        items: list[Item],
        *,
        session_id: str | None = None,
        tools: list[dict] = (),
        tool_choice: Any = None,
        max_new_tokens: int = 256,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        ephemeral: bool = False,
        **options: Any,
    ) -> Iterator[tuple[str, Any]]:
        """`run_turn` on the server: ("text", piece)... as decoded, then ("done", Reply).
        `options`: max_tool_rounds, tool_call_threshold, max_string_tokens,
        system_refresh_tokens (sent as the server's extension fields)."""
        body: dict[str, Any] = {
            "messages": _wire(items),
            "max_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "stream": True,
            "ephemeral": ephemeral,
            **options,
        }
        if stop:
            body["stop"] = list(stop)
        if seed is not None:
            body["seed"] = seed
        if tools:
            body["tools"], body["tool_choice"] = list(tools), _choice(tool_choice)
        headers = {"X-Session-Id": session_id} if session_id else {}
        text, final = [], None
        try:
            with self.http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
                if r.status_code >= 400:
                    r.read()
                    raise self._fail(r)
                for line in r.iter_lines():
                    if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                        continue
                    event = json.loads(line[5:])
                    if "error" in event:
                        e = event["error"]
                        raise _error(e.get("code"), f"{self.base_url}: {e.get('message')}")
                    choice = event["choices"][0]
                    piece = choice["delta"].get("content") or ""
                    if piece:
                        text.append(piece)
                        yield "text", piece
                    if choice.get("finish_reason"):
                        final = (event, choice)
        except httpx.HTTPError as e:
            raise ServerError(None, f"cannot reach {self.base_url}: {e}") from e
        if final is None:
            raise ServerError(None, f"{self.base_url}: the reply stream ended early")
        yield "done", _reply("".join(text), *final)

    # ---- the history side ------------------------------------------------------------------
    def messages(self, session_id: str) -> list[dict]:
        """What a history object shows: [{"role", "content", "metadata", "tokens"}]."""
        body = self.request("GET", _path(session_id, "/messages"), params={"view": "history"})
        return [] if body is None else body["messages"]

    def append(self, session_id: str, items: Sequence[Item], continues: bool = False) -> bool:
        """Store messages (those the chat model just ingested are skipped); `continues`:
        False, storing nothing, when the list does not continue the session."""
        if not items and not continues:
            return True
        body = {
            "messages": _wire(items),
            "continues": continues,
        }
        try:
            self.request("POST", _path(session_id, "/messages"), json=body)
        except BadRequestError as e:
            if e.status == 409:
                return False
            raise
        return True

    def delete(self, session_id: str) -> None:
        """Delete the session (nothing to do when there is none)."""
        self.request("DELETE", _path(session_id))


_CLIENTS: dict[tuple, Client] = {}
_LOCK = threading.Lock()


def client_for(base_url: str, api_key: str | None, timeout: float) -> Client:
    """One client (connection pool) per server, key and timeout in a process."""
    key = (base_url, api_key, timeout)
    with _LOCK:
        if key not in _CLIENTS:
            _CLIENTS[key] = Client(base_url, api_key, timeout)
        return _CLIENTS[key]


def _path(session_id: str, rest: str = "") -> str:
    return "/v1/sessions/" + quote(session_id, safe="") + rest


def _wire(items: Sequence[Item]) -> list[dict]:
    """Messages as sent: the text as the engine ingests it (tool calls rendered), and the
    adapter's metadata, stored with it so a history rebuilds the framework's message."""
    return [{"role": it.role, "content": it.text, "metadata": it.metadata} for it in items]


def _error(status: int | None, message: str) -> ServerError:
    if status == 401:
        return AuthenticationError(status, f"{message} (check api_key / $MEGACONTEXT_API_KEY)")
    if status in (400, 404, 409, 413, 422):
        return BadRequestError(status, message)
    return ServerError(status, message)


def _session_missing(response: httpx.Response) -> bool:
    try:
        return (response.json().get("error") or {}).get("param") == "session"
    except ValueError:
        return False


def _choice(choice: Any) -> Any:
    """The adapters' tool choice ("any", True, a tool name) in OpenAI's terms."""
    if choice in ("any", "required", True):
        return "required"
    if isinstance(choice, str) and choice not in ("auto", "none"):
        return {"type": "function", "function": {"name": choice}}
    return choice


def _reply(streamed: str, event: dict, choice: dict) -> Reply:
    """The last chunk of a streamed reply as the `Reply` a local turn returns."""
    calls = [
        {
            "id": c["id"],
            "name": c["function"]["name"],
            "args": json.loads(c["function"].get("arguments") or "{}"),
        }
        for c in choice["delta"].get("tool_calls") or []
    ]
    content = streamed
    if calls and tool_calls.OPEN in content:  # text that opened a call midway
        content = tool_calls.parse_calls(content)[0]
    usage, stats = event.get("usage") or {}, event.get("megacontext") or {}
    return Reply(
        session_id=event.get("session_id", ""),
        content=content,
        calls=calls,
        finish_reason=choice["finish_reason"],
        prompt_tokens=usage.get("prompt_tokens", 0),
        completion_tokens=usage.get("completion_tokens", 0),
        cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
        prefill_tokens=stats.get("prefill_tokens", 0),
        positions_used=stats.get("positions_used", 0),
        history_tokens=stats.get("history_tokens", 0),
        ingested_messages=stats.get("ingested_messages", 0),
        model_name=stats.get("model_name", ""),
    )
