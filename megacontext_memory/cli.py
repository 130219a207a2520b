"""The `megacontext` command: demo, chat, inspect, and the training/eval/store tools."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Commands implemented next to the code they drive: name -> (module, function, help).
DELEGATED = {
    "train-gist": ("training.gist_train", "train_gist_main", "train GistNet (L1, then L2)"),
    "eval-gist": ("eval.gist_eval", "eval_gist_main", "held-out recovery of L1/L2 gists"),
    "train-lens": ("training.lens_train", "train_lens_main", "label dev tasks, train LensNet"),
    "eval-focus": ("eval.focus_eval", "eval_focus_main", "does a scorer find the answering note"),
    "eval-recall": ("eval.recall", "eval_recall_main", "recall of an old fact vs baselines"),
    "fsck": ("store.fsck", "fsck_main", "check (and --repair) a store's files and index"),
    "reindex": (
        "operations.transfer",
        "reindex_main",
        "re-gist every session with the current GistNet",
    ),
    "export": ("operations.transfer", "export_main", "write a session's messages as JSONL"),
    "import": ("operations.transfer", "import_main", "load a JSONL session, rebuilding its tree"),
    "bench memory": (
        "eval.memory_bench",
        "bench_memory_main",
        "recall of confusable facts as history grows: MegaContext vs RAG and baselines",
    ),
    "bench latency": (
        "eval.latency",
        "bench_latency_main",
        "append, gisting and turn latency, memory and disk as history grows, vs the bare model",
    ),
    "gc": ("routing", "gc_main", "remove unused automatic adapter sessions older than an age"),
    "serve": ("serving.cli", "serve_main", "serve the engine as an OpenAI-compatible API"),
    "bench serve": (
        "eval.serve_bench",
        "bench_serve_main",
        "turns/s and latency at 1-32 concurrent sessions, in-process vs served",
    ),
}


def _engine(args):
    from . import MegaContextEngine

    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    return MegaContextEngine(
        store=args.store, working_budget=args.budget, model=args.model, device=args.device
    )


def _engine_options(p: argparse.ArgumentParser, store_default: str | None) -> None:
    p.add_argument("--store", default=store_default, help="store directory (created if absent)")
    p.add_argument("--budget", type=int, default=1024, help="working-context budget (positions)")
    p.add_argument("--model", default="default", help="base model: 'default' or an HF id/path")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: automatic)")


def cmd_demo(args) -> int:
    """A scripted >= 20k-token conversation; a fact stated early is asked about at the end."""
    from tqdm import tqdm

    from .demo import FACTS, conversation
    from .plots import focus_map

    if args.store is None:
        args.store = tempfile.mkdtemp(prefix="megacontext-demo-")
    engine = _engine(args)
    fact = FACTS[args.fact]
    script = conversation(engine.base, args.tokens, fact, seed=args.seed)
    session = engine.session(f"demo-{int(time.time())}")
    # Three live model turns along the way: at the assistant turns nearest each quarter.
    assistant_at = [i for i, (role, _) in enumerate(script) if role == "assistant"]
    reply_at = {min(assistant_at, key=lambda i: abs(i - len(script) * k // 4)) for k in (1, 2, 3)}
    rows, labels = [], []
    for i, (role, text) in enumerate(tqdm(script, desc="conversation", unit="msg")):
        if i in reply_at:
            session.generate(max_new_tokens=24)
            rows.append(session.level_map())
            labels.append(f"turn {len(session.telemetry)} ({session.token_count()} tok)")
        else:
            session.append(role, text)
    question = session.append("user", fact.question)
    print(f"\nuser: {fact.question}\nassistant: ", end="", flush=True)
    answer = "".join(
        print(piece, end="", flush=True) or piece
        for piece in session.generate(max_new_tokens=32, stream=True)
    )
    print("\n")
    rows.append(session.level_map()[: question.token_end])
    labels.append(f"question ({question.token_end} tok)")
    msgs = session.messages()
    fact_msg = next(m for m in msgs if m.content == fact.statement)
    ack = msgs[fact_msg.seq + 1]
    png = focus_map(rows, args.png, labels, marks={"fact": (fact_msg.token_start, ack.token_end)})
    _print_telemetry(session.telemetry)
    result = {
        "history_tokens": session.token_count(),
        "working_budget": engine.config.working_budget,
        "fact_tokens_back": question.token_start - fact_msg.token_end,
        "answer": answer,
        "expected": fact.answer,
        "correct": fact.answer.lower() in answer.lower(),
        "fact_levels_at_answer": sorted(
            {int(x) for x in rows[-1][fact_msg.token_start : ack.token_end]}
        ),
        "focus_map": str(png),
        "store": str(args.store),
        "session": session.id,
    }
    print(json.dumps(result, indent=2))
    return 0


def _print_telemetry(turns) -> None:
    head = f"{'turn':>4} {'history':>8} {'used/budget':>12} {'per level':>22} {'moves':>5} "
    head += f"{'prefill':>7} {'reused':>6} " + " ".join(f"{s:>8}" for s in turns[0].latency_ms)
    print(head + "   (latencies in ms)")
    for t in turns:
        levels = " ".join(f"L{k}:{v}" for k, v in t.entries_per_level.items())
        line = f"{t.turn:>4} {t.history_tokens:>8} {t.positions_used:>5}/{t.budget:<6} "
        line += f"{levels:>22} {t.moves:>5} {t.prefill_tokens:>7} {t.reused_positions:>6} "
        print(line + " ".join(f"{v:>8.0f}" for v in t.latency_ms.values()))


def cmd_chat(args) -> int:
    """Interactive chat; the session persists in the store between runs."""
    engine = _engine(args)
    session = engine.session(args.session)
    if args.system and not session.messages():
        session.append("system", args.system)
    print(
        f"session {args.session!r}: {len(session.messages())} messages, "
        f"{session.token_count()} tokens. Empty line or /quit to leave."
    )
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line or line == "/quit":
            break
        session.append("user", line)
        print("assistant> ", end="", flush=True)
        for piece in session.generate(
            max_new_tokens=args.max_new_tokens, stream=True, temperature=args.temperature
        ):
            print(piece, end="", flush=True)
        t = session.telemetry[-1]
        print(
            f"\n   [{t.positions_used}/{t.budget} positions, {t.history_tokens} tokens of "
            f"history, {t.moves} moves]"
        )
    return 0


def gist_spread(tree, level: int, base) -> dict:
    """How alike a session's gists of one level are (level 0: its tokens' embeddings, for
    comparison): their mean norm and mean cosine to their mean. Near-identical gists
    (cosine near 1) tell the reader little apart, and a run of them in the working context
    may lead a small reader to repeat itself."""
    if level == 0:
        v = base.embed(tree.tokens()).float().cpu().numpy()
    else:
        v = tree.gist_vectors(level, list(range(tree.count(level))))
    mean = v.mean(0)
    cos = v @ mean / (np.linalg.norm(v, axis=1) * np.linalg.norm(mean) + 1e-12)
    return {
        "count": len(v),
        "norm": round(float(np.linalg.norm(v, axis=1).mean()), 3),
        "cos_to_mean": round(float(cos.mean()), 3),
    }


def cmd_inspect(args) -> int:
    """Text and PNG of a session's working context by level over its history."""
    from .plots import focus_map

    engine = _engine(args)
    if args.session not in engine.sessions():
        print(f"no session {args.session!r} in {args.store}", file=sys.stderr)
        return 2
    session = engine.session(args.session)
    session.refocus()
    wc = session.working_context()
    info = {
        "session": args.session,
        "messages": len(session.messages()),
        "history_tokens": session.token_count(),
        "tree_nodes": {f"L{k}": v for k, v in sorted(session.tree.counts.items())},
        "gist_version": session.store.gist_version,
        "positions_used": len(wc),
        "budget": engine.config.working_budget,
        "positions_per_level": {f"L{k}": v for k, v in wc.per_level().items()},
        "gist_spread": {
            f"L{level}": gist_spread(session.tree, level, engine.base)
            for level in range(session.tree.top_level + 1)
        },
    }
    print(json.dumps(info, indent=2))
    png = focus_map(
        [session.level_map()],
        args.png,
        [args.session],
        title=f"session {args.session}: working context for the newest message",
    )
    print(f"focus map: {png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megacontext",
        description="Unbounded memory for a small frozen LLM: a gist tree on disk and a "
        "fixed-size working context.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run a scripted >= 20k-token conversation with recall")
    _engine_options(p, None)
    p.add_argument("--tokens", type=int, default=20000, help="conversation length in tokens")
    p.add_argument("--fact", type=int, default=0, choices=range(3), help="which planted fact")
    p.add_argument("--seed", type=int, default=0, help="which held-out dialogues to use")
    p.add_argument("--png", default="focus_map.png", help="where to write the focus map")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("chat", help="chat interactively with a persistent session")
    _engine_options(p, "megacontext-store")
    p.add_argument("--session", default="default", help="session id")
    p.add_argument("--system", default="You are a helpful assistant.", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=128, help="reply length limit")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("inspect", help="show a session's working context (text + PNG)")
    p.add_argument("session", help="session id")
    _engine_options(p, "megacontext-store")
    p.add_argument("--png", default="working_context.png", help="where to write the PNG")
    p.set_defaults(func=cmd_inspect)

    for name, (_, _, text) in DELEGATED.items():
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER, help=f"see: megacontext {name} --help")
        p.set_defaults(func=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    words = 2 if " ".join(argv[:2]) in DELEGATED else 1  # two-word commands: "bench memory"
    if argv and " ".join(argv[:words]) in DELEGATED:
        module, func, _ = DELEGATED[" ".join(argv[:words])]
        mod = importlib.import_module(f"megacontext_memory.{module}")
        return int(getattr(mod, func)(argv[words:]) or 0)
    args = build_parser().parse_args(argv)
    if args.store is not None:
        args.store = str(Path(args.store))
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
