"""Issue: one user's turn must never land in another user's memory (LlamaIndex side)."""

import pytest
from llama_index.core.base.llms.types import ChatMessage
from llama_index.llms.megacontext import MegaContextLLM
from llama_index.memory.megacontext import MegaContextMemory

BUDGET = 512
FAST = {"gist_refine_steps": 0}


def _llm(tmp_path, **kw):
    kw.setdefault("max_tokens", 4)
    return MegaContextLLM(store=str(tmp_path), working_budget=BUDGET, engine_kwargs=FAST, **kw)


def _log(llm, sid):
    return [(m.role, m.content) for m in llm.engine.session(sid).messages()]


def _say(llm, memory, text):
    memory.put(ChatMessage(role="user", content=text))
    reply = llm.chat(memory.get())
    memory.put(reply.message)
    return reply


def test_a_turn_built_from_alices_memory_never_lands_in_bobs(tmp_path):
    llm = _llm(tmp_path)
    alice = MegaContextMemory.from_defaults(session_id="alice", llm=llm)
    bob = MegaContextMemory.from_defaults(session_id="bob", llm=llm)
    assert alice.engine is llm.engine  # one engine, one set of locks
    _say(llm, bob, "Hi")
    _say(llm, alice, "Hi")
    secret = ChatMessage(role="system", content="The user is Alice, account 555-0101.")
    reply = llm.chat([secret, *alice.get()])
    assert reply.raw["session_id"] == "alice"
    assert not any("555-0101" in c for _, c in _log(llm, "bob"))
    assert [m.content for m in bob.get()][0] == "Hi" and len(bob.get()) == 2
    # an unnamed list equal to bob's is another conversation, never bob's
    plain = [ChatMessage(role=m.role, content=m.content) for m in bob.get()]
    r = llm.chat([*plain, ChatMessage(role="user", content="I am Eve.")])
    assert r.raw["session_id"] not in ("alice", "bob")
    with pytest.raises(ValueError):
        llm.chat([*alice.get(), *bob.get()])


def test_memory_shares_the_llms_engine_settings(tmp_path):
    llm = _llm(tmp_path, device="cpu")
    memory = MegaContextMemory.from_defaults(session_id="m", llm=llm)
    assert memory.engine is llm.engine


def test_set_never_deletes_durable_history(tmp_path):
    llm = _llm(tmp_path)
    memory = MegaContextMemory.from_defaults(session_id="keep", llm=llm)
    memory.put_messages(
        [ChatMessage(role="user", content="a"), ChatMessage(role="assistant", content="b")]
    )
    memory.set([*memory.get(), ChatMessage(role="user", content="c")])  # continues: appends
    assert [m.content for m in memory.get()] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="reset"):
        memory.set([ChatMessage(role="user", content="other")])
    assert [m.content for m in memory.get()] == ["a", "b", "c"]


def test_one_off_prompts_leave_no_session(tmp_path):
    from llama_index.core.prompts import PromptTemplate

    llm = _llm(tmp_path)
    assert llm.complete("Say hi").text
    assert llm.predict(PromptTemplate("Condense: {q}"), q="hello")
    assert "".join(r.delta or "" for r in llm.stream_complete("Hey"))
    assert llm.engine.sessions() == []


async def test_events_and_usage_once_per_call(tmp_path):
    from llama_index.core.callbacks import CallbackManager, TokenCountingHandler

    counter = TokenCountingHandler()
    llm = _llm(tmp_path, callback_manager=CallbackManager([counter]))
    r = await llm.achat([ChatMessage(role="user", content="Hello")])
    assert r.raw["usage"]["completion_tokens"] == r.raw["completion_tokens"] > 0
    gen = await llm.astream_chat([ChatMessage(role="user", content="Hello again")])
    async for _ in gen:
        pass
    llm.chat([ChatMessage(role="user", content="Hi")])
    assert len(counter.llm_token_counts) == 3
    first = counter.llm_token_counts[0]
    assert (first.prompt_token_count, first.completion_token_count) == (
        r.raw["usage"]["prompt_tokens"],
        r.raw["usage"]["completion_tokens"],
    )


async def test_function_agent_calls_its_tool(tmp_path):
    from llama_index.core.agent.workflow import FunctionAgent
    from llama_index.core.tools import FunctionTool

    calls = []

    def lookup(key: str) -> str:
        """Look up a value by key."""
        calls.append(key)
        return f"value-of-{key}"

    llm = _llm(tmp_path, max_tokens=6, tool_call_threshold=0.0, max_string_tokens=4)
    memory = MegaContextMemory.from_defaults(session_id="agent", llm=llm)
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(lookup)], llm=llm)
    out = await agent.run("Look up k1.", memory=memory)
    assert calls and str(out)
    roles = [r for r, _ in _log(llm, "agent") if r != "system"]
    assert roles == ["user", "assistant", "tool", "assistant"]  # each message once
