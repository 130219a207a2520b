"""`megacontext bench serve`: turns/s and latency with many sessions at once, in-process vs served.

Each of N concurrent clients owns one session and runs `--turns` chat turns (a short user
message, a reply of at most `--max-tokens`). In-process, the clients are threads calling one
engine through `chat.run_turn`, as the adapters do; served, they are threads sending
`POST /v1/chat/completions` to a `megacontext serve` subprocess on localhost. Latency is per
turn, from the request to the whole reply.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from ..engine import MegaContextEngine
from ..routing import Item, get_router
from ..serving.process import ServerProcess
from .memory_bench import git_commit

LINES = [
    "Hello! How are you today?",
    "I spent the morning in the garden.",
    "The tomatoes are finally turning red.",
    "What should I cook for dinner?",
    "Thanks, that sounds good.",
]


def _clients(n: int, turns: int, one_turn) -> tuple[list[float], float]:
    """Run `n` threads x `turns` calls of `one_turn(client, turn)`; (latencies s, wall s)."""
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        for t in range(turns):
            t0 = time.perf_counter()
            try:
                one_turn(k, t)
            except BaseException as e:  # reported after the run
                errors.append(e)
                return
            with lock:
                latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed; first: {errors[0]!r}")
    return latencies, time.perf_counter() - t0


def _row(latencies: list[float], wall: float) -> dict:
    ms = np.asarray(latencies) * 1000
    return {
        "turns": len(latencies),
        "turns_per_s": round(len(latencies) / wall, 3),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "wall_s": round(wall, 1),
    }


def bench_in_process(engine: MegaContextEngine, n: int, turns: int, max_tokens: int) -> dict:
    from ..chat import run_turn

    router = get_router(engine, "bench", "bench-")
    prefix = f"inproc-{n}-{time.time_ns()}"

    def one_turn(k: int, t: int) -> None:
        item = Item("user", LINES[t % len(LINES)])
        for _ in run_turn(router, [item], session_id=f"{prefix}-{k}", max_new_tokens=max_tokens):
            pass

    return _row(*_clients(n, turns, one_turn))


def _chat(url: str, session_id: str, text: str, max_tokens: int) -> None:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-Session-Id": session_id},
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        json.loads(r.read())


def bench_served(url: str, n: int, turns: int, max_tokens: int) -> dict:
    prefix = f"served-{n}-{time.time_ns()}"

    def one_turn(k: int, t: int) -> None:
        _chat(url, f"{prefix}-{k}", LINES[t % len(LINES)], max_tokens)

    return _row(*_clients(n, turns, one_turn))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megacontext bench serve", description=__doc__)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--turns", type=int, default=3, help="turns per client")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="1 and 8 clients, 2 turns each")
    p.add_argument("--json", action="store_true", help="print only the JSON")
    p.add_argument(
        "--engine-option", action="append", default=[], metavar="FIELD=VALUE",
        help="Config field for both engines (repeatable), e.g. gist_refine_steps=0",
    )  # fmt: skip
    return p


def bench_serve_main(argv: list[str] | None = None) -> int:
    from ..serving.cli import engine_overrides

    args = parser().parse_args(argv)
    if args.quick:
        args.clients, args.turns = [1, 8], 2
    overrides = engine_overrides(args.engine_option)
    rows: dict[str, dict] = {"in_process": {}, "served": {}}
    with tempfile.TemporaryDirectory(prefix="megacontext-bench-serve-") as tmp:
        engine = MegaContextEngine(
            store=Path(tmp) / "inproc",
            working_budget=args.budget,
            device=args.device,
            **overrides,
        )
        for n in args.clients:
            rows["in_process"][str(n)] = bench_in_process(engine, n, args.turns, args.max_tokens)
        served = ServerProcess(
            Path(tmp) / "served",
            budget=args.budget,
            device=args.device,
            options=args.engine_option,
        )
        with served:
            for n in args.clients:
                rows["served"][str(n)] = bench_served(served.url, n, args.turns, args.max_tokens)
    result = {
        **rows,
        "device": str(engine.base.device),
        "turns_per_client": args.turns,
        "max_tokens": args.max_tokens,
        "working_budget": args.budget,
        "engine_options": overrides,
        "commit": git_commit(),
    }
    if not args.json:
        print(f"{'mode':>10} {'clients':>7} {'turns/s':>8} {'p50 ms':>8} {'p95 ms':>8}")
        for mode in ("in_process", "served"):
            for n, r in rows[mode].items():
                print(
                    f"{mode:>10} {n:>7} {r['turns_per_s']:>8.2f} {r['p50_ms']:>8.0f} "
                    f"{r['p95_ms']:>8.0f}"
                )
    print(json.dumps(result, indent=None if args.json else 2))
    return 0
