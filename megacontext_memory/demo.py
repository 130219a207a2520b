"""A scripted long conversation: a fact stated early, many dialogues, then the question.

The filler is real human small talk from `chitchat-dataset`, drawn from the held-out split
that GistNet training never sees.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass

from .corpora import package_dir, split_of


@dataclass(frozen=True)
class Fact:
    statement: str
    acknowledgement: str
    question: str
    answer: str


FACTS = (
    Fact(
        "Remember that my sister Margarethe lives in Lisbon.",
        "Got it: your sister Margarethe lives in Lisbon.",
        "In which city does my sister Margarethe live?",
        "Lisbon",
    ),
    Fact(
        "Keep in mind: my flight to Oslo leaves from gate B47.",
        "Understood, your flight to Oslo leaves from gate B47.",
        "Which gate does my flight to Oslo leave from?",
        "B47",
    ),
    Fact(
        "Please remember this: the code for my storage unit is 7391.",
        "Noted. The code for your storage unit is 7391.",
        "What is the code for my storage unit?",
        "7391",
    ),
)


def dialogue_turns(split: str = "heldout", seed: int = 0) -> Iterator[tuple[str, str]]:
    """(role, text) turns of chitchat dialogues of one split, roles alternating per turn."""
    data = json.loads((package_dir("chitchat_dataset") / "dataset.json").read_text())
    ids = sorted(i for i in data if split_of("chat", i) == split)
    random.Random(seed).shuffle(ids)
    for i in ids:
        for n, group in enumerate(data[i]["messages"]):
            text = " ".join(m["text"].strip() for m in group if m["text"].strip())
            if text:
                yield ("user" if n % 2 == 0 else "assistant"), text


def conversation(
    base, target_tokens: int, fact: Fact = FACTS[0], seed: int = 0, fact_at: int = 2
) -> list[tuple[str, str]]:
    """Messages totalling about `target_tokens`; the fact is stated after `fact_at` turns."""
    messages: list[tuple[str, str]] = [("system", "You are a helpful assistant.")]
    used = 0
    for role, text in dialogue_turns(seed=seed):
        if len(messages) == fact_at + 1:
            messages += [("user", fact.statement), ("assistant", fact.acknowledgement)]
        messages.append((role, text))
        used += len(base.encode(base.render_message(role, text)))
        if used >= target_tokens:
            break
    if messages[-1][0] == "user":
        messages.append(("assistant", "I see."))
    return messages
