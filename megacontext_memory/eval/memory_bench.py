"""`megacontext bench memory`: recall of confusable, updated facts as the history grows.

Every system hands the same frozen reader (the engine's base model) the same system prompt,
question and chat template under the same `working_budget`, and differs only in what it
shows of the history (see `eval/tasks.py` for the tasks):

  oracle       only the messages that state a fact of the asked-about family (the ceiling)
  full         the whole history, where it fits the model's trained context
  truncation   the newest messages that fit the budget
  rag          top-k FAISS chunks (all-MiniLM-L6-v2) in time order, then the newest messages
  megacontext  the engine (gists + focus under the budget), once per `--scorers` entry

A reply is correct when it names the latest value (any accepted form) and none of the
distractors (the siblings' values, the superseded value); `answer_mentioned` counts replies
that name it at all. `choice` asks the reader directly, without decoding: after the
context the reply read and the answer's lead ("The door code for the Marwood storage room
is"), does it give the latest value a higher log-probability than every other value stated
in the history? It tells a focus that showed the note but lost the reader (a derailed
reply, `choice` right) from one that showed a look-alike (`choice` wrong). Tune RAG on dev
only (`--chunk-tokens 64 192 --k 2 4 8 --split dev` runs the grid); a grid on the test
split is refused.

With `--store-cache DIR` each task's history is built into DIR once (keyed by the task's
messages, the model and the GistNet) and every later run reopens a copy of it, as after a
restart: comparing focus options at 128k then costs seconds a task instead of a minute.
With `--warm-turns N` every system answers N small-talk questions before the task's, so the
question comes mid-conversation: MegaContext to a session whose KV cache is warm (options of
the cache's reuse, `kv_reuse`, act only there), the raw-context systems from their context
followed by the exchanges so far (the budget holds both; `max_new_tokens` is set aside for
each small-talk reply).

    megacontext bench memory --quick
    megacontext bench memory --split test --sizes 2000 8000 32000 128000 --out runs/mem
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import torch

from ..baselines import SYSTEM_PROMPT, newest_that_fit, prompt_ids, read
from ..config import SCORERS, Config
from .tasks import (
    BENCH_SPLITS,
    SIZES,
    Task,
    TaskGenerator,
    mentions,
    reader_counter,
    task_counts,
)

QUICK = {2000: 2, 8000: 1}  # tasks per size with --quick: a smoke run of every system, < 5 min
TASKS_PER_SIZE = 24
MAX_NEW_TOKENS = 32
WARM_QUESTIONS = [
    "Thanks. Before I ask anything else, how has your day been?",
    "Could you suggest a good book for a long train ride?",
    "What is a simple dinner I could cook tonight?",
    "Any tips for sleeping better?",
]


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson interval of k successes in n (sensible at 0/n and n/n, unlike p +- 2se)."""
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def git_commit() -> str:
    """HEAD of the checkout this code runs from, '-dirty' when its package has changes."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", "megacontext_memory"], cwd=root
        ).returncode
    except OSError:
        return "unknown"
    return (head or "unknown") + ("-dirty" if head and dirty else "")


@dataclass
class Answer:
    reply: str
    positions: int  # positions the reader saw before its reply
    turn_s: float  # from the question to the end of the reply
    ingest_s: float | None = None  # building the memory from the history (None: no index)
    logprobs: list[float] | None = None  # per stated value, after the task's answer lead


class Bench:
    """Runs every system on a task; holds the reader, the engines and a scratch store."""

    def __init__(
        self,
        systems: list[str],
        budget: int,
        rag_grid: list[tuple[int, int]],
        scorers: list[str],
        scratch: Path,
        device: str | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
        engine_options: dict | None = None,
        store_cache: Path | None = None,
        warm_turns: int = 0,
    ):
        from .. import MegaContextEngine

        if not 0 <= warm_turns <= len(WARM_QUESTIONS):
            raise ValueError(f"warm_turns must be in [0, {len(WARM_QUESTIONS)}], got {warm_turns}")
        self.budget, self.max_new, self.scratch = budget, max_new_tokens, scratch
        self.store_cache, self.warm_turns = store_cache, warm_turns
        self.engines, self.options = {}, {}
        if "megacontext" in systems:
            for name, scorer in self._megacontext_names(scorers).items():
                store = scratch / f"engine-{scorer}"
                options = {**(engine_options or {}), "working_budget": budget, "scorer": scorer}
                self.options[name] = {"device": device, **options}
                self.engines[name] = MegaContextEngine(store=store, **self.options[name])
        engine = next(iter(self.engines.values()), None)
        engine = engine or MegaContextEngine(store=scratch / "reader", working_budget=budget)
        self.base = engine.base
        self.count = reader_counter(self.base)
        self.limit = self.base.model.config.max_position_embeddings
        self.rag_grid = rag_grid
        self.runners: dict[str, Callable[[Task], Answer | None]] = {}
        for name in ("oracle", "full", "truncation"):
            if name in systems:
                self.runners[name] = getattr(self, name)
        self.settings: dict[str, dict] = {}
        if "rag" in systems:
            for c, k in rag_grid:
                name = "rag" if len(rag_grid) == 1 else f"rag-c{c}-k{k}"
                self.settings[name] = {"chunk_tokens": c, "k": k}
        for name in self.engines:
            self.settings[name] = {"scorer": self.engines[name].config.scorer}
            if engine_options:
                self.settings[name]["engine_options"] = engine_options
        if warm_turns:
            for name in self.systems:
                self.settings.setdefault(name, {})["warm_turns"] = warm_turns

    @staticmethod
    def _megacontext_names(scorers: list[str]) -> dict[str, str]:
        default = Config().scorer
        return {("megacontext" if s == default else f"megacontext-{s}"): s for s in scorers}

    @property
    def systems(self) -> list[str]:
        return [*self.runners, *(n for n in self.settings if n.startswith("rag")), *self.engines]

    # ---- the raw-context systems ---------------------------------------------------------
    def _ask(self, messages: list[tuple[str, str]], task: Task, t0: float) -> Answer:
        t_talk = time.perf_counter()
        messages = [*messages, *self._small_talk(messages)]
        t0 += time.perf_counter() - t_talk  # the question's turn alone is timed
        ids = prompt_ids(self.base, [("system", SYSTEM_PROMPT), *messages, ("user", task.question)])
        reply = read(self.base, ids, self.max_new)
        answer = Answer(reply, len(ids), time.perf_counter() - t0)
        with torch.no_grad():
            positions = torch.arange(len(ids) - 1, device=self.base.device)[None]
            _, cache = self.base.forward(self.base.embed(ids[:-1])[None], positions)
        lead = [ids[-1], *self.base.encode(task.lead)]
        endings = [self.base.encode(text) for text in _endings(task)]
        answer.logprobs = self.base.continuation_logprobs(cache, lead, endings)
        return answer

    def _small_talk(self, messages: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The `warm_turns` small-talk exchanges, each reply read from `messages` and the
        exchanges before it, as MegaContext answers them before the question."""
        talk: list[tuple[str, str]] = []
        for question in WARM_QUESTIONS[: self.warm_turns]:
            ids = prompt_ids(
                self.base, [("system", SYSTEM_PROMPT), *messages, *talk, ("user", question)]
            )
            talk += [("user", question), ("assistant", read(self.base, ids, self.max_new))]
        return talk

    def _frame(self, task: Task) -> int:
        """Tokens of the system prompt, the small talk (its replies at their longest), the
        question and the reply's prompt."""
        talk = [
            m for q in WARM_QUESTIONS[: self.warm_turns] for m in (("user", q), ("assistant", ""))
        ]
        ids = prompt_ids(self.base, [("system", SYSTEM_PROMPT), *talk, ("user", task.question)])
        return len(ids) + self.warm_turns * self.max_new

    def _room(self, task: Task) -> int:
        """Tokens of history that fit the budget beside the frame and the reply."""
        return self.budget - self.max_new - self._frame(task)

    def oracle(self, task: Task) -> Answer:
        t0 = time.perf_counter()
        return self._ask([task.messages[i] for i in task.fact_indices], task, t0)

    def full(self, task: Task) -> Answer | None:
        if task.tokens + self._frame(task) + self.max_new > self.limit:
            return None  # past the model's trained context
        return self._ask(list(task.messages), task, time.perf_counter())

    def truncation(self, task: Task) -> Answer:
        t0 = time.perf_counter()
        lengths = [self.count(r, t) for r, t in task.messages]
        start = newest_that_fit(lengths, self._room(task))
        return self._ask(list(task.messages[start:]), task, t0)

    def rag(self, task: Task) -> dict[str, Answer]:
        """Every RAG setting of the grid; one index per chunk size serves every k."""
        from ..baselines.rag import RagMemory

        out = {}
        for c in sorted({c for c, _ in self.rag_grid}):
            memory = RagMemory(self.scratch / "rag" / f"{task.id}-c{c}", chunk_tokens=c)
            t0 = time.perf_counter()
            memory.extend(task.messages)
            ingest = time.perf_counter() - t0
            for name, s in self.settings.items():
                if name.startswith("rag") and s["chunk_tokens"] == c:
                    t0 = time.perf_counter()
                    shown = memory.context(task.question, self._room(task), self.count, s["k"])
                    out[name] = self._ask(shown, task, t0)
                    out[name].ingest_s = ingest
            memory.delete()
        return out

    def megacontext(self, name: str, task: Task) -> Answer:
        if self.store_cache is not None:
            return self._megacontext_cached(name, task)
        engine = self.engines[name]
        session = engine.session(task.id)
        ingest = _ingest(session, task)
        answer = self._reply(session, task, ingest)
        engine.delete_session(task.id)
        return answer

    def _megacontext_cached(self, name: str, task: Task) -> Answer:
        """The engine on a copy of the task's store as built by an earlier run, or built now
        and kept (`--store-cache`): focus options can then be compared at every length
        without ingesting the history again. The copy is reopened as after a restart."""
        from .. import MegaContextEngine

        engine = self.engines[name]
        base = engine.base
        shaping = [base.name, base.dtype_name, engine.gister.version, engine.config.gist_dtype]
        key = json.dumps([*shaping, SYSTEM_PROMPT, task.messages])  # what `_ingest` stores
        built = self.store_cache / f"{task.id}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
        record = built / "built.json"
        if not record.exists():
            shutil.rmtree(built, ignore_errors=True)  # an interrupted build
            # Closed before it is recorded: its log is folded into the index it leaves.
            with MegaContextEngine(store=built / "store", **self.options[name]) as builder:
                ingest = _ingest(builder.session(task.id), task)
            record.write_text(json.dumps({"task": task.id, "ingest_s": round(ingest, 3)}))
        ingest = json.loads(record.read_text())["ingest_s"]
        copy = self.scratch / f"replay-{name}"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(built / "store", copy)
        with MegaContextEngine(store=copy, **self.options[name]) as replay:
            answer = self._reply(replay.session(task.id), task, ingest)
        shutil.rmtree(copy, ignore_errors=True)
        return answer

    def _reply(self, session, task: Task, ingest: float) -> Answer:
        for question in WARM_QUESTIONS[: self.warm_turns]:
            session.append("user", question)
            session.generate(max_new_tokens=self.max_new)
        t0 = time.perf_counter()
        session.append("user", task.question)
        reply = session.generate(max_new_tokens=self.max_new)
        turn = time.perf_counter() - t0
        prompt = len(self.base.encode(self.base.generation_prompt()))
        answer = Answer(reply, session.telemetry[-1].positions_used + prompt, turn, ingest)
        answer.logprobs = session.reply_logprobs(_endings(task), task.lead)
        return answer

    def run(self, task: Task) -> dict[str, Answer | None]:
        answers: dict[str, Answer | None] = {n: f(task) for n, f in self.runners.items()}
        if any(n.startswith("rag") for n in self.settings):
            answers.update(self.rag(task))
        for name in self.engines:
            answers[name] = self.megacontext(name, task)
        return answers


