"""Issue: one user's turn must never land in another user's memory (LangChain side).

Each test reproduces a failure of the earlier adapter: a cross-session cache hit,
`configurable` ignored on direct calls, trimmed windows re-ingested, a named session
continued by content, a changed system prompt left unpinned, one-off calls leaving
sessions behind, tools buffering the final answer.
"""

from collections import Counter

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.globals import set_llm_cache
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_megacontext import ChatMegaContext, MegaContextChatMessageHistory

BUDGET = 512
FAST = {"gist_refine_steps": 0}


def _llm(store, **kw) -> ChatMegaContext:
    kw.setdefault("max_tokens", 2)
    return ChatMegaContext(store=str(store), working_budget=BUDGET, engine_kwargs=FAST, **kw)


def _log(llm, sid):
    return [(m.role, m.content) for m in llm.engine.session(sid).messages()]


def _users(llm, sid):
    return [c for r, c in _log(llm, sid) if r == "user"]


@pytest.fixture
def cache():
    set_llm_cache(InMemoryCache())
    yield
    set_llm_cache(None)


def test_cache_never_serves_another_sessions_answer(tmp_path, cache):
    alice = _llm(tmp_path, session_id="alice", max_tokens=6)
    bob = _llm(tmp_path, session_id="bob", max_tokens=6)
    alice.invoke("My PIN is 1234.")
    alice.invoke("What is my PIN?")
    reply = bob.invoke("What is my PIN?")
    assert reply.response_metadata["session_id"] == "bob"
    assert _users(bob, "bob") == ["What is my PIN?"]
    assert "1234" not in "".join(c for _, c in _log(bob, "bob"))
    # the same holds when the session comes from the config
    shared = _llm(tmp_path, max_tokens=6)
    for sid in ("carol", "dave"):
        r = shared.invoke("What is my PIN?", {"configurable": {"session_id": sid}})
        assert r.response_metadata["session_id"] == sid


async def test_configurable_session_on_direct_calls(tmp_path):
    llm = _llm(tmp_path)
    llm.invoke([HumanMessage("one")], {"configurable": {"session_id": "s1"}})
    list(llm.stream([HumanMessage("two")], {"configurable": {"session_id": "s1"}}))
    await llm.ainvoke([HumanMessage("three")], {"configurable": {"session_id": "s1"}})
    async for _ in llm.astream([HumanMessage("four")], {"configurable": {"thread_id": "t1"}}):
        pass
    llm.batch(["five", "six"], [{"configurable": {"session_id": s}} for s in ("s2", "s3")])
    await llm.abatch(["seven"], [{"configurable": {"thread_id": "t2"}}])
    assert _users(llm, "s1") == ["one", "two", "three"]
    assert _users(llm, "t1") == ["four"]
    assert (_users(llm, "s2"), _users(llm, "s3"), _users(llm, "t2")) == (
        ["five"],
        ["six"],
        ["seven"],
    )
    assert not [s for s in llm.engine.sessions() if s.startswith("lc-")]  # no stray session


def _converse(llm, turns, window, config=None):
    messages, sessions = [SystemMessage("Be brief.")], set()
    for i in range(turns):
        messages.append(HumanMessage(f"Fact {i}: box {i} holds {i} pears."))
        sent = [messages[0], *messages[1:][-window:]] if window else messages
        reply = llm.invoke(sent, config)
        sessions.add(reply.response_metadata["session_id"])
        messages.append(reply)
    return sessions


@pytest.mark.parametrize("named", [True, False])
def test_trimmed_windows_continue_without_duplicates(tmp_path, named):
    llm = _llm(tmp_path)
    config = {"configurable": {"session_id": "trim"}} if named else None
    sessions = _converse(llm, 5, window=3, config=config)
    assert len(sessions) == 1
    sid = sessions.pop()
    assert _users(llm, sid) == [f"Fact {i}: box {i} holds {i} pears." for i in range(5)]
    assert Counter(r for r, _ in _log(llm, sid)) == {"system": 1, "user": 5, "assistant": 5}


def test_named_session_is_never_continued_by_content(tmp_path):
    llm = _llm(tmp_path)
    history = MegaContextChatMessageHistory("alice", llm=llm)
    history.add_messages([HumanMessage("Hi"), AIMessage("Hello!")])
    # an unnamed call whose messages equal alice's, built without her history object
    reply = llm.invoke([HumanMessage("Hi"), AIMessage("Hello!"), HumanMessage("I am Bob.")])
    assert reply.response_metadata["session_id"] != "alice"
    assert _users(llm, "alice") == ["Hi"]
    # messages read from the history name their session: that pins the call to it
    reply = llm.invoke([SystemMessage("The user is Alice."), *history.messages, HumanMessage("x")])
    assert reply.response_metadata["session_id"] == "alice"
    with pytest.raises(ValueError, match="several sessions|history of session"):
        llm.invoke(history.messages, {"configurable": {"session_id": "bob"}})


