"""`megacontext serve` as users run it: a real server process on localhost, real clients."""

from __future__ import annotations

import json
import signal
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from megacontext_memory.serving.process import ServerProcess

FACT, QUESTION, ANSWER = (
    "My storage unit code is 7391.",
    "What is my storage unit code? Answer with the number.",
    "7391",
)
SMALL_TALK = [
    "I went for a walk by the river this morning.",
    "The weather was cold but sunny.",
    "Do you like autumn?",
    "I made tea when I got home.",
    "My neighbour has a new dog.",
    "It barks at the postman every day.",
    "I am reading a book about ships.",
    "The chapters are short, which I like.",
    "Tomorrow I will visit my aunt.",
    "She lives near the old harbour.",
    "We usually bake bread together.",
    "Last time the loaf came out flat.",
    "I think the oven was too cold.",
    "This time I will buy fresh yeast.",
    "Her cat always sits on the windowsill.",
    "It watches the boats come in.",
    "In the evening we play cards.",
    "She wins almost every game.",
]


class Server(ServerProcess):
    """The served engine, with a helper for raw requests."""

    def __init__(
        self, store: Path, api_key: str | None = None, budget: int = 512, options: tuple = ()
    ):
        options = ["gist_refine_steps=0", *options]  # ingest speed, not gist quality, is tested
        super().__init__(store, budget=budget, api_key=api_key, max_tokens=24, options=options)
        self.api_key = api_key

    def request(self, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
        """(status, parsed JSON or bytes) of one request."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        h = {"Content-Type": "application/json", **(headers or {})}
        if self.api_key and "Authorization" not in h:
            h["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                status, payload, kind = r.status, r.read(), r.headers.get("content-type", "")
        except urllib.error.HTTPError as e:
            status, payload, kind = e.code, e.read(), e.headers.get("content-type", "")
        return status, json.loads(payload) if kind.startswith("application/json") else payload


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # The 20-turn conversations (~530 tokens) fit the budget: what is tested here is that
    # the server stores each message once and routes every turn to its session, so the
    # reader sees what the in-process engine shows it (and answers the same).
    s = Server(tmp_path_factory.mktemp("served"), api_key="sk-test", budget=1024).start()
    yield s
    s.stop()


def _conversation(say) -> str:
    """The fact, small talk, then the question; `say(text)` returns the assistant's reply."""
    say(FACT)
    for line in SMALL_TALK:
        say(line)
    return say(QUESTION)


def test_openai_sdk_holds_a_conversation_and_recalls_the_first_turn(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="sk-test")
    messages: list[dict] = []

    def say(text: str) -> str:
        messages.append({"role": "user", "content": text})
        r = client.chat.completions.create(
            model="megacontext", messages=messages, user="sdk-user", max_tokens=24
        )
        reply = r.choices[0].message.content
        messages.append({"role": "assistant", "content": reply})
        return reply

    answer = _conversation(say)
    assert ANSWER in answer
    status, body = server.request("GET", "/v1/sessions/sdk-user/messages")
    log = body["messages"]
    # Each message once, although the client resent the whole list every turn.
    assert [m["content"] for m in log if m["role"] == "user"] == [FACT, *SMALL_TALK, QUESTION]
    assert len(log) == 2 * (len(SMALL_TALK) + 2)

    pieces = client.chat.completions.create(
        model="megacontext",
        messages=[{"role": "user", "content": "Say hello."}],
        user="sdk-user",
        max_tokens=8,
        stream=True,
    )
    chunks = [c.choices[0] for c in pieces if c.choices]
    text = "".join(c.delta.content or "" for c in chunks)
    assert len([c for c in chunks if c.delta.content]) > 1  # streamed in pieces
    assert chunks[-1].finish_reason in ("stop", "length")
    _, body = server.request("GET", "/v1/sessions/sdk-user/messages")
    assert body["messages"][-1]["content"] == text


def test_langchain_chat_openai_pins_a_session_by_header(server):
    from langchain_core.messages import AIMessage, HumanMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=server.url + "/v1",
        api_key="sk-test",
        model="megacontext",
        max_tokens=24,
        temperature=0,
        default_headers={"X-Session-Id": "lc-user"},
    )
    history: list = []

    def say(text: str) -> str:
        history.append(HumanMessage(text))
        reply = llm.invoke(history)
        history.append(AIMessage(reply.content))
        return reply.content

    assert ANSWER in _conversation(say)
    streamed = list(llm.stream([HumanMessage("Say hello.")]))
    assert sum(bool(c.content) for c in streamed) > 1


