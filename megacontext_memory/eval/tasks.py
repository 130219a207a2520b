"""Long-memory tasks with confusable facts: the data of `megacontext bench memory`.

A task is a long history of user notes and dialogue turns with a family of 3-4 facts that
share one template (a deadline, a budget, a door code ...) about entities whose names look
alike ("Marwick", "Harwick", "Marwicke"), sometimes followed by an update that changes the
asked-about value; then one question names one entity. The answer is the entity's latest
value, accepted in several written forms; its siblings' values and the superseded value
are distractors.

Filler comes from the packaged corpora's held-out documents (which GistNet training never
sees): Wikipedia lead paragraphs and KJV passages as the user's reading notes, chitchat
dialogues as conversation. Two splits, `dev` (for tuning) and `test` (for reporting), are
disjoint by construction: every filler document, entity name and template value belongs to
exactly one split, decided by a hash of the string, so no seed or size can make them meet.
A history longer than its split's filler pool (about 170k tokens for test, 70k for dev)
repeats documents, each only after all others were used.

Everything is seeded: the same (split, size, index, seed) gives the same task.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from ..corpora import kjv_documents, package_dir, split_of, wiki_documents

BENCH_SPLITS = ("dev", "test")
DEV_PERCENT = 30  # share of every pool (filler documents, names, values) that goes to dev
SIZES = (2000, 8000, 32000, 128000)
LARGE_SIZES = (512000,)
MAX_NOTE_WORDS = 180  # longer documents are cut into several notes (a message must fit the budget)
FACT_SPAN = (0.05, 0.85)  # where in the history (fraction of its tokens) the facts are stated

Counter = Callable[[str, str], int]  # (role, text) -> tokens the message takes in the history


def task_counts(sizes: list[int], counts: list[int]) -> dict[int, int]:
    """`--tasks` of the benchmark commands: one count for every size, or one per size."""
    if len(counts) == 1:
        counts = counts * len(sizes)
    if len(counts) != len(sizes):
        raise ValueError(f"give one count, or one per size ({len(sizes)}), not {len(counts)}")
    return dict(zip(sizes, counts, strict=True))


def bench_split(kind: str, key: str) -> str:
    """'dev' or 'test' for a filler document, name or value: a fixed hash, never a draw."""
    h = int(hashlib.sha1(f"memory-bench\x00{kind}\x00{key}".encode()).hexdigest()[:8], 16)
    return "dev" if h % 100 < DEV_PERCENT else "test"


def _check_split(split: str) -> None:
    if split not in BENCH_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {BENCH_SPLITS}")


# ---- answers -------------------------------------------------------------------------------
def normalize(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces, padded: ' march 14 '."""
    return " " + " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split()) + " "


def mentions(reply: str, forms: tuple[str, ...]) -> bool:
    """Whether `reply` contains any form as whole words ('March 1' is not in 'March 14')."""
    text = normalize(reply)
    return any(normalize(f) in text for f in forms)


def score(reply: str, answers: tuple[str, ...], distractors: tuple[str, ...]) -> bool:
    """Correct: names the answer and no distractor (listing every candidate is no answer)."""
    return mentions(reply, answers) and not mentions(reply, distractors)


