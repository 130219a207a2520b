"""Client mode: MegaContextMemory (with MegaContextLLM) with `base_url=` behaves as
in-process, through one real `megacontext serve` process for the module."""

import pytest
from llama_index.core.base.llms.types import ChatMessage
from llama_index.llms.megacontext import MegaContextLLM
from llama_index.memory.megacontext import MegaContextMemory

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


def _llm(server, **kw) -> MegaContextLLM:
    kw.setdefault("max_tokens", 4)
    return MegaContextLLM(base_url=server.url, api_key=KEY, **kw)


def _msg(role: str, text: str) -> ChatMessage:
    return ChatMessage(role=role, content=text)


def test_six_turns_through_the_memory_recall_the_first(server):
    """Chat on the memory plus the new input, then put the turn in the memory afterwards:
    the memory skips what the model already ingested and wrote."""
    llm = _llm(server, max_tokens=16, session_id="user-1")
    memory = MegaContextMemory.from_defaults(session_id="user-1", llm=llm)
    system = _msg("system", "You are a helpful assistant.")
    for i, text in enumerate([FACT, *SMALL_TALK, QUESTION]):
        question = _msg("user", text)
        reply = llm.chat([system, *memory.get(), question])
        assert reply.raw["session_id"] == "user-1"
        assert reply.raw["ingested_messages"] == (2 if i == 0 else 1)
        memory.put_messages([question, reply.message])
    assert ANSWER in reply.message.content
    log = server.log("user-1")
    assert [r for r, _ in log] == ["system"] + ["user", "assistant"] * 6  # each message once
    assert len(memory.get()) == 12  # the prompt's system message is not history


def test_memory_sees_its_sessions_turns_and_no_other(server):
    llm = _llm(server)
    alice = MegaContextMemory.from_defaults(session_id="alice", llm=llm)
    bob = MegaContextMemory.from_defaults(session_id="bob", llm=llm)

    def say(memory, text):
        memory.put(_msg("user", text))
        reply = llm.chat(memory.get())
        memory.put(reply.message)  # what chat engines and agents do after a turn
        return reply

    say(bob, "Hi")
    assert say(alice, "Hi").raw["session_id"] == "alice"
    secret = _msg("system", "The user is Alice, account 555-0101.")
    assert llm.chat([secret, *alice.get()]).raw["session_id"] == "alice"
    assert [r for r, _ in server.log("bob")] == ["user", "assistant"]  # not stored twice
    assert not any("555-0101" in c for _, c in server.log("bob"))
    assert [m.content for m in bob.get()][0] == "Hi" and len(bob.get()) == 2
    # an unnamed list equal to bob's is another conversation, never bob's
    plain = [_msg(m.role, m.content) for m in bob.get()]
    r = llm.chat([*plain, _msg("user", "I am Eve.")])
    assert r.raw["session_id"] not in ("alice", "bob")
    with pytest.raises(ValueError):
        llm.chat([*alice.get(), *bob.get()])


def test_memory_basics_set_and_reset(server):
    memory = MegaContextMemory(session_id="s", base_url=server.url, api_key=KEY)
    memory.put(_msg("user", "hello"))
    memory.put_messages([_msg("assistant", "hi there")])
    again = MegaContextMemory(session_id="s", base_url=server.url + "/v1", api_key=KEY)
    assert [(m.role.value, m.content) for m in again.get()] == [
        ("user", "hello"),
        ("assistant", "hi there"),
    ]
    again.model_copy().put(_msg("user", "third"))
    limited = MegaContextMemory(session_id="s", base_url=server.url, api_key=KEY, token_limit=1)
    assert [m.content for m in limited.get()] == ["third"]
    memory.set([*memory.get(), _msg("user", "c")])  # continues: appends
    assert [m.content for m in memory.get()] == ["hello", "hi there", "third", "c"]
    with pytest.raises(ValueError, match="reset"):  # set() never deletes durable history
        memory.set([_msg("user", "only")])
    memory.reset()
    assert memory.get() == [] and server.log("s") is None  # deleted on the server
    memory.set([_msg("user", "only")])
    assert [m.content for m in memory.get()] == ["only"]


def test_wrong_api_key_and_mixed_arguments_are_refused(server):
    with pytest.raises(AuthenticationError, match="API key"):
        MegaContextMemory(session_id="s", base_url=server.url, api_key="wrong").get()
    with pytest.raises(ValueError, match="store"):
        MegaContextMemory(session_id="s", base_url=server.url, store="elsewhere")
    with pytest.raises(ValueError, match="store"):
        MegaContextMemory.from_defaults(session_id="s", llm=_llm(server), store="elsewhere")