def test_identical_greetings_tie_starts_a_new_session(tmp_path):
    llm = _llm(tmp_path)
    hi = [HumanMessage("Hi")]
    a, b = llm.invoke(hi), llm.invoke(hi)
    sa, sb = a.response_metadata["session_id"], b.response_metadata["session_id"]
    assert sa != sb and a.content == b.content  # greedy: the two are indistinguishable
    c = llm.invoke([*hi, a, HumanMessage("I am Carol.")])
    assert c.response_metadata["session_id"] not in (sa, sb)
    assert _users(llm, sa) == _users(llm, sb) == ["Hi"]


def test_system_text_identifies_an_automatic_conversation(tmp_path):
    llm = _llm(tmp_path)
    first = [SystemMessage("The user is Alice."), HumanMessage("Hi")]
    a = llm.invoke(first)
    other = [SystemMessage("The user is Bob."), HumanMessage("Hi"), a, HumanMessage("Hey")]
    b = llm.invoke(other)
    assert b.response_metadata["session_id"] != a.response_metadata["session_id"]
    same = llm.invoke([*first, a, HumanMessage("Hey")])
    assert same.response_metadata["session_id"] == a.response_metadata["session_id"]


def test_changed_system_prompt_is_ingested_once_and_steers(tmp_path):
    llm = _llm(tmp_path, session_id="sys")
    llm.invoke([SystemMessage("Answer in French."), HumanMessage("one")])
    llm.invoke([SystemMessage("Answer in French."), HumanMessage("two")])
    llm.invoke([SystemMessage("Answer in German."), HumanMessage("three")])
    llm.invoke([SystemMessage("Answer in German."), HumanMessage("four")])
    systems = [c for r, c in _log(llm, "sys") if r == "system"]
    assert systems == ["Answer in French.", "Answer in German."]


def test_one_off_calls_can_run_ephemeral(tmp_path):
    llm = _llm(tmp_path)
    assert llm.invoke("Classify: good or bad?", ephemeral=True).content
    llm.batch(["a", "b"], ephemeral=True)
    assert _llm(tmp_path, ephemeral=True).invoke("c").content
    assert llm.engine.sessions() == []


def test_finish_reason_length(tmp_path):
    llm = _llm(tmp_path, max_tokens=1)
    assert llm.invoke("Tell me a long story.").response_metadata["finish_reason"] == "length"


@tool
def lookup(key: str) -> str:
    """Look up a value by key."""
    return f"value-of-{key}"


def test_stream_with_tools_bound_is_token_by_token(tmp_path):
    llm = _llm(tmp_path, max_tokens=6, tool_call_threshold=1.0).bind_tools([lookup])
    chunks = [c for c in llm.stream("Say hello.") if c.content]
    assert len(chunks) >= 2


def test_multi_step_tool_use_is_configurable(tmp_path):
    def run(rounds):
        llm = _llm(tmp_path, session_id=f"r{rounds}", tool_call_threshold=0.0, max_string_tokens=4)
        llm = llm.model_copy(update={"max_tool_rounds": rounds}).bind_tools([lookup])
        first = llm.invoke("Look up k1.")
        result = ToolMessage("value-of-k1", tool_call_id=first.tool_calls[0]["id"])
        return llm.invoke([HumanMessage("Look up k1."), first, result])

    assert not run(1).tool_calls  # the default: answer after one tool round
    assert run(2).tool_calls  # a second round is allowed


def test_history_honours_megacontext_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGACONTEXT_STORE", str(tmp_path / "env-store"))
    history = MegaContextChatMessageHistory("env", working_budget=BUDGET, **FAST)
    history.add_user_message("hi")
    assert (tmp_path / "env-store" / "index.db").exists()


def test_create_agent_streams_final_answer(tmp_path):
    from langchain.agents import create_agent
    from langgraph.checkpoint.memory import InMemorySaver

    llm = _llm(tmp_path, max_tokens=6, tool_call_threshold=1.0)  # answers without the tool
    agent = create_agent(llm, tools=[lookup], checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "stream-1"}}
    pieces = [
        chunk.content
        for chunk, _ in agent.stream(
            {"messages": [HumanMessage("Say hello.")]}, config, stream_mode="messages"
        )
        if isinstance(chunk, AIMessage) and chunk.content
    ]
    assert len(pieces) >= 2
    assert _users(llm, "stream-1") == ["Say hello."]
