"""Client mode: ChatMegaContext and MegaContextChatMessageHistory with `base_url=` behave as
in-process, through one real `megacontext serve` process for the module."""

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_megacontext import ChatMegaContext, MegaContextChatMessageHistory

from megacontext_memory.serving.client import AuthenticationError
from megacontext_memory.serving.process import ServerProcess

KEY = "sk-test"
FACT, QUESTION, ANSWER = (
    "My storage unit code is 7391.",
    "What is my storage unit code? Answer with the number.",
    "7391",
)
SMALL_TALK = [
    "I went for a walk by the river this morning.",
    "The weather was cold but sunny.",
    "I made tea when I got home.",
    "My neighbour has a new dog.",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ServerProcess(
        tmp_path_factory.mktemp("served"),
        budget=512,
        api_key=KEY,
        options=["gist_refine_steps=0"],  # ingest speed, not gist quality, is under test
    ).start()
    yield s
    s.stop()


def _llm(server, **kw) -> ChatMegaContext:
    kw.setdefault("max_tokens", 4)
    return ChatMegaContext(base_url=server.url, api_key=KEY, **kw)


def _for(sid: str) -> dict:
    return {"configurable": {"session_id": sid}}


def test_six_turns_routed_by_content_recall_the_first(server):
    """As test_serve's conversation: a plain growing list, no session named."""
    llm = _llm(server, max_tokens=16)
    messages = [SystemMessage("You are a helpful assistant.")]
    sessions = set()
    for i, text in enumerate([FACT, *SMALL_TALK, QUESTION]):
        messages.append(HumanMessage(text))
        reply = llm.invoke(messages)
        meta, usage = reply.response_metadata, reply.usage_metadata
        assert meta["ingested_messages"] == (2 if i == 0 else 1)  # only what is new
        assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0
        sessions.add(meta["session_id"])
        messages.append(reply)
    assert len(sessions) == 1 and ANSWER in reply.content
    log = server.log(sessions.pop())
    assert [r for r, _ in log] == ["system"] + ["user", "assistant"] * 6  # each message once


async def test_stream_joins_to_the_invoked_shape(server):
    llm = _llm(server, max_tokens=8)
    chunks = list(llm.stream("Say hello to the world.", _for("streamer")))
    assert sum(bool(c.content) for c in chunks) > 1  # streamed in pieces
    assert sum(c.usage_metadata is not None for c in chunks) == 1  # usage once, at the end
    joined = chunks[0]
    for c in chunks[1:]:
        joined += c
    reply = llm.invoke("Say hello to the world.", _for("streamer-2"))
    assert joined.content == reply.content == server.log("streamer")[-1][1]  # greedy
    assert joined.response_metadata.keys() == reply.response_metadata.keys()
    assert joined.usage_metadata == reply.usage_metadata
    assert joined.response_metadata["session_id"] == "streamer"
    assert reply.response_metadata["finish_reason"] in ("stop", "length")
    cut = _llm(server, max_tokens=2).invoke("Tell me a long story about ships.", _for("cut"))
    assert cut.response_metadata["finish_reason"] == "length"
    pieces = [c async for c in llm.astream("Hello again.", _for("streamer"))]
    assert "".join(c.content for c in pieces) == server.log("streamer")[-1][1]


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"It is sunny in {city}."


def test_bound_tool_produces_a_tool_call(server):
    llm = _llm(server, max_tokens=32, max_string_tokens=6)
    question = HumanMessage("What is the weather in Paris?")
    call = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(
        [question], _for("tools")
    )
    assert [c["name"] for c in call.tool_calls] == ["get_weather"]
    assert isinstance(call.tool_calls[0]["args"].get("city"), str) and call.tool_calls[0]["id"]
    assert call.response_metadata["finish_reason"] == "tool_calls"
    streamed = list(llm.bind_tools([get_weather], tool_choice="any").stream([question], _for("t2")))
    assert [c["name"] for c in streamed[-1].tool_call_chunks] == ["get_weather"]
    history = MegaContextChatMessageHistory("tools", llm=llm)
    stored = history.messages  # the call is stored once, as the model wrote it
    assert [type(m).__name__ for m in stored] == ["HumanMessage", "AIMessage"]
    assert stored[1].tool_calls[0]["id"] == call.tool_calls[0]["id"]


def test_history_sees_its_sessions_turns_and_no_other(server):
    llm = _llm(server, max_tokens=2)
    alice = MegaContextChatMessageHistory("alice", llm=llm)
    question = HumanMessage("Remember: blue.")
    reply = llm.invoke([question], _for("alice"))
    alice.add_messages([question, reply])  # what RunnableWithMessageHistory does after a turn
    assert [r for r, _ in server.log("alice")] == ["user", "assistant"]  # not stored twice
    assert [m.content for m in alice.messages] == ["Remember: blue.", reply.content]
    llm.invoke("I am Bob.", _for("bob"))
    # messages read from alice's history name her session: no config needed
    again = llm.invoke([*alice.messages, HumanMessage("And green.")])
    assert again.response_metadata["session_id"] == "alice"
    assert not any("Bob" in m.content for m in alice.messages)
    assert [m.content for m in MegaContextChatMessageHistory("bob", llm=llm).messages][0] == (
        "I am Bob."
    )
    with pytest.raises(ValueError):
        llm.invoke([*alice.messages, HumanMessage("x")], _for("bob"))


def test_history_add_read_clear(server):
    h = MegaContextChatMessageHistory("h1", base_url=server.url + "/v1", api_key=KEY)
    assert h.messages == []
    h.add_messages(
        [
            SystemMessage("be nice"),
            HumanMessage("add 1 and 2"),
            AIMessage("", tool_calls=[{"name": "add", "args": {"a": 1, "b": 2}, "id": "c1"}]),
            ToolMessage("3", tool_call_id="c1"),
            AIMessage("It is 3."),
        ]
    )
    got = MegaContextChatMessageHistory("h1", base_url=server.url, api_key=KEY).messages
    assert [type(m).__name__ for m in got] == [
        "SystemMessage",
        "HumanMessage",
        "AIMessage",
        "ToolMessage",
        "AIMessage",
    ]
    assert got[2].tool_calls[0]["args"] == {"a": 1, "b": 2} and got[3].tool_call_id == "c1"
    h.clear()
    assert h.messages == [] and server.log("h1") is None  # deleted on the server
    h.clear()  # nothing left to delete: no error, as in-process


def test_ephemeral_call_leaves_no_session(server):
    reply = _llm(server, max_tokens=2).invoke("One-off prompt.", ephemeral=True)
    assert reply.content and server.log(reply.response_metadata["session_id"]) is None


def test_wrong_api_key_and_mixed_arguments_are_refused(server):
    with pytest.raises(AuthenticationError, match="API key"):
        ChatMegaContext(base_url=server.url, api_key="wrong").invoke("hi")
    with pytest.raises(AuthenticationError, match="API key"):
        MegaContextChatMessageHistory("x", base_url=server.url, api_key="wrong").clear()
    with pytest.raises(ValueError, match="store"):
        ChatMegaContext(base_url=server.url, store="elsewhere")
    with pytest.raises(ValueError, match="engine"):
        MegaContextChatMessageHistory("x", base_url=server.url, engine=object())
    with pytest.raises(ValueError, match="in-process"):
        MegaContextChatMessageHistory("x", base_url=server.url, llm=ChatMegaContext())