# ---- names and values ----------------------------------------------------------------------
NAME_HEADS = (
    "Mar", "Har", "Bel", "Cor", "Dun", "Fen", "Gal", "Hol", "Kel", "Lor", "Mor", "Nor",
    "Pel", "Ros", "Sel", "Tal", "Ver", "Wil", "Yar", "Bram", "Cal", "Dar", "Gar", "Hal",
    "Lan", "Mel", "Ner", "Pen", "Ral", "Sar", "Tor", "Wen", "Bar", "Car", "Dal", "Kin",
)  # fmt: skip
NAME_TAILS = (
    "wick", "ton", "ley", "mere", "by", "ford", "dale", "worth", "holt", "brook", "field",
    "more", "well", "stead", "ridge", "shaw", "croft", "bury", "wood", "hurst", "combe",
)  # fmt: skip
CONSONANTS = "BCDFGHKLMNPRSTVW"
VOWELS = "aeiou"
FIRST_NAMES = (
    "Dana", "Elias", "Priya", "Tomas", "Ingrid", "Kofi", "Lena", "Mateo", "Yuki", "Omar",
    "Sofia", "Rhys", "Amara", "Jonas", "Freya", "Nikhil", "Clara", "Bruno", "Aisha", "Felix",
    "Mira", "Hugo", "Leila", "Oscar", "Nadia", "Ivan", "Greta", "Samir", "Ada", "Theo",
)  # fmt: skip
LAST_NAMES = (
    "Whitlock", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Castellano", "Brennan", "Haddad",
    "Novak", "Fairbanks", "Ostrowski", "Quintero", "Ashdown", "Varga", "Kimura", "Delacroix",
    "Sandoval", "Pemberton", "Rasmussen", "Achebe", "Holloway", "Szabo", "Lockridge",
    "Nakamura", "Ferreira", "Gallagher", "Iversen", "Mbeki", "Thornbury", "Vasquez",
)  # fmt: skip
CITIES = (
    "Lisbon", "Oslo", "Tbilisi", "Porto", "Valencia", "Krakow", "Ghent", "Tallinn", "Bergen",
    "Seville", "Lyon", "Turin", "Dresden", "Zagreb", "Ljubljana", "Vilnius", "Riga",
    "Helsinki", "Aarhus", "Galway", "Cork", "Edinburgh", "Bristol", "Leeds", "Montreal",
    "Halifax", "Denver", "Austin", "Portland", "Boise", "Tucson", "Oaxaca", "Cusco",
    "Quito", "Montevideo", "Rosario", "Nairobi", "Accra", "Dakar", "Tunis", "Marrakesh",
    "Muscat", "Amman", "Baku", "Almaty", "Hanoi", "Busan", "Sapporo", "Kyoto", "Cebu",
    "Perth", "Hobart", "Wellington", "Dunedin", "Reykjavik", "Bratislava", "Sofia",
    "Plovdiv", "Salzburg", "Innsbruck",
)  # fmt: skip
PET_NAMES = (
    "Biscuit", "Pepper", "Juniper", "Mochi", "Pickles", "Waffles", "Clementine", "Basil",
    "Noodle", "Marmalade", "Pretzel", "Tofu", "Sprocket", "Hazel", "Dumpling", "Ziggy",
    "Paprika", "Muffin", "Truffle", "Cinnamon", "Rocket", "Bramble", "Nutmeg", "Pistachio",
    "Gizmo", "Saffron", "Tinker", "Olive", "Crumble", "Fennel", "Scout", "Maple", "Pumpkin",
    "Cosmo", "Kiwi", "Jasper", "Sesame", "Pudding", "Tango", "Ginger",
)  # fmt: skip
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)  # fmt: skip
ASIDES = (  # a second sentence some fact notes carry, as real notes do
    "Remind me to water the plants tonight.",
    "The coffee machine on our floor is broken again.",
    "It has been raining all week.",
    "I still need to reply to a few emails.",
    "Traffic was terrible this morning.",
    "Lunch was a sandwich at my desk.",
)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _date(rng: random.Random) -> str:
    return f"{rng.choice(MONTHS)} {rng.randint(1, 28)}"


def _date_forms(v: str) -> tuple[str, ...]:
    month, day = v.split()
    d = int(day)
    return (
        v,
        f"{d} {month}",
        f"{month[:3]} {d}",
        f"{month} {_ordinal(d)}",
        f"{_ordinal(d)} of {month}",
    )


def _money(rng: random.Random) -> str:
    return f"${rng.randrange(12, 990) * 500:,}"


def _money_forms(v: str) -> tuple[str, ...]:
    digits = v.strip("$")
    return (digits, digits.replace(",", ""))


def _code(rng: random.Random) -> str:
    letters = "ABCDEFGHJKLMNPRSTVWXYZ"
    return f"{rng.choice(letters)}{rng.choice(letters)}-{rng.randint(1000, 9999)}"


def _code_forms(v: str) -> tuple[str, ...]:
    return (v, v.replace("-", ""))


def _phone(rng: random.Random) -> str:
    return f"{rng.randint(200, 989)}-{rng.randint(1000, 9999)}"


def _phone_forms(v: str) -> tuple[str, ...]:
    return (v, v.replace("-", ""))


def _person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def _person_forms(v: str) -> tuple[str, ...]:
    return (v, v.split()[-1])


