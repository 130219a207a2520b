"""The reader shared by every memory: messages in the model's chat template, a greedy reply.

Baselines differ only in which messages they hand the reader; the prompt template, the
system prompt and the decoding are these, so a difference in answers is a difference in
memory.
"""

from __future__ import annotations

import torch

SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the user's question from the notes earlier in this "
    "conversation, briefly. If a detail was changed later, give the latest value."
)


def prompt_ids(base, messages: list[tuple[str, str]]) -> list[int]:
    """Token ids of `messages` as the chat template renders them, then the reply's prompt."""
    text = "".join(base.render_message(role, content) for role, content in messages)
    return base.encode(text + base.generation_prompt())


def read(base, ids: list[int], max_new_tokens: int) -> str:
    """The model's greedy reply to raw token ids (positions 0..len-1)."""
    with torch.no_grad():
        positions = torch.arange(len(ids), device=base.device)[None]
        logits, cache = base.forward(base.embed(ids)[None], positions)
        steps = base.stream(logits[0, -1], cache, len(ids), max_new_tokens)
        return "".join(s.text for s in steps)


def newest_that_fit(lengths: list[int], budget: int) -> int:
    """Index of the oldest message of the newest run whose lengths sum to <= `budget`
    (truncation at message boundaries: `messages[i:]` is what fits)."""
    used, i = 0, len(lengths)
    while i > 0 and used + lengths[i - 1] <= budget:
        i -= 1
        used += lengths[i]
    return i