def _ingest(session, task: Task) -> float:
    """Seconds to store the task's history and make its gists (ingest counts the gists, as
    RAG's counts its embeddings)."""
    t0 = time.perf_counter()
    session.extend([("system", SYSTEM_PROMPT), *task.messages])
    session.make_gists()
    return time.perf_counter() - t0


def _endings(task: Task) -> list[str]:
    """Each stated value as the end of the answer's sentence. The full stop matters: without
    it "December 1" would outscore "December 10" by being shorter."""
    return [f" {v}." for v in task.values]


def row(task: Task, system: str, a: Answer | None) -> dict:
    out = {
        "task": task.id,
        "size": task.size,
        "system": system,
        "tokens": task.tokens,
        "tokens_back": task.tokens_back,
        "kind": task.kind,
        "updated": task.updated,
    }
    if a is None:
        return out | {"skipped": "history longer than the model's context"}
    hit, wrong = mentions(a.reply, task.answers), mentions(a.reply, task.distractors)
    if a.logprobs is not None:  # the reader's choice among the stated values (see module doc)
        right = a.logprobs[task.answer_index]
        rival = max(lp for i, lp in enumerate(a.logprobs) if i != task.answer_index)
        out |= {"choice": right > rival, "choice_margin": round(right - rival, 3)}
    return out | {
        "reply": a.reply,
        "correct": hit and not wrong,
        "answer_mentioned": hit,
        "distractor_mentioned": wrong,
        "positions": a.positions,
        "turn_s": round(a.turn_s, 3),
        "ingest_s": None if a.ingest_s is None else round(a.ingest_s, 3),
    }


