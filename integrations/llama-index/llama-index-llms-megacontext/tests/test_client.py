"""Client mode: MegaContextLLM with `base_url=` behaves as in-process, through one real
`megacontext serve` process for the module."""

import pytest
from llama_index.core.base.llms.types import ChatMessage
from llama_index.llms.megacontext import MegaContextLLM

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


def _user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def test_metadata_is_the_servers(server):
    llm = _llm(server)
    assert llm.metadata.context_window == 512  # the server's budget, not a local setting
    assert llm.metadata.model_name == "SmolLM2-135M-Instruct"
    assert llm.metadata.is_function_calling_model


def test_six_turns_in_a_named_session_recall_the_first(server):
    llm = _llm(server, max_tokens=16, session_id="u1")
    history = [ChatMessage(role="system", content="You are a helpful assistant.")]
    for i, text in enumerate([FACT, *SMALL_TALK, QUESTION]):
        history.append(_user(text))
        r = llm.chat(history)  # the whole list each turn: only what is new is ingested
        assert r.raw["session_id"] == "u1"
        assert r.raw["ingested_messages"] == (2 if i == 0 else 1)
        assert r.raw["total_tokens"] == r.raw["prompt_tokens"] + r.raw["completion_tokens"]
        history.append(r.message)
    assert ANSWER in r.message.content
    assert [r for r, _ in server.log("u1")] == ["system"] + ["user", "assistant"] * 6


async def test_stream_chat_joins_to_the_chat_shape(server):
    llm = _llm(server, max_tokens=8)
    chunks = list(llm.stream_chat([_user("Say hello to the world.")], session_id="s1"))
    reply = llm.chat([_user("Say hello to the world.")], session_id="s2")
    assert sum(bool(c.delta) for c in chunks) > 1  # streamed in pieces
    assert chunks[-1].message.content == "".join(c.delta or "" for c in chunks)
    assert chunks[-1].message.content == reply.message.content == server.log("s1")[-1][1]
    assert sum("usage" in c.raw for c in chunks) == 1  # usage once, at the end
    assert chunks[-1].raw.keys() == reply.raw.keys()
    assert reply.raw["finish_reason"] in ("stop", "length")
    cut = _llm(server, max_tokens=2).chat([_user("Tell me a long story.")], session_id="s3")
    assert cut.raw["finish_reason"] == "length"
    r = await llm.achat([_user("Hello")], session_id="s4")
    gen = await llm.astream_chat([_user("Hello again")], session_id="s4")
    last = [c async for c in gen][-1]
    assert r.message.content and last.message.content == server.log("s4")[-1][1]


def test_tool_call_and_one_off_prompts(server):
    from llama_index.core.tools import FunctionTool

    def lookup(key: str) -> str:
        """Look up a value by key."""
        return f"value-of-{key}"

    llm = _llm(server, max_tokens=6, max_string_tokens=4)
    r = llm.chat_with_tools(
        [FunctionTool.from_defaults(lookup)], user_msg="Look up k1.", tool_required=True
    )
    calls = llm.get_tool_calls_from_response(r)
    assert [c.tool_name for c in calls] == ["lookup"] and isinstance(
        calls[0].tool_kwargs["key"], str
    )
    assert r.raw["finish_reason"] == "tool_calls"
    done = llm.complete("Say hi")  # a prompt, not a conversation: ephemeral on the server
    assert done.text and server.log(done.raw["session_id"]) is None


def test_wrong_api_key_and_mixed_arguments_are_refused(server):
    with pytest.raises(AuthenticationError, match="API key"):
        MegaContextLLM(base_url=server.url, api_key="wrong").chat([_user("hi")])
    with pytest.raises(ValueError, match="store"):
        MegaContextLLM(base_url=server.url, store="elsewhere")
    with pytest.raises(RuntimeError, match="no in-process engine"):
        _llm(server).engine  # noqa: B018