def test_chat_openai_calls_a_tool_and_answers_from_its_result(server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return f"It is sunny and 21 degrees in {city}."

    llm = ChatOpenAI(
        base_url=server.url + "/v1",
        api_key="sk-test",
        model="megacontext",
        max_tokens=32,
        temperature=0,
        default_headers={"X-Session-Id": "lc-tools"},
    )
    question = HumanMessage("What is the weather in Paris?")
    call = llm.bind_tools([get_weather], tool_choice="get_weather").invoke([question])
    assert [c["name"] for c in call.tool_calls] == ["get_weather"]
    assert isinstance(call.tool_calls[0]["args"].get("city"), str)
    result = ToolMessage(
        get_weather.invoke(call.tool_calls[0]["args"]), tool_call_id=call.tool_calls[0]["id"]
    )
    streamed = list(llm.bind_tools([get_weather]).stream([question, call, result]))
    answer = "".join(c.content for c in streamed)
    assert answer.strip() and not any(c.tool_call_chunks for c in streamed)
    _, body = server.request("GET", "/v1/sessions/lc-tools/messages")
    log = [(m["role"], m["content"]) for m in body["messages"]]
    calls = [text for role, text in log if role == "assistant" and "<tool_call>" in text]
    assert len(calls) == 1 and "get_weather" in calls[0]  # the call, stored once
    assert log.count(("tool", result.content)) == 1 and log[-1] == ("assistant", answer)


def test_llamaindex_openai_like_is_routed_by_content(server):
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai_like import OpenAILike

    llm = OpenAILike(
        api_base=server.url + "/v1",
        api_key="sk-test",
        model="megacontext",
        is_chat_model=True,
        max_tokens=24,
        temperature=0.0,
    )
    history: list[ChatMessage] = []

    def say(text: str) -> str:
        history.append(ChatMessage(role="user", content=text))
        reply = llm.chat(history).message.content
        history.append(ChatMessage(role="assistant", content=reply))
        return reply

    assert ANSWER in _conversation(say)
    # No session named: every turn continued the one session its first turn created.
    sessions = [
        sid
        for sid in _sessions(server.store)
        if sid.startswith("oa-") and FACT in _contents(server, sid)
    ]
    assert len(sessions) == 1
    assert _contents(server, sessions[0]).count(QUESTION) == 1


def _sessions(store: Path) -> list[str]:
    from megacontext_memory.store import Store

    return Store(store).sessions()


def _contents(server: Server, sid: str) -> list[str]:
    _, body = server.request("GET", f"/v1/sessions/{sid}/messages")
    return [m["content"] for m in body["messages"]]


def test_bad_requests_get_clear_errors_and_change_nothing(server):
    before = _sessions(server.store)
    chat = "/v1/chat/completions"
    ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = [
        ("POST", chat, None, None, b"{not json", 400),
        ("POST", chat, {"messages": []}, None, None, 400),
        ("POST", chat, {"messages": [{"role": "wizard", "content": "x"}]}, None, None, 400),
        ("POST", chat, {**ok, "max_tokens": 0}, None, None, 400),
        ("POST", chat, ok, {"X-Session-Id": "../../etc"}, None, 400),
        ("POST", chat, {**ok, "user": "a/b"}, None, None, 400),
        ("POST", chat, ok, {"Authorization": "Bearer wrong"}, None, 401),
        ("POST", chat, None, None, b"x" * (5 * 1024 * 1024), 413),
        ("GET", "/v1/sessions/nobody/messages", None, None, None, 404),
        ("DELETE", "/v1/sessions/nobody", None, None, None, 404),
        ("POST", "/v1/sessions/..%2Fetc/messages", ok, None, None, 404),
    ]
    for method, path, body, headers, raw, status in cases:
        got, payload = server.request(method, path, body, headers, raw)
        assert got == status, (path, body, headers, payload)
        assert isinstance(payload, dict) and payload["error"]["message"], payload
    assert _sessions(server.store) == before
    status, _ = server.request("GET", "/healthz", headers={"Authorization": "Bearer wrong"})
    assert status == 200  # health checks need no key


def test_native_endpoints(server):
    msgs = {"messages": [{"role": "user", "content": "Note: the boat is called Heron."}]}
    status, body = server.request("POST", "/v1/sessions/native-1/messages", msgs)
    assert status == 200 and body["appended"] == 1
    status, body = server.request("POST", "/v1/sessions/native-1/messages", msgs)
    assert status == 200  # appending the same text again is a new message: the log is a log
    status, png = server.request("GET", "/v1/sessions/native-1/focus.png")
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    status, text = server.request("GET", "/v1/sessions/native-1/export")
    lines = [json.loads(line) for line in text.decode().splitlines()]
    assert lines[0]["session"] == "native-1" and len(lines) == 3
    status, metrics = server.request("GET", "/metrics")
    assert b"megacontext_turns_total" in metrics and b"megacontext_ingest_tokens_total" in metrics
    status, body = server.request("DELETE", "/v1/sessions/native-1")
    assert status == 200 and body["deleted"]
    assert server.request("GET", "/v1/sessions/native-1/messages")[0] == 404


def test_a_stopped_server_closes_its_store(tmp_path):
    """SIGTERM: uvicorn lets requests finish and shuts the app down, which closes the
    engine's store, so SQLite folds its write-ahead log into the index before the process
    exits."""
    server = Server(tmp_path / "store").start()
    msgs = {"messages": [{"role": "user", "content": "Note: the boat is called Heron."}]}
    assert server.request("POST", "/v1/sessions/s/messages", msgs)[0] == 200
    assert (tmp_path / "store" / "index.db-wal").exists()
    server.stop()
    assert not (tmp_path / "store" / "index.db-wal").exists()


def test_sessions_released_past_max_open_sessions_are_served_from_the_store(tmp_path):
    """One open session at most: every turn below reopens its session from the store; the
    turns are answered, counted, and each session keeps its own history."""
    server = Server(tmp_path / "store", options=("max_open_sessions=1",)).start()
    try:
        for turn in range(2):
            for k in range(3):
                body = {"messages": [{"role": "user", "content": f"Note {turn} of user {k}."}]}
                headers = {"X-Session-Id": f"u{k}"}
                status, payload = server.request("POST", "/v1/chat/completions", body, headers)
                assert status == 200, payload
        _, metrics = server.request("GET", "/metrics")
        assert b"megacontext_turns_total 6.0" in metrics
        for k in range(3):
            status, body = server.request("GET", f"/v1/sessions/u{k}/messages")
            users = [m["content"] for m in body["messages"] if m["role"] == "user"]
            assert status == 200 and users == [f"Note 0 of user {k}.", f"Note 1 of user {k}."]
    finally:
        server.stop()


def test_concurrent_clients_stay_isolated_and_survive_sigkill(tmp_path):
    """8 clients x 10 turns at once, all opening alike; then SIGKILL and a restart."""
    server = Server(tmp_path / "store").start()
    n_clients, n_turns = 8, 10
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            for t in range(n_turns):
                text = "Hello!" if t == 0 else f"Client {k} says line {t}."
                body = {"messages": [{"role": "user", "content": text}], "max_tokens": 4}
                status, payload = server.request(
                    "POST", "/v1/chat/completions", body, {"X-Session-Id": f"c{k}"}
                )
                assert status == 200, payload
        except BaseException as e:  # reported below, with the thread's index
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    server.stop(signal.SIGKILL)
    server.start()
    try:
        for k in range(n_clients):
            _, body = server.request("GET", f"/v1/sessions/c{k}/messages")
            users = [m["content"] for m in body["messages"] if m["role"] == "user"]
            assert users == ["Hello!"] + [f"Client {k} says line {t}." for t in range(1, n_turns)]
            assert len(body["messages"]) == 2 * n_turns  # every reply stored, once
    finally:
        server.stop()
