"""`megacontext eval-focus`: does a scorer find the note that answers the question?

On the memory benchmark's test split (never used for training or tuning), each task's
history is stored in a session and its working context taken as the turn's refocus first
sees it (the newest tokens raw, the rest as gists). Then, per scorer (lensnet, heuristic,
recency-only, random):
- hit@1 / hit@4: an entry holding the answering note is among the 1 / 4 best-scored
  gists (the expansion candidates); a note already raw counts as found; mrr: the mean of
  1 / that rank;
- fact raw: after the refocus rounds a reply would run, every token of the note is raw;
- look-alikes raw: the share of the sibling notes (same template, another name) shown raw
  after those rounds: each is one more candidate for the reader to confuse;
- used: positions in use after those rounds, over the positions a reply leaves.

    megacontext eval-focus --sizes 2000 8000 128000 --tasks 24 24 6 --json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time

import numpy as np
from tqdm import tqdm

from ..focus import FocusAllocator, WorkingContext
from ..focus.scorers import HeuristicScorer
from ..training.lens_train import answer_entries, answer_rank

SCORERS = ("lensnet", "heuristic", "recency", "random")
MAX_NEW_TOKENS = 32


class RandomScorer:
    """Uniform noise: the floor every scorer must beat."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def score(self, wc, tree, query) -> np.ndarray:
        return self.rng.normal(size=len(wc.entries))


def _scorers(engine, seed: int) -> dict:
    from ..engine import make_scorer

    cfg = engine.config
    return {
        "lensnet": make_scorer(cfg.with_(scorer="lensnet"), engine.base),
        "heuristic": make_scorer(cfg.with_(scorer="heuristic"), engine.base),
        "recency": HeuristicScorer(recency_scale=float(cfg.recency_tokens), relevance_weight=0),
        "random": RandomScorer(seed),
    }


def refocused(engine, scorer, wc: WorkingContext, tree, query: list[int], budget: int):
    """The working context after a reply's refocus rounds with `scorer` (a copy)."""
    wc = WorkingContext(list(wc.entries), wc.shown_levels)
    alloc = FocusAllocator(engine.config)
    alloc.pinned = [(0, min(engine.config.pin_system_tokens, 64))]
    alloc.new_event()
    for _ in range(engine.config.refocus_rounds):
        if not alloc.refocus(wc, tree, scorer.score(wc, tree, query), budget):
            break
    alloc.fit(wc, tree, budget)
    return wc


def run(sizes: list[int], tasks: dict[int, int], split: str, seed: int, options: dict) -> dict:
    from ..baselines import SYSTEM_PROMPT
    from ..engine import MegaContextEngine
    from .tasks import TaskGenerator, reader_counter

    engine = MegaContextEngine(store=tempfile.mkdtemp(prefix="mc-eval-focus-"), **options)
    base = engine.base
    scorers = _scorers(engine, seed)
    gen = TaskGenerator(split, reader_counter(base), seed=seed)
    prompt = len(base.encode(base.generation_prompt()))
    budget = engine.config.working_budget - MAX_NEW_TOKENS - prompt
    rows = []
    for size in sizes:
        for i in tqdm(range(tasks[size]), desc=f"eval-focus {size}", unit="task"):
            task = gen.task(size, i)
            s = engine.session(task.id)
            s.extend([("system", SYSTEM_PROMPT), *task.messages])
            s.append("user", task.question)
            wc, tree = s.working_context(), s.tree
            answer = answer_entries(s, task, wc.entries)
            span = (
                min(wc.entries[a].start for a in answer),
                max(wc.entries[a].end for a in answer),
            )
            query = base.encode(task.question)
            levels = np.array([e.level for e in wc.entries])
            for name, scorer in scorers.items():
                t0 = time.perf_counter()
                scores = scorer.score(wc, tree, query)
                score_ms = (time.perf_counter() - t0) * 1000
                rank = answer_rank(scores, levels, answer)
                after = refocused(engine, scorer, wc, tree, query, budget)
                lv = after.level_map(tree.n_tokens)
                raw = _note_raw(s, task, lv)
                rows.append(
                    {
                        "task": task.id,
                        "size": size,
                        "scorer": name,
                        "rank": rank,
                        "hit@1": rank <= 1,
                        "hit@4": rank <= 4,
                        "fact_raw": raw,
                        "lookalikes_raw": _lookalikes_raw(s, task, lv),
                        "used": len(after) / budget,
                        "score_ms": round(score_ms, 2),
                        "answer_span": span,
                    }
                )
            engine.delete_session(task.id)
    shutil.rmtree(engine.store.path, ignore_errors=True)
    return {
        "split": split,
        "sizes": sizes,
        "tasks": {str(s): tasks[s] for s in sizes},
        "config": engine.config.to_dict(),
        "summary": summarize(rows, sizes),
        "rows": rows,
    }


