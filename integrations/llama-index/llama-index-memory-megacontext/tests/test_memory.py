"""MegaContextMemory with LlamaIndex chat engines and agents, on the real default model."""

import subprocess
import sys
import textwrap

import pytest
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.memory.types import BaseMemory
from llama_index.llms.megacontext import MegaContextLLM
from llama_index.memory.megacontext import MegaContextMemory

BUDGET = 512


def _pair(tmp_path, session_id="user-1", max_tokens=4, budget=BUDGET):
    llm = MegaContextLLM(store=str(tmp_path), working_budget=budget, max_tokens=max_tokens)
    memory = MegaContextMemory.from_defaults(session_id=session_id, llm=llm)
    return llm, memory


def _log(llm, sid):
    return llm.engine.session(sid).messages()


def test_memory_basics_and_state_in_store(tmp_path):
    memory = MegaContextMemory.from_defaults(
        session_id="s", store=str(tmp_path), working_budget=BUDGET
    )
    assert isinstance(memory, BaseMemory)
    memory.put(ChatMessage(role="user", content="hello"))
    memory.put_messages([ChatMessage(role="assistant", content="hi there")])
    # a fresh object (agent workflows copy or drop memories) sees the same state
    again = MegaContextMemory(session_id="s", store=str(tmp_path), working_budget=BUDGET)
    assert [(m.role.value, m.content) for m in again.get()] == [
        ("user", "hello"),
        ("assistant", "hi there"),
    ]
    assert again.get(input="x") == again.get_all()
    again.model_copy().put(ChatMessage(role="user", content="third"))
    assert len(memory.get()) == 3
    limited = MegaContextMemory(
        session_id="s", store=str(tmp_path), working_budget=BUDGET, token_limit=1
    )
    assert [m.content for m in limited.get()] == ["third"]
    with pytest.raises(ValueError, match="reset"):  # set() never deletes durable history
        memory.set([ChatMessage(role="user", content="only")])
    memory.reset()
    assert memory.get() == []
    memory.set([ChatMessage(role="user", content="only")])
    assert [m.content for m in memory.get()] == ["only"]


async def test_memory_async(tmp_path):
    memory = MegaContextMemory(session_id="a", store=str(tmp_path), working_budget=BUDGET)
    await memory.aput(ChatMessage(role="user", content="x"))
    await memory.aput_messages([ChatMessage(role="assistant", content="y")])
    assert [m.content for m in await memory.aget()] == ["x", "y"]
    assert len(await memory.aget_all()) == 2
    await memory.aset([*await memory.aget(), ChatMessage(role="user", content="z")])
    assert [m.content for m in await memory.aget()] == ["x", "y", "z"]
    await memory.areset()
    assert await memory.aget() == []


def _check_once(llm, sid, turns):
    log = _log(llm, sid)
    users = [m.content for m in log if m.role == "user"]
    assert len(users) == len(set(users)) == turns
    assert sum(m.role == "assistant" for m in log) == turns
    tel = llm.engine.session(sid).telemetry
    assert all(t.prefill_tokens + t.reused_positions <= llm.working_budget for t in tel)


def test_simple_chat_engine_multi_turn(tmp_path):
    from llama_index.core.chat_engine import SimpleChatEngine

    llm, memory = _pair(tmp_path)
    engine = SimpleChatEngine.from_defaults(llm=llm, memory=memory, system_prompt="Be brief.")
    for i in range(4):
        assert engine.chat(f"Message {i}: I like tea.").response
    _check_once(llm, "user-1", 4)
    assert sum(m.role == "system" for m in _log(llm, "user-1")) == 1
    assert len(memory.get()) == 8  # the prompt's system message is not history


def test_context_chat_engine_multi_turn(tmp_path):
    from llama_index.core import Document, Settings, VectorStoreIndex
    from llama_index.core.chat_engine import ContextChatEngine
    from llama_index.core.embeddings import MockEmbedding

    Settings.embed_model = MockEmbedding(embed_dim=8)
    index = VectorStoreIndex.from_documents(
        [Document(text="The office is on floor 7."), Document(text="Parking is free.")]
    )
    # the default context prompt alone needs more than 512 positions
    llm, memory = _pair(tmp_path, "ctx", budget=1024)
    engine = ContextChatEngine.from_defaults(
        retriever=index.as_retriever(similarity_top_k=1), llm=llm, memory=memory
    )
    for i in range(3):
        assert engine.chat(f"Question {i}: which floor?").response
    _check_once(llm, "ctx", 3)


async def test_react_agent_multi_turn(tmp_path):
    from llama_index.core.agent.workflow import ReActAgent
    from llama_index.core.tools import FunctionTool

    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    llm, memory = _pair(tmp_path, "agent", max_tokens=8)
    agent = ReActAgent(tools=[FunctionTool.from_defaults(add)], llm=llm)
    for i in range(3):
        out = await agent.run(f"Turn {i}: say hello.", memory=memory)
        assert str(out)
    users = [m.content for m in _log(llm, "agent") if m.role == "user"]
    assert [u for u in users if u.startswith("Turn")] == [f"Turn {i}: say hello." for i in range(3)]
    assert len(memory.get()) >= 6


def test_history_survives_process_restart(tmp_path):
    script = textwrap.dedent(
        f"""
        from llama_index.core.chat_engine import SimpleChatEngine
        from llama_index.llms.megacontext import MegaContextLLM
        from llama_index.memory.megacontext import MegaContextMemory
        llm = MegaContextLLM(store={str(tmp_path)!r}, working_budget={BUDGET}, max_tokens=2)
        memory = MegaContextMemory.from_defaults(session_id="durable", llm=llm)
        engine = SimpleChatEngine.from_defaults(llm=llm, memory=memory)
        import sys
        engine.chat(sys.argv[1])
        print(len(memory.get()))
        """
    )
    runs = [
        subprocess.run(
            [sys.executable, "-c", script, text], capture_output=True, text=True, check=True
        )
        for text in ("My code is 4417.", "What is my code?")
    ]
    assert [r.stdout.split()[-1] for r in runs] == ["2", "4"]
    llm, memory = _pair(tmp_path, "durable")
    assert [m.content for m in memory.get() if m.role.value == "user"] == [
        "My code is 4417.",
        "What is my code?",
    ]
