"""Recall benchmark: a fact planted early, asked about after N tokens of held-out dialogue.

Same reader model, same budget for every method:
  megacontext  the engine (gists + refocus) with `working_budget` positions
  truncation   the newest `working_budget` tokens only
  full         the whole history raw (only while it fits the model's trained context)

    megacontext eval-recall --tokens 4000 12000 --json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from ..demo import FACTS, conversation


def _answer_raw(base, ids: list[int], max_new_tokens: int) -> str:
    emb = base.embed(ids)
    with torch.no_grad():
        logits, cache = base.forward(emb[None], torch.arange(len(ids), device=base.device)[None])
        return "".join(s.text for s in base.stream(logits[0, -1], cache, len(ids), max_new_tokens))


def run(tokens: list[int], budget: int, seeds: int, max_new_tokens: int = 24, **engine_kw) -> dict:
    from .. import MegaContextEngine

    engine = MegaContextEngine(
        store=tempfile.mkdtemp(prefix="mc-recall-"), working_budget=budget, **engine_kw
    )
    base, rows = engine.base, []
    limit = base.model.config.max_position_embeddings
    for n in tokens:
        for fi, fact in enumerate(FACTS):
            for seed in range(seeds):
                script = conversation(base, n, fact, seed=seed)
                s = engine.session(f"recall-{n}-{fi}-{seed}")
                t0 = time.perf_counter()
                for role, text in script:
                    s.append(role, text)
                s.append("user", fact.question)
                reply = s.generate(max_new_tokens=max_new_tokens)
                row = {
                    "tokens": n,
                    "fact": fi,
                    "seed": seed,
                    "history": s.token_count(),
                    "megacontext": fact.answer in reply,
                    "seconds": round(time.perf_counter() - t0, 1),
                }
                prompt = list(s.tree.tokens()[: s.messages()[-1].token_start])
                prompt += base.encode(base.generation_prompt())
                room = budget - max_new_tokens
                row["truncation"] = fact.answer in _answer_raw(base, prompt[-room:], max_new_tokens)
                row["full"] = (
                    fact.answer in _answer_raw(base, prompt, max_new_tokens)
                    if len(prompt) + max_new_tokens <= limit
                    else None
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    for n in tokens:
        sel = [r for r in rows if r["tokens"] == n]
        summary[str(n)] = {
            m: (None if any(r[m] is None for r in sel) else sum(r[m] for r in sel) / len(sel))
            for m in ("megacontext", "truncation", "full")
        }
    return {
        "budget": budget,
        "n_per_length": len(FACTS) * seeds,
        "accuracy": summary,
        "gist_version": engine.gister.version,
        "rows": rows,
    }


def eval_recall_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="megacontext eval-recall",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=[4000, 12000],
        help="history lengths (tokens of dialogue after the fact)",
    )
    p.add_argument("--budget", type=int, default=1024, help="working budget for every method")
    p.add_argument("--seeds", type=int, default=1, help="dialogue draws per fact and length")
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    args = p.parse_args(argv)
    result = run(args.tokens, args.budget, args.seeds)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"\nrecall accuracy, budget {args.budget}, {result['n_per_length']} probes per length")
    print(f"{'history':>8} {'megacontext':>12} {'truncation':>11} {'full':>6}")
    for n, acc in result["accuracy"].items():
        cells = [
            "n/a" if acc[m] is None else f"{acc[m]:.2f}"
            for m in ("megacontext", "truncation", "full")
        ]
        print(f"{n:>8} {cells[0]:>12} {cells[1]:>11} {cells[2]:>6}")
    return 0