def _note_raw(session, task, level_map: np.ndarray) -> bool:
    from .tasks import mentions

    for i in task.fact_indices:
        m = session.messages()[i + 1]
        if mentions(m.content, task.answers):
            return bool((level_map[m.token_start : m.token_end] == 0).all())
    return False


def _lookalikes_raw(session, task, level_map: np.ndarray) -> float:
    """Share of the fact notes that do not name the asked entity shown wholly raw."""
    name = re.compile(rf"\b{re.escape(task.entity)}\b")
    shown = [
        bool((level_map[m.token_start : m.token_end] == 0).all())
        for m in (session.messages()[i + 1] for i in task.fact_indices)
        if not name.search(m.content)
    ]
    return float(np.mean(shown)) if shown else 0.0


def summarize(rows: list[dict], sizes: list[int]) -> dict:
    out: dict = {}
    for name in SCORERS:
        for size in sizes:
            sel = [r for r in rows if r["scorer"] == name and r["size"] == size]
            if not sel:
                continue
            out.setdefault(name, {})[str(size)] = {
                "tasks": len(sel),
                "hit@1": round(float(np.mean([r["hit@1"] for r in sel])), 3),
                "hit@4": round(float(np.mean([r["hit@4"] for r in sel])), 3),
                "mrr": round(float(np.mean([1.0 / r["rank"] for r in sel])), 3),
                "fact_raw": round(float(np.mean([r["fact_raw"] for r in sel])), 3),
                "lookalikes_raw": round(float(np.mean([r["lookalikes_raw"] for r in sel])), 3),
                "used": round(float(np.mean([r["used"] for r in sel])), 3),
                "score_ms": round(float(np.median([r["score_ms"] for r in sel])), 2),
            }
    return out


def table(result: dict) -> str:
    lines = [
        f"{'scorer':<10} {'size':>6} {'tasks':>5} {'hit@1':>6} {'hit@4':>6} {'mrr':>5} "
        f"{'fact raw':>8} "
        f"{'look-alikes raw':>15} {'used':>5} {'score ms':>8}"
    ]
    for name, by_size in result["summary"].items():
        for size, m in by_size.items():
            lines.append(
                f"{name:<10} {size:>6} {m['tasks']:>5} {m['hit@1']:>6.2f} {m['hit@4']:>6.2f} "
                f"{m['mrr']:>5.2f} {m['fact_raw']:>8.2f} {m['lookalikes_raw']:>15.2f} {m['used']:>5.2f} "
                f"{m['score_ms']:>8.1f}"
            )
    return "\n".join(lines)


def eval_focus_main(argv: list[str] | None = None) -> int:
    from ..serving.cli import add_engine_option, engine_overrides
    from .tasks import task_counts

    p = argparse.ArgumentParser(
        prog="megacontext eval-focus",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000])
    p.add_argument(
        "--tasks",
        type=int,
        nargs="+",
        default=[24],
        help="tasks per size: one count for every size, or one per size",
    )
    p.add_argument("--split", default="test", choices=("dev", "test"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=int, default=1024)
    add_engine_option(p)
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    args = p.parse_args(argv)
    try:
        tasks = task_counts(args.sizes, args.tasks)
    except ValueError as e:
        p.error(f"--tasks: {e}")
    options = {"working_budget": args.budget, **engine_overrides(args.engine_option)}
    result = run(args.sizes, tasks, args.split, args.seed, options)
    result["command"] = ["megacontext", "eval-focus", *(argv or [])]
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text if args.json else table(result))
    return 0
