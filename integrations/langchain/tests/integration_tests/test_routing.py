"""Session routing: growing message lists are ingested once, prefill stays bounded."""

from collections import Counter

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables.history import RunnableWithMessageHistory
from langchain_core.tools import tool
from langchain_megacontext import ChatMegaContext, MegaContextChatMessageHistory

BUDGET = 512
# the 50-turn tests are about routing and bounded prefill, not gist quality: GistNet's
# gists as they are (no in-context refinement) keep their ~40 gistings cheap
FAST = {"gist_refine_steps": 0}


def _llm(store, **kw) -> ChatMegaContext:
    return ChatMegaContext(store=str(store), working_budget=BUDGET, max_tokens=1, **kw)


def _log(llm, session_id):
    return llm.engine.session(session_id).messages()


def _check_bounded(llm, session_id, turns):
    tel = llm.engine.session(session_id).telemetry[-turns:]
    assert len(tel) == turns
    assert all(t.prefill_tokens + t.reused_positions <= BUDGET for t in tel)
    # a turn prefills its new messages plus the suffix after the first entry the focus
    # changed: never more than the budget, however long the history grows
    history = llm.engine.session(session_id).token_count()
    assert history > 2 * BUDGET
    assert min(t.prefill_tokens for t in tel[1:]) < 64


def test_plain_list_grows_without_reingest(tmp_path):
    llm = _llm(tmp_path)
    messages = [SystemMessage("You are terse.")]
    sessions = set()
    for i in range(6):
        messages.append(HumanMessage(f"Fact {i}: the box holds {i} marbles."))
        reply = llm.invoke(messages)
        assert reply.response_metadata["ingested_messages"] == (2 if i == 0 else 1)
        sessions.add(reply.response_metadata["session_id"])
        messages.append(reply)
    assert len(sessions) == 1
    log = _log(llm, sessions.pop())
    assert [m.role for m in log] == ["system"] + ["user", "assistant"] * 6


def test_forks_instead_of_corrupting(tmp_path):
    llm = _llm(tmp_path)
    first = [HumanMessage("Hello there")]
    a = llm.invoke(first)
    b = llm.invoke(first)  # a retry of the same list: must not append to a's session
    assert a.response_metadata["session_id"] != b.response_metadata["session_id"]
    c = llm.invoke([*first, a, HumanMessage("again")])
    # a and b hold the same (greedy) conversation: a tie starts a new session
    assert c.response_metadata["session_id"] not in (
        a.response_metadata["session_id"],
        b.response_metadata["session_id"],
    )
    d = llm.invoke([*first, a, HumanMessage("again"), c, HumanMessage("and again")])
    assert d.response_metadata["session_id"] == c.response_metadata["session_id"]


def test_explicit_session_id_takes_new_turns_only(tmp_path):
    llm = _llm(tmp_path, session_id="user-7")
    llm.invoke("one")
    llm.invoke("two")  # only the new turn is passed
    llm.invoke([HumanMessage("three")], session_id="user-8")
    roles = [(m.role, m.content) for m in _log(llm, "user-7") if m.role == "user"]
    assert roles == [("user", "one"), ("user", "two")]
    assert [m.content for m in _log(llm, "user-8")][0] == "three"


