"""MegaContextLLM against the real default model (short replies)."""

import pytest
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.llms.megacontext import MegaContextLLM

BUDGET = 512


@pytest.fixture
def llm(tmp_path):
    return MegaContextLLM(store=str(tmp_path), working_budget=BUDGET, max_tokens=4)


def test_is_a_function_calling_llm_with_budget_as_context_window(llm):
    assert isinstance(llm, FunctionCallingLLM)
    assert llm.metadata.context_window == BUDGET
    assert llm.metadata.is_chat_model and llm.metadata.is_function_calling_model
    assert llm.metadata.model_name == "SmolLM2-135M-Instruct"


def test_chat_routes_growing_history(llm):
    history = [ChatMessage(role="system", content="Be brief.")]
    sessions = set()
    for i in range(3):
        history.append(ChatMessage(role="user", content=f"Item {i} is a pear."))
        r = llm.chat(history)
        assert r.message.role == MessageRole.ASSISTANT and r.message.content
        assert r.raw["ingested_messages"] == (2 if i == 0 else 1)
        assert r.raw["total_tokens"] == r.raw["prompt_tokens"] + r.raw["completion_tokens"]
        sessions.add(r.raw["session_id"])
        history.append(r.message)
    assert len(sessions) == 1


def test_stream_chat_and_complete(llm):
    chunks = list(llm.stream_chat([ChatMessage(role="user", content="Hi")]))
    assert chunks and chunks[-1].message.content == "".join(c.delta or "" for c in chunks)
    assert llm.complete("Say hi").text


async def test_async(llm):
    r = await llm.achat([ChatMessage(role="user", content="Hello")])
    assert r.message.content
    gen = await llm.astream_chat([ChatMessage(role="user", content="Hello again")])
    chunks = [c async for c in gen]
    assert chunks[-1].message.content
    assert (await llm.acomplete("Hey")).text


def test_explicit_session(tmp_path):
    llm = MegaContextLLM(store=str(tmp_path), working_budget=BUDGET, max_tokens=2, session_id="u1")
    llm.chat([ChatMessage(role="user", content="one")])
    llm.chat([ChatMessage(role="user", content="two")])
    users = [m.content for m in llm.engine.session("u1").messages() if m.role == "user"]
    assert users == ["one", "two"]