def _pick(pool: tuple[str, ...]) -> Callable[[random.Random], str]:
    return lambda rng: rng.choice(pool)


def _same(v: str) -> tuple[str, ...]:
    return (v,)


@dataclass(frozen=True)
class Template:
    """One kind of fact: how it is stated, updated and asked, and what its values are."""

    kind: str
    statements: tuple[str, ...]  # "{e}": the entity, "{v}": the value
    update: str
    question: str
    lead: str  # how a reply that answers begins: the value follows it after a space
    value: Callable[[random.Random], str]
    forms: Callable[[str], tuple[str, ...]]  # accepted written forms of a value


TEMPLATES = (
    Template(
        "deadline",
        (
            "Note for later: the internal deadline for the {e} project is {v}.",
            "From today's meeting: we agreed that the {e} project is due internally on {v}.",
        ),
        "Change of plan: the internal deadline for the {e} project has moved to {v}.",
        "What is the internal deadline for the {e} project?",
        "The internal deadline for the {e} project is",
        _date,
        _date_forms,
    ),
    Template(
        "budget",
        (
            "Budget memo: the approved budget for the {e} project is {v}.",
            "Finance signed off on {v} as the budget for the {e} project.",
        ),
        "Budget revision: the approved budget for the {e} project is now {v}.",
        "What is the approved budget for the {e} project?",
        "The approved budget for the {e} project is",
        _money,
        _money_forms,
    ),
    Template(
        "code",
        (
            "Writing this down: the door code for the {e} storage room is {v}.",
            "The {e} storage room opens with the door code {v}.",
        ),
        "The door code for the {e} storage room was changed to {v}.",
        "What is the door code for the {e} storage room?",
        "The door code for the {e} storage room is",
        _code,
        _code_forms,
    ),
    Template(
        "lead",
        (
            "Staffing note: the lead on the {e} account is {v}.",
            "{v} has taken over as the lead on the {e} account.",
        ),
        "Staffing update: the lead on the {e} account is now {v}.",
        "Who is the lead on the {e} account?",
        "The lead on the {e} account is",
        _person,
        _person_forms,
    ),
    Template(
        "city",
        (
            "My friend {e} has just moved to {v}.",
            "Catching up with my friend {e}, who lives in {v} these days.",
        ),
        "My friend {e} has moved again, this time to {v}.",
        "Which city does my friend {e} live in?",
        "Your friend {e} lives in",
        _pick(CITIES),
        _same,
    ),
    Template(
        "phone",
        (
            "For my records: the phone number of the {e} clinic is {v}.",
            "The {e} clinic can be reached at {v}.",
        ),
        "The {e} clinic has a new phone number: {v}.",
        "What is the phone number of the {e} clinic?",
        "The phone number of the {e} clinic is",
        _phone,
        _phone_forms,
    ),
    Template(
        "pet",
        (
            "My neighbour {e} adopted a dog called {v}.",
            "Met my neighbour {e} in the park with her dog, {v}.",
        ),
        "My neighbour {e} renamed her dog; it is called {v} now.",
        "What is the name of my neighbour {e}'s dog?",
        "Your neighbour {e}'s dog is called",
        _pick(PET_NAMES),
        _same,
    ),
)


def _base_name(rng: random.Random) -> str:
    return rng.choice(NAME_HEADS) + rng.choice(NAME_TAILS)


def _sibling_name(name: str, rng: random.Random) -> str:
    """A confusable variant: another first letter, a letter added, a vowel or ending changed."""
    how = rng.randrange(4)
    if how == 0:
        return rng.choice(CONSONANTS) + name[1:]
    if how == 1:
        return name + rng.choice("es")
    if how == 2:
        i = next(j for j, c in enumerate(name) if c in VOWELS)
        return name[:i] + rng.choice(VOWELS) + name[i + 1 :]
    head = next(h for h in NAME_HEADS if name.startswith(h))
    return head + rng.choice(NAME_TAILS)


def _family(rng: random.Random, split: str, n: int) -> list[str]:
    """`n` distinct look-alike names of `split`; the first is the base the others vary."""
    while True:
        base = _base_name(rng)
        if bench_split("name", base) == split:
            break
    names = [base]
    for _ in range(1000):
        if len(names) == n:
            return names
        cand = _sibling_name(base, rng)
        if cand not in names and bench_split("name", cand) == split:
            names.append(cand)
    raise RuntimeError(f"could not vary {base!r} into {n} names of split {split!r}")