@pytest.mark.slow
def test_runnable_with_message_history_50_turns(tmp_path):
    llm = _llm(tmp_path, engine_kwargs=FAST)
    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", "You are a helpful assistant."),
            MessagesPlaceholder("history"),
            ("human", "{question}"),
        ]
    )
    chain = RunnableWithMessageHistory(
        prompt | llm,
        lambda sid: MegaContextChatMessageHistory(
            sid, store=str(tmp_path), working_budget=BUDGET, **FAST
        ),
        input_messages_key="question",
        history_messages_key="history",
    )
    config = {"configurable": {"session_id": "user-42"}}
    for i in range(50):
        reply = chain.invoke({"question": f"Note {i}: my number is {i * 7}."}, config=config)
        assert reply.response_metadata["session_id"] == "user-42"
        assert reply.response_metadata["ingested_messages"] == (2 if i == 0 else 1)
    log = _log(llm, "user-42")
    counts = Counter(m.role for m in log)
    assert counts == {"system": 1, "user": 50, "assistant": 50}
    users = [m.content for m in log if m.role == "user"]
    assert users == [f"Note {i}: my number is {i * 7}." for i in range(50)]
    history = MegaContextChatMessageHistory(
        "user-42", store=str(tmp_path), working_budget=BUDGET, **FAST
    )
    assert len(history.messages) == 100  # the prompt's system message is not history
    _check_bounded(llm, "user-42", 50)


@tool
def lookup(key: str) -> str:
    """Look up a value by key."""
    return f"value-of-{key}"


@pytest.mark.slow
def test_create_agent_with_checkpointer_50_turns(tmp_path):
    from langchain.agents import create_agent
    from langgraph.checkpoint.memory import InMemorySaver

    # tools are bound (and described to the model) but never opened here, to keep 50 turns
    # cheap; test_create_agent_calls_its_tool covers the tool round trip
    llm = _llm(tmp_path, tool_call_threshold=1.0, engine_kwargs=FAST)
    agent = create_agent(
        llm, tools=[lookup], system_prompt="You are an agent.", checkpointer=InMemorySaver()
    )
    config = {"configurable": {"thread_id": "thread-1"}}
    for i in range(50):
        state = agent.invoke({"messages": [HumanMessage(f"Turn {i}, hi.")]}, config)
    messages = state["messages"]
    sessions = {m.response_metadata["session_id"] for m in messages if isinstance(m, AIMessage)}
    assert len(sessions) == 1
    sid = sessions.pop()
    log = _log(llm, sid)
    # every message of the graph state is in the engine exactly once, in order
    state_texts = [
        (type(m).__name__, m.text or str(m.tool_calls)) for m in messages if m.text or m.tool_calls
    ]
    chained = [m for m in log if m.role != "system" and m.content.strip()]
    assert len(chained) == len(state_texts)
    assert Counter(m.role for m in chained)["user"] == 50
    assert sum(isinstance(m, HumanMessage) for m in messages) == 50
    assert sum(m.role == "system" for m in log) == 2  # the system prompt and the tool list
    n_tool = sum(isinstance(m, ToolMessage) for m in messages)
    assert Counter(m.role for m in chained)["tool"] == n_tool
    _check_bounded(llm, sid, sum(isinstance(m, AIMessage) for m in messages))


def test_create_agent_calls_its_tool(tmp_path):
    from langchain.agents import create_agent
    from langgraph.checkpoint.memory import InMemorySaver

    llm = _llm(tmp_path, tool_call_threshold=0.0, max_string_tokens=6)  # always use the tool
    agent = create_agent(llm, tools=[lookup], checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "thread-2"}}
    for i in range(2):
        state = agent.invoke({"messages": [HumanMessage(f"Look up key k{i}.")]}, config)
    messages = state["messages"]
    # each user turn: the tool call, its result, then a text answer
    assert [type(m).__name__ for m in messages] == [
        "HumanMessage",
        "AIMessage",
        "ToolMessage",
        "AIMessage",
    ] * 2
    assert messages[1].tool_calls[0]["name"] == "lookup" and not messages[3].tool_calls
    assert all(m.content.startswith("value-of-") for m in messages if isinstance(m, ToolMessage))
    sid = messages[1].response_metadata["session_id"]
    log = [m for m in _log(llm, sid) if m.role != "system" and m.content.strip()]
    texts = [m for m in messages if m.text or getattr(m, "tool_calls", None)]
    assert len(log) == len(texts)  # each graph message ingested exactly once
    assert [m.role for m in log].count("tool") == 2
