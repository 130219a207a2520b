"""One chat turn as every front end runs it: route, plan the reply, decode, parse, record.

The LangChain and LlamaIndex adapters and the HTTP server differ only in the shapes they
take and return. What a turn does (which session, what is ingested, how tool calls are
decoded and parsed, how usage and the finish reason are counted) lives here, once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from . import tool_calls
from .config import BLOCK_SIZE
from .routing import ORIGIN, Item, Router
from .telemetry import TurnTelemetry


@dataclass
class Reply:
    """What a turn produced, in neutral terms each front end maps to its own."""

    session_id: str
    content: str
    calls: list[dict] = field(default_factory=list)  # {"id", "name", "args"}
    finish_reason: str = "stop"  # "stop" | "length" | "tool_calls"
    prompt_tokens: int = 0  # positions the model read: prefilled now + reused from the cache
    completion_tokens: int = 0
    cached_tokens: int = 0
    prefill_tokens: int = 0
    positions_used: int = 0
    history_tokens: int = 0
    ingested_messages: int = 0
    model_name: str = ""
    telemetry: TurnTelemetry | None = None  # the engine's record of the turn (local turns)


def tool_rounds(items: Sequence[Item]) -> int:
    """Tool calls made since the newest user message."""
    n = 0
    for it in reversed(items):
        if it.role == "user":
            break
        n += it.role == "assistant" and tool_calls.OPEN in it.text
    return n


def reply_item(content: str, calls: list[dict]) -> Item:
    """The reply as the session holds it (calls rendered into the text, as `to_item` does)."""
    rendered = "".join(tool_calls.render_call(c["name"], c["args"]) for c in calls)
    return Item("assistant", content + ("\n" if content and rendered else "") + rendered)


def run_turn(
    router: Router,
    items: list[Item],
    *,
    session_id: str | None = None,
    tools: list[dict] = (),
    tool_choice=None,
    max_tool_rounds: int = 1,
    max_new_tokens: int = 256,
    stop: Sequence[str] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    tool_call_threshold: float = 0.004,
    max_string_tokens: int = 24,
    system_refresh_tokens: int | None = None,
    ephemeral: bool = False,
) -> Iterator[tuple[str, object]]:
    """Yields ("call" | "text", "") once (a forced tool call comes whole, text streams),
    then ("text", piece)... as decoded, then ("done", Reply).

    After `max_tool_rounds` tool results since the user spoke, an "auto" choice becomes
    "none": the model answers from the results instead of calling again.
    """
    tools = list(tools or [])
    items = [
        Item(it.role, it.text, {**it.metadata, ORIGIN: "prompt-system"}, it.slot)
        if it.role == "system"
        else it
        for it in items
    ]
    answering = bool(items) and items[-1].role == "tool"
    if answering and tool_choice in (None, "auto") and tool_rounds(items) >= max_tool_rounds:
        tool_choice = "none"
    extra = []
    if tools:
        extra.append(Item("system", tool_calls.tools_prompt(tools), {ORIGIN: "tools"}, "tools"))
    base = router.engine.base
    with router.turn(items, session_id, extra, system_refresh_tokens, ephemeral) as turn:
        session = turn.session
        plan = tool_calls.plan_reply(
            base,
            tools,
            tool_choice,
            tool_call_threshold,
            max_string_tokens,
            max_new_tokens,
            list(stop),
        )
        yield "call" if plan.prefix else "text", ""
        # The reply is counted inside the budget: leave the history its recent window.
        prompt = len(base.encode(base.generation_prompt()))
        prompt += len(base.encode(plan.prefix)) if plan.prefix else 0
        room = session.config.working_budget - session.config.recent_raw - 2 * BLOCK_SIZE
        max_new = max(1, min(plan.max_new_tokens, room - prompt))
        pieces = session.generate(
            max_new,
            stream=True,
            temperature=temperature,
            top_p=top_p,
            stop=plan.stop,
            seed=seed,
            prefix=plan.prefix,
            logits_processor=plan.processor,
        )
        out: list[str] = []
        try:
            for piece in pieces:
                out.append(piece)
                yield "text", piece
        except GeneratorExit:  # the caller stopped early: the engine keeps what was said
            pieces.close()
            turn.commit_reply(Item("assistant", "".join(out)))
            raise
        except BaseException:  # decoding failed: the engine stored no reply
            pieces.close()
            turn.commit_reply(None)
            raise
        text = "".join(out)
        content, calls = text, []
        if plan.calls_allowed or tool_calls.OPEN in text:
            content, parsed = tool_calls.parse_calls(text)
            calls = [{"id": tool_calls.call_id(turn.head, i), **c} for i, c in enumerate(parsed)]
        turn.commit_reply(reply_item(content, calls))
        tel = session.telemetry[-1]
        n_out = len(base.encode(text[len(plan.prefix) :])) if text else 0
        reply = Reply(
            session_id=session.id,
            content=content,
            calls=calls,
            finish_reason="tool_calls" if calls else ("length" if n_out >= max_new else "stop"),
            prompt_tokens=tel.prefill_tokens + tel.reused_positions,
            completion_tokens=n_out,
            cached_tokens=tel.reused_positions,
            prefill_tokens=tel.prefill_tokens,
            positions_used=tel.positions_used,
            history_tokens=session.token_count(),
            ingested_messages=len(turn.ingested),
            model_name=base.name,
            telemetry=tel,
        )
    yield "done", reply
