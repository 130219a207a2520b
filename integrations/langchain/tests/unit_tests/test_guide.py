"""Tool-call rendering, parsing and grammar segments (no model needed)."""

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_megacontext.chat_models import to_item

from megacontext_memory import tool_calls as _guide


def test_parse_round_trip():
    text = _guide.render_call("f", {"x": 1, "s": "你好"})
    content, calls = _guide.parse_calls("Sure. " + text)
    assert content == "Sure."
    assert calls == [{"name": "f", "args": {"x": 1, "s": "你好"}}]


def test_parse_leaves_broken_calls_as_text():
    content, calls = _guide.parse_calls("<tool_call>not json</tool_call>")
    assert calls == [] and "not json" in content


def test_to_item_roles_and_tool_calls():
    ai = AIMessage("", tool_calls=[{"name": "f", "args": {"a": 1}, "id": "1"}])
    assert to_item(ai).role == "assistant" and "<tool_call>" in to_item(ai).text
    assert to_item(HumanMessage("hi")).role == "user"
    assert to_item(SystemMessage("s")).role == "system"
    assert to_item(ToolMessage("3", tool_call_id="1")).role == "tool"
    assert to_item(AIMessage("")) is None


def test_segments_follow_the_schema():
    tool = {
        "type": "function",
        "function": {
            "name": "t",
            "parameters": {
                "type": "object",
                "properties": {
                    "n": {"type": "integer"},
                    "s": {"type": "string"},
                    "b": {"type": "boolean"},
                    "e": {"enum": ["x", "y"]},
                    "o": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                },
            },
        },
    }
    kinds = [s[0] for s in _guide.call_segments(tool)]
    assert kinds == ["force", "int", "force", "string", "force", "choice", "force", "choice"] + [
        "force",
        "string",
        "force",
        "eos",
    ]
    assert _guide.call_segments({"function": {"name": "z", "parameters": {}}})[0] == (
        "force",
        " {}}\n</tool_call>",
    )


def test_call_ids_are_deterministic():
    assert _guide.call_id("abc", 0) == _guide.call_id("abc", 0) != _guide.call_id("abc", 1)