def summarize(rows: list[dict], systems: list[str], sizes: list[int]) -> dict:
    """Per system and size: accuracy with its 95% interval, n, and cost figures."""
    out: dict[str, dict] = {}
    for system in systems:
        out[system] = {}
        for size in sizes:
            sel = [r for r in rows if r["system"] == system and r["size"] == size]
            done = [r for r in sel if "correct" in r]
            if not done:
                if sel:
                    out[system][str(size)] = {"accuracy": None, "n": 0, "note": sel[0]["skipped"]}
                continue
            k, n = sum(r["correct"] for r in done), len(done)
            ingest = [r["ingest_s"] for r in done if r["ingest_s"] is not None]
            out[system][str(size)] = {
                "accuracy": round(k / n, 4),
                "ci95": wilson(k, n),
                "n": n,
                "correct": k,
                "answer_mentioned": round(sum(r["answer_mentioned"] for r in done) / n, 4),
                "choice_accuracy": _share([r["choice"] for r in done if "choice" in r]),
                "history_tokens": round(statistics.mean(r["tokens"] for r in done)),
                "positions_used": round(statistics.mean(r["positions"] for r in done)),
                "turn_latency_s": round(statistics.median(r["turn_s"] for r in done), 3),
                "ingest_tokens_per_s": (
                    round(sum(r["tokens"] for r in done) / sum(ingest)) if ingest else None
                ),
                "seconds": round(sum(r["turn_s"] + (r["ingest_s"] or 0) for r in done), 1),
            }
    return out


