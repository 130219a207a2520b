"""MegaContextChatMessageHistory: persistence, async, and no double storage with the model."""

import subprocess
import sys
import textwrap

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_megacontext import ChatMegaContext, MegaContextChatMessageHistory


def _history(tmp_path, sid="h1"):
    return MegaContextChatMessageHistory(sid, store=str(tmp_path), working_budget=512)


def test_add_read_clear(tmp_path):
    h = _history(tmp_path)
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
    got = _history(tmp_path).messages  # a new object reads the same session
    assert [type(m).__name__ for m in got] == [
        "SystemMessage",
        "HumanMessage",
        "AIMessage",
        "ToolMessage",
        "AIMessage",
    ]
    assert got[2].tool_calls[0]["args"] == {"a": 1, "b": 2}
    assert got[3].tool_call_id == "c1"
    h.clear()
    assert h.messages == [] and _history(tmp_path).messages == []


async def test_async_methods(tmp_path):
    h = _history(tmp_path, "h2")
    await h.aadd_messages([HumanMessage("hi"), AIMessage("hello")])
    assert [m.content for m in await h.aget_messages()] == ["hi", "hello"]
    await h.aclear()
    assert await h.aget_messages() == []


def test_model_turn_is_not_stored_twice(tmp_path):
    llm = ChatMegaContext(store=str(tmp_path), working_budget=512, max_tokens=2, session_id="h3")
    h = _history(tmp_path, "h3")
    question = HumanMessage("Remember: blue.")
    reply = llm.invoke([question])
    h.add_messages([question, reply])  # what RunnableWithMessageHistory does after a turn
    assert [m.role for m in llm.engine.session("h3").messages()] == ["user", "assistant"]
    assert [m.content for m in h.messages] == ["Remember: blue.", reply.content]
    h.add_user_message("next")  # a genuinely new message is stored
    assert len(h.messages) == 3


def test_history_survives_process_restart(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        from langchain_megacontext import MegaContextChatMessageHistory
        h = MegaContextChatMessageHistory("durable", store={str(tmp_path)!r}, working_budget=512)
        h.add_user_message(sys.argv[1])
        print(len(h.messages))
        """
    )
    outs = [
        subprocess.run(
            [sys.executable, "-c", script, t], capture_output=True, text=True, check=True
        )
        for t in ("first", "second")
    ]
    assert [o.stdout.split()[-1] for o in outs] == ["1", "2"]
    assert [m.content for m in _history(tmp_path, "durable").messages] == ["first", "second"]