def _values(rng: random.Random, tpl: Template, split: str, n: int) -> list[str]:
    """`n` values of `split` whose written forms share nothing (so a reply names one)."""
    out: list[str] = []
    seen: set[str] = set()
    for _ in range(10000):
        if len(out) == n:
            return out
        v = tpl.value(rng)
        forms = {normalize(f) for f in tpl.forms(v)}
        if bench_split(tpl.kind, v) == split and not forms & seen:
            out.append(v)
            seen |= forms
    raise RuntimeError(f"too few {tpl.kind} values in split {split!r}")


# ---- filler --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Document:
    """A filler unit placed whole in a history: a dialogue, or a note cut into messages."""

    key: str  # "source/id": what the dev/test split is decided on
    messages: tuple[tuple[str, str], ...]


def _notes(head: str, sentences: list[str]) -> list[tuple[str, str]]:
    """Sentences packed into user notes of at most MAX_NOTE_WORDS words each."""
    out, cur = [], []
    for s in sentences:
        if cur and len(" ".join(cur + [s]).split()) > MAX_NOTE_WORDS:
            out.append(cur)
            cur = []
        cur.append(" ".join(s.split()[:MAX_NOTE_WORDS]))
    if cur:
        out.append(cur)
    return [("user", f"{head}\n" + " ".join(part)) for part in out]


def filler_documents() -> list[Document]:
    """Every held-out filler document of the three corpora (in a fixed order)."""
    docs = []
    for title, text in wiki_documents():
        if split_of("wiki", title) == "heldout":
            name, _, body = text.strip().partition("\n")
            sentences = re.split(r"(?<=[.!?])\s+", body.strip())
            docs.append(
                Document(f"wiki/{title}", tuple(_notes(f"Reading notes: {name}.", sentences)))
            )
    for doc_id, text in kjv_documents():
        if split_of("kjv", doc_id) == "heldout":
            head, *verses = text.strip().split("\n")
            docs.append(
                Document(f"kjv/{doc_id}", tuple(_notes(f"Today's reading, {head}:", verses)))
            )
    data = json.loads((package_dir("chitchat_dataset") / "dataset.json").read_text())
    for doc_id in sorted(data):
        if split_of("chat", doc_id) != "heldout":
            continue
        turns = []
        for group in data[doc_id].get("messages") or []:
            text = " ".join(m["text"].strip() for m in group if m.get("text", "").strip())
            if text:
                role = "user" if len(turns) % 2 == 0 else "assistant"
                turns.append((role, " ".join(text.split()[:MAX_NOTE_WORDS])))
        if turns:
            docs.append(Document(f"chat/{doc_id}", tuple(turns)))
    return docs


# ---- tasks ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    id: str
    split: str
    size: int  # nominal history length in tokens
    kind: str
    entity: str  # the one asked about
    siblings: tuple[str, ...]
    messages: tuple[tuple[str, str], ...]  # the history, oldest first: (role, text)
    fact_indices: tuple[int, ...]  # messages stating a fact of the family (the oracle's input)
    question: str
    answers: tuple[str, ...]  # accepted forms of the entity's latest value
    distractors: tuple[str, ...]  # forms of the siblings' values and of a superseded value
    values: tuple[str, ...]  # every value stated in the task (for the disjointness check)
    answer_index: int  # the latest value's index in `values`
    lead: str  # the start of a reply that answers, before the value (see `Template.lead`)
    updated: bool
    tokens: int  # the history's length in tokens
    tokens_back: int  # tokens between the message stating the answer and the question
    filler: tuple[str, ...] = field(repr=False)  # keys of the filler documents used