def _share(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def table(result: dict) -> str:
    """Accuracy per system (rows) and size (columns), then positions, latency and ingest."""
    sizes = sorted({int(s) for cells in result["systems"].values() for s in cells})
    head = f"{'system':<22}" + "".join(f"{f'{s:,}':>22}" for s in sizes)
    lines = [
        f"memory bench, split {result['split']}, reader {result['reader']} "
        f"({result['reader_dtype']}), "
        f"working_budget {result['working_budget']}, commit {result['commit']}",
        "accuracy [95% CI] (n)",
        head,
    ]
    for system, cells in result["systems"].items():
        line = f"{system:<22}"
        for s in sizes:
            c = cells.get(str(s))
            if c is None:
                text = ""
            elif c["accuracy"] is None:
                text = "n/a"
            else:
                lo, hi = c["ci95"]
                text = f"{c['accuracy']:.2f} [{lo:.2f},{hi:.2f}] ({c['n']})"
            line += f"{text:>22}"
        lines.append(line)
    lines += ["", "choice: the latest value scored above every other stated value", head]
    for system, cells in result["systems"].items():
        line = f"{system:<22}"
        for s in sizes:
            c = cells.get(str(s))
            share = c.get("choice_accuracy") if c else None
            text = "" if share is None else f"{share:.2f} ({c['n']})"
            line += f"{text:>22}"
        lines.append(line)
    lines += ["", "positions used / median turn latency (s) / ingest tokens per s", head]
    for system, cells in result["systems"].items():
        line = f"{system:<22}"
        for s in sizes:
            c = cells.get(str(s))
            text = ""
            if c and c["accuracy"] is not None:
                rate = c["ingest_tokens_per_s"]
                text = (
                    f"{c['positions_used']} / {c['turn_latency_s']:.2f} / {rate if rate else '-'}"
                )
            line += f"{text:>22}"
        lines.append(line)
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    """Accuracy vs history length per system, with 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (system, cells) in enumerate(result["systems"].items()):
        pts = sorted(
            (int(s), c["accuracy"], c["ci95"])
            for s, c in cells.items()
            if c["accuracy"] is not None
        )
        if not pts:
            continue
        xs = [x * (1 + 0.03 * (i - 2)) for x, _, _ in pts]  # a small offset keeps bars apart
        ys = [y for _, y, _ in pts]
        err = [[y - lo for _, y, (lo, _) in pts], [hi - y for _, y, (_, hi) in pts]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=system)
    ax.set_xscale("log")
    ax.set_xlabel("history length (tokens)")
    ax.set_ylabel("accuracy (95% interval)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(
        f"confusable-fact recall, {result['split']} split, budget {result['working_budget']}"
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(
    split: str,
    sizes: list[int],
    tasks_per_size: dict[int, int],
    systems: list[str],
    out: Path,
    budget: int = 1024,
    rag_grid: list[tuple[int, int]] | None = None,
    scorers: list[str] | None = None,
    seed: int = 0,
    resume: bool = False,
    device: str | None = None,
    engine_options: dict | None = None,
    store_cache: Path | None = None,
    warm_turns: int = 0,
) -> dict:
    """Run the benchmark; `out` gets rows.jsonl (one line per reply, as they come),
    memory_bench.json (rewritten after every task) and memory_bench.png. With `resume`, the
    replies already in `out` are kept, so runs of other systems on the same tasks add up.
    With `store_cache`, MegaContext's built histories are kept there and reused."""
    from ..baselines.rag import CHUNK_TOKENS, TOP_K

    rag_grid = rag_grid or [(CHUNK_TOKENS, TOP_K)]
    if split == "test" and len(rag_grid) > 1:
        raise ValueError("a RAG grid is tuning: run it on --split dev, never on test")
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    kept = {}  # (task, system) -> the newest row: a resumed task may have been run twice
    if resume and rows_path.exists():
        for line in rows_path.open():
            r = json.loads(line)
            kept[r["task"], r["system"]] = r
    else:
        rows_path.write_text("")
    rows, done = list(kept.values()), set(kept)
    summary_path = out / "memory_bench.json"
    prior = json.loads(summary_path.read_text()) if resume and summary_path.exists() else {}
    prior_settings = prior.get("settings", {})
    t_start, commit = time.perf_counter(), git_commit()  # the code this run loaded
    with tempfile.TemporaryDirectory(prefix="mc-memory-bench-") as scratch:
        scorers = scorers or [Config().scorer]
        bench = Bench(
            systems,
            budget,
            rag_grid,
            scorers,
            Path(scratch),
            device,
            engine_options=engine_options,
            store_cache=store_cache,
            warm_turns=warm_turns,
        )
        gen = TaskGenerator(split, bench.count, seed)
        result = {}

        def write() -> None:
            nonlocal result
            systems = bench.systems + [
                r["system"] for r in rows if r["system"] not in bench.systems
            ]
            result = {
                "systems": summarize(rows, list(dict.fromkeys(systems)), sizes),
                "reader": bench.base.name,
                "reader_dtype": bench.base.dtype_name,
                "working_budget": budget,
                "split": split,
                "commit": commit,
                "seed": seed,
                "tasks_per_size": {str(s): tasks_per_size[s] for s in sizes},
                "max_new_tokens": bench.max_new,
                "settings": prior_settings | bench.settings,
                "elapsed_s": round(time.perf_counter() - t_start, 1),
            }
            summary_path.write_text(json.dumps(result, indent=2))

        write()
        # Sizes take turns, so a run stopped early has results at every size.
        for i in range(max(tasks_per_size.values())):
            for size in sizes:
                if i >= tasks_per_size[size]:
                    continue
                task = gen.task(size, i)
                if all((task.id, s) in done for s in bench.systems):
                    continue
                t0 = time.perf_counter()
                for system, answer in bench.run(task).items():
                    r = row(task, system, answer)
                    rows.append(r)
                    with rows_path.open("a") as f:
                        f.write(json.dumps(r) + "\n")
                marks = " ".join(
                    f"{r['system']}:{'+' if r.get('correct') else '-'}"
                    for r in rows
                    if r["task"] == task.id
                )
                print(f"{task.id} ({time.perf_counter() - t0:.0f}s) {marks}", file=sys.stderr)
                write()
            write()
            plot(result, out / "memory_bench.png")
    return result


def _grid(values: list[int] | None, default: int) -> list[int]:
    return values if values else [default]


def bench_memory_main(argv: list[str] | None = None) -> int:
    from ..baselines.rag import CHUNK_TOKENS, TOP_K
    from ..serving.cli import add_engine_option, engine_overrides

    p = argparse.ArgumentParser(
        prog="megacontext bench memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="2k and 8k tokens, 2 tasks and 1")
    p.add_argument("--sizes", type=int, nargs="+", help=f"history lengths (default {SIZES})")
    p.add_argument(
        "--tasks",
        type=int,
        nargs="+",
        help=f"tasks per size: one count for every size, or one per size (default {TASKS_PER_SIZE})",
    )
    p.add_argument("--split", choices=BENCH_SPLITS, default="test")
    p.add_argument(
        "--systems",
        nargs="+",
        default=["oracle", "full", "truncation", "rag", "megacontext"],
        choices=["oracle", "full", "truncation", "rag", "megacontext"],
    )
    p.add_argument(
        "--scorers",
        nargs="+",
        choices=SCORERS,
        help="megacontext scorers, one system each (default: the engine's default scorer)",
    )
    p.add_argument("--chunk-tokens", type=int, nargs="+", help=f"RAG (default {CHUNK_TOKENS})")
    p.add_argument("--k", type=int, nargs="+", help=f"RAG chunks retrieved (default {TOP_K})")
    p.add_argument("--budget", type=int, default=1024, help="working budget of every system")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: automatic)")
    p.add_argument("--out", default="memory-bench", help="folder for rows, JSON and PNG")
    p.add_argument("--resume", action="store_true", help="keep the replies already in --out")
    p.add_argument(
        "--store-cache",
        type=Path,
        help="keep MegaContext's built histories here and reuse them: runs that change only "
        "focus options (scorer, shown_levels, recency_tokens ...) skip the ingest",
    )
    p.add_argument(
        "--warm-turns",
        type=int,
        default=0,
        help=f"small-talk turns MegaContext answers before each question (0-{len(WARM_QUESTIONS)})",
    )
    add_engine_option(p)
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    args = p.parse_args(argv)
    sizes = args.sizes or list(QUICK if args.quick else SIZES)
    default = [QUICK.get(s, 1) if args.quick else TASKS_PER_SIZE for s in sizes]
    try:
        per_size = task_counts(sizes, args.tasks or default)
    except ValueError as e:
        p.error(f"--tasks: {e}")
    grid = list(product(_grid(args.chunk_tokens, CHUNK_TOKENS), _grid(args.k, TOP_K)))
    try:
        result = run(
            args.split,
            sizes,
            per_size,
            args.systems,
            Path(args.out),
            args.budget,
            grid,
            args.scorers,
            args.seed,
            args.resume,
            args.device,
            engine_overrides(args.engine_option),
            args.store_cache,
            args.warm_turns,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(table(result))
        print(f"\nrows, JSON and plot in {args.out}/")
    return 0
