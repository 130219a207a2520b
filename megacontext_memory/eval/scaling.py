"""Per-turn cost as the history grows: latency split, prefill size and memory.

A turn = one user message appended + a reply of `--reply` tokens. The working context is
capped at the budget, so everything but the disk-side append should stay flat.

    megacontext bench-scaling --sizes 1000 10000 100000 1000000 --json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from ..demo import dialogue_turns


def _memory_mb() -> dict[str, float]:
    """Resident memory now, split into heap (anon) and mapped files (the store's payload
    files, the model), and the process's peak. The peak alone would show the bulk build of
    the history, not what a turn holds."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:  # not Linux: only the peak is known (ru_maxrss: bytes on macOS, else KiB)
        unit = 1024 * 1024 if sys.platform == "darwin" else 1024
        return {"peak": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit, 1)}

    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def mb(name: str) -> float:
        return round(int(fields[name].split()[0]) / 1024, 1)

    return {"rss": mb("VmRSS"), "anon": mb("RssAnon"), "file": mb("RssFile"), "peak": mb("VmHWM")}


def run(sizes: list[int], budget: int, turns: int, reply: int) -> dict:
    from .. import MegaContextEngine

    engine = MegaContextEngine(store=tempfile.mkdtemp(prefix="mc-scale-"), working_budget=budget)
    s = engine.session("scaling")
    lines = itertools.cycle(text for _, text in dialogue_turns(seed=1))
    rows = []
    for size in sorted(sizes):
        bar = tqdm(total=size, initial=s.token_count(), desc=f"history -> {size}", unit="tok")
        built, t_build = s.token_count(), time.perf_counter()
        while s.token_count() < size:
            chunk = " ".join(next(lines) for _ in range(12))
            before = s.token_count()
            s.append("assistant" if s.token_count() % 2 else "user", chunk[:2000])
            bar.update(s.token_count() - before)
        bar.close()
        # Ingest throughput of the bulk build (tokenise, gist every level, store durably).
        build_rate = (s.token_count() - built) / max(time.perf_counter() - t_build, 1e-9)
        # A turn's telemetry counts every append since the previous turn: let an untimed
        # turn absorb the bulk build, so the timed turns show the cost of one turn alone.
        s.generate(max_new_tokens=1)
        for t in range(turns):
            t0 = time.perf_counter()
            s.append("user", f"Tell me one more thing about that, please ({t}).")
            append_ms = (time.perf_counter() - t0) * 1000
            text = s.generate(max_new_tokens=reply)
            tel = s.telemetry[-1]
            rows.append(
                {
                    "history_tokens": s.token_count(),
                    "turn": t,
                    "append_ms": round(append_ms, 1),
                    "build_tokens_per_s": round(build_rate),
                    "positions_used": tel.positions_used,
                    "prefill_tokens": tel.prefill_tokens,
                    "moves": tel.moves,
                    "swap_rate": round(tel.swap_rate, 3),
                    "latency_ms": tel.latency_ms,
                    # An empty reply is a failure this table should show, not a fast turn.
                    "reply_tokens": len(engine.base.encode(text)) if text.strip() else 0,
                    "memory_mb": _memory_mb(),
                    "per_level": tel.entries_per_level,
                }
            )
    return {
        "budget": budget,
        "reply_tokens": reply,
        "device": str(engine.base.device),
        "rows": rows,
    }


def bench_scaling_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="megacontext bench-scaling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[1000, 10000, 100000],
        help="history lengths (tokens) at which turns are timed",
    )
    p.add_argument("--budget", type=int, default=1024, help="working budget")
    p.add_argument("--turns", type=int, default=2, help="timed turns per size")
    p.add_argument("--reply", type=int, default=16, help="reply length in tokens")
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    args = p.parse_args(argv)
    result = run(args.sizes, args.budget, args.turns, args.reply)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{'history':>9} {'append':>7} {'score':>6} {'alloc':>6} {'prefill':>8} "
        f"{'(tok)':>6} {'decode':>7} {'reply':>5} {'used':>5} {'moves':>6} {'swap':>5} {'rss':>6} {'anon':>6} {'peak':>6}"
        "   (ms; MB)  build (tok/s)"
    )
    nan = math.nan
    for r in result["rows"]:
        lat, mem = r["latency_ms"], r["memory_mb"]
        print(
            f"{r['history_tokens']:>9} {r['append_ms']:>7.0f} {lat['score']:>6.0f} "
            f"{lat['allocate']:>6.0f} {lat['prefill']:>8.0f} {r['prefill_tokens']:>6} "
            f"{lat['decode']:>7.0f} {r['reply_tokens']:>5} {r['positions_used']:>5} {r['moves']:>6} "
            f"{r['swap_rate']:>5.2f} {mem.get('rss', nan):>6.0f} {mem.get('anon', nan):>6.0f} "
            f"{mem['peak']:>6.0f}  {r['build_tokens_per_s']:>8}"
        )
    return 0