class TaskGenerator:
    """Seeded tasks of one split; `count` measures messages in the reader's tokens."""

    def __init__(self, split: str, count: Counter, seed: int = 0):
        _check_split(split)
        self.split, self.count, self.seed = split, count, seed

    @cached_property
    def pool(self) -> list[tuple[Document, int]]:
        """The split's filler documents with their length in tokens."""
        docs = [d for d in filler_documents() if bench_split("doc", d.key) == self.split]
        return [(d, sum(self.count(r, t) for r, t in d.messages)) for d in docs]

    def tasks(self, size: int, n: int) -> list[Task]:
        return [self.task(size, i) for i in range(n)]

    def task(self, size: int, index: int) -> Task:
        rng = random.Random(f"{self.split}/{size}/{index}/{self.seed}")
        tpl = TEMPLATES[(index + self.seed) % len(TEMPLATES)]
        updated = index % 3 == 1
        names = _family(rng, self.split, 1 + rng.choice((2, 3)))
        values = _values(rng, tpl, self.split, len(names) + updated)
        target = rng.randrange(len(names))
        stated = values[: len(names)]
        answer = values[-1] if updated else values[target]
        positions = sorted(rng.uniform(*FACT_SPAN) for _ in names)
        order = list(range(len(names)))
        rng.shuffle(order)
        # (fraction of the history, note, whether it states the answer)
        planted = [
            (p, rng.choice(tpl.statements).format(e=names[i], v=stated[i]), i == target)
            for p, i in zip(positions, order, strict=True)
        ]
        if updated:
            when = positions[order.index(target)]
            text = tpl.update.format(e=names[target], v=answer)
            planted = [(p, t, False) for p, t, _ in planted]
            planted.append((rng.uniform(when, FACT_SPAN[1]), text, True))
            planted.sort()
        planted = [(p, self._note(rng, text), a) for p, text, a in planted]
        fact_tokens = sum(self.count("user", t) for _, t, _ in planted)
        history, filler, fact_at = self._history(rng, size - fact_tokens, planted)
        lengths = [self.count(r, t) for r, t in history]
        answer_at = next(i for i, (*_, a) in zip(fact_at, planted, strict=True) if a)
        others = [v for v in values if v != answer]
        return Task(
            id=f"{self.split}-{size}-{index:03d}",
            split=self.split,
            size=size,
            kind=tpl.kind,
            entity=names[target],
            siblings=tuple(n for n in names if n != names[target]),
            messages=tuple(history),
            fact_indices=tuple(fact_at),
            question=tpl.question.format(e=names[target]),
            answers=tpl.forms(answer),
            distractors=tuple(f for v in others for f in tpl.forms(v)),
            values=tuple(values),
            answer_index=values.index(answer),
            lead=tpl.lead.format(e=names[target]),
            updated=updated,
            tokens=sum(lengths),
            tokens_back=sum(lengths[answer_at + 1 :]),
            filler=tuple(filler),
        )

    @staticmethod
    def _note(rng: random.Random, fact: str) -> str:
        """A fact alone, or with an unrelated aside before or after it."""
        aside = rng.choice(ASIDES)
        return rng.choice((fact, f"{aside} {fact}", f"{fact} {aside}"))

    def _history(self, rng: random.Random, filler_tokens: int, planted: list[tuple]):
        """Filler documents up to `filler_tokens`, each note of `planted` (sorted by planned
        fraction) before the first message that starts past its fraction. Returns (messages,
        filler keys, index of each planted note in the history)."""
        order: list[tuple[Document, int]] = []
        chosen: list[Document] = []
        used = 0
        while used < filler_tokens:
            if not order:
                order = list(self.pool)
                rng.shuffle(order)
            doc, n = order.pop()
            if used + n <= filler_tokens:
                chosen.append(doc)
                used += n
                continue
            kept = []  # the last document is cut so that the history never exceeds its size
            for role, text in doc.messages:
                n = self.count(role, text)
                if used + n > filler_tokens:
                    break
                kept.append((role, text))
                used += n
            if kept:
                chosen.append(Document(doc.key, tuple(kept)))
            break
        history: list[tuple[str, str]] = []
        fact_at: list[int] = []
        done, queue = 0, list(planted)
        for role, text in (m for doc in chosen for m in doc.messages):
            while queue and queue[0][0] * used <= done:
                fact_at.append(len(history))
                history.append(("user", queue.pop(0)[1]))
            history.append((role, text))
            done += self.count(role, text)
        for _, text, _ in queue:
            fact_at.append(len(history))
            history.append(("user", text))
        return history, [d.key for d in chosen], fact_at


def reader_counter(base) -> Counter:
    """Tokens a message takes in the reader's chat template."""
    return lambda role, text: len(base.encode(base.render_message(role, text)))
