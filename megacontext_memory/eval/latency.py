"""`megacontext bench latency`: what writing and answering cost as the history grows.

Each history size gets its own session. First, size by size, with that session alone open:

  build    `Session.extend` of chat messages from nothing to the size, the durable ingest
           alone, then `make_gists()` on its own: ingest and gisting tokens/s, build time
  append   single `Session.append` calls of 20-60-token chat messages, no turn between
           them (the durable commit a client waits for; gists are deferred): p50/p95 ms
  memory   RSS after one turn (heap vs mapped files), and the bytes the store grew by

Then the timed turns, round-robin over the sizes after a warm-up turn each (so that a slow
minute of the machine slows every size alike, not the one measured in it):

  turns    a user question appended + a reply of `--reply` tokens: the telemetry split
           (ingest, gist, score, allocate, prefill, decode), the turn's wall time,
           positions used and prefilled
  bare     the bare model on the very window the turn read (gists and raw tokens as
           inputs_embeds, from an empty KV cache, the same number of greedy tokens):
           `engine_over_bare` = median turn / median bare prefill+decode; and whether
           its greedy reply begins with the engine's (`reply_agreement`: how often a
           turn's reused KV cache changed no word of the reply). Its own max/min ratio over
           the sizes shows how much the machine drifted (`bare_ratio_max_over_min`).

Last, `--together` sessions (8) are built at once, one thread each, `--together-tokens`
(10,000) apiece: the durable ingest of all, then the gists of all, through the engine's one
gisting batcher (`together` in the JSON: tokens/s of all the sessions together).

The working context is capped at the budget, so a turn should cost the same at 1k and 1M
tokens; only the build grows with the history.

    megacontext bench latency --quick
    megacontext bench latency --sizes 1000 10000 100000 1000000 --out runs/latency --json
    megacontext bench latency --quick --engine-option gist_refine_steps=0
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import resource
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

SIZES = [1000, 10000, 100000, 1000000]
QUICK_SIZES = [1000, 10000]
TURNS, QUICK_TURNS = 5, 2
APPENDS, QUICK_APPENDS = 40, 20
REPLY = 16
STAGES = ("ingest", "gist", "score", "allocate", "prefill", "decode")
QUESTIONS = [
    "What did we say about that earlier?",
    "Can you remind me what I told you about my plans?",
    "Tell me one more thing about that, please.",
    "So what do you think I should do next?",
    "Which of those did you like best, and why?",
    "Could you sum up what we talked about so far?",
]


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


def _settle() -> None:
    """Collect garbage and hand freed heap pages back, so that a memory reading shows what
    is held, not what a build freed and the allocator has not returned yet."""
    from ..gisting import release_freed_memory

    gc.collect()
    release_freed_memory()


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return str(device)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _chat(seed: int, cap: int) -> Iterator[tuple[str, str]]:
    """Held-out chitchat messages forever (roles alternating), each at most `cap` chars."""
    from ..demo import dialogue_turns

    for k in itertools.count(seed):
        for role, text in dialogue_turns(seed=k):
            yield role, text[:cap]


def _typical(base, n: int, cap: int) -> list[tuple[str, str]]:
    """`n` chat messages of 20-60 tokens, roles alternating."""
    out = []
    for _, text in _chat(1000, cap):
        if 20 <= len(base.encode(text)) <= 60:
            out.append(("user" if len(out) % 2 == 0 else "assistant", text))
            if len(out) == n:
                return out
    raise AssertionError("unreachable: the chat source is endless")


def _batch(source: Iterator[tuple[str, str]], tokens: int) -> list[tuple[str, str]]:
    """Messages from `source` that make about `tokens` tokens."""
    batch, est = [], 0
    while est < tokens:  # ~4 chars a token, plus the chat template's few per message
        role, text = next(source)
        batch.append((role, text))
        est += len(text) // 4 + 6
    return batch


def _grow(s, size: int, source: Iterator[tuple[str, str]], progress: bool) -> float:
    """Extend `s` to at least `size` tokens; returns the seconds spent in `extend`."""
    spent = 0.0
    while s.token_count() < size:
        batch = _batch(source, size - s.token_count())
        t0 = time.perf_counter()
        s.extend(batch, progress=progress)
        spent += time.perf_counter() - t0
    return spent


def _bare(engine, wc, tree, n_new: int) -> dict:
    """The bare model reading the window `wc` (+ the generation prompt), as the engine
    does but from an empty KV cache: prefill, then `n_new` greedy tokens (EOS ignored)."""
    import torch

    base = engine.base
    prompt = base.encode(base.generation_prompt())
    embeds = torch.cat([wc.embeddings(tree, base), base.embed(prompt)])[None]
    n = embeds.shape[1]
    with torch.no_grad():
        _sync(base.device)
        t0 = time.perf_counter()
        logits, cache = base.forward(embeds, torch.arange(n, device=base.device)[None])
        _sync(base.device)
        t1 = time.perf_counter()
        tokens = []
        for i in range(n_new):
            tok = int(logits[0, -1].float().argmax())
            tokens.append(tok)
            pos = torch.tensor([[n + i]], device=base.device)
            logits, cache = base.forward(base.embed([[tok]]), pos, cache)
        _sync(base.device)
        t2 = time.perf_counter()
    prefill, decode = (t1 - t0) * 1000, (t2 - t1) * 1000
    return {
        "positions": n,
        "prefill": round(prefill, 2),
        "decode": round(decode, 2),
        "total": round(prefill + decode, 2),
        "text": base.decode(tokens),
    }


def _build_size(engine, sid, size, typical, reply, progress, log) -> dict:
    """Phase one at one size: session `sid` built from nothing to `size` tokens, then the
    appends, one turn (the window and KV cache a session holds), memory and disk."""
    s, store = engine.session(sid), Path(engine.store.path)
    disk_before = _disk_bytes(store)
    cap = 2 * engine.config.working_budget  # chars: keeps every message under the budget
    log(f"{sid}: extend to {size} tokens")
    ingest_s = _grow(s, size, _chat(1, cap), progress)
    built = s.token_count()
    log(f"{sid}: make_gists")
    t0 = time.perf_counter()
    gists = s.make_gists(progress=progress)
    gist_s = time.perf_counter() - t0
    gisted = s.tree.count(1) * engine.config.block_size
    build = {
        "tokens": built,
        "ingest_s": round(ingest_s, 3),
        "ingest_tokens_per_s": round(built / max(ingest_s, 1e-9)),
        "gists_made": gists,
        "gisted_tokens": gisted,
        "gist_s": round(gist_s, 3),
        "gist_tokens_per_s": round(gisted / max(gist_s, 1e-9)),
        "build_s": round(ingest_s + gist_s, 3),
    }

    # Appends: single chat messages committed one at a time, no turn between them.
    log(f"{sid}: {len(typical)} appends")
    append_ms = []
    for role, text in typical:
        t0 = time.perf_counter()
        s.append(role, text)
        append_ms.append((time.perf_counter() - t0) * 1000)
    append = {
        "n": len(append_ms),
        "p50_ms": round(_percentile(append_ms, 50), 2),
        "p95_ms": round(_percentile(append_ms, 95), 2),
        "max_ms": round(max(append_ms), 2),
        "mean_tokens": round(statistics.mean(len(engine.base.encode(t)) for _, t in typical), 1),
    }
    s.append("user", "Thanks. Let us go on.")
    s.generate(max_new_tokens=reply)
    _settle()
    return {
        "size": size,
        "build": build,
        "append": append,
        "memory_mb": _memory_mb(),  # this session alone open, after a turn
        "disk_bytes": _disk_bytes(store) - disk_before,
    }


def _timed_turn(engine, s, question: str, reply: int) -> dict:
    """A user question appended + a reply of `reply` tokens, then the bare model on the
    very window the turn read."""
    base = engine.base
    t0 = time.perf_counter()
    s.append("user", question)
    text = s.generate(max_new_tokens=reply)
    total_ms = (time.perf_counter() - t0) * 1000
    tel = s.telemetry[-1]
    # An empty reply is a failure this table should show, not a fast turn.
    n_reply = len(base.encode(text)) if text.strip() else 0
    # `s.wc` right after the turn is the window it prefilled (the reply is in the history,
    # not yet in the window).
    bare = _bare(engine, s.wc, s.tree, n_reply)
    bare_text = bare.pop("text")
    return {
        "history_tokens": tel.history_tokens,
        "total_ms": round(total_ms, 2),
        "latency_ms": {k: round(tel.latency_ms.get(k, 0.0), 2) for k in STAGES},
        "positions_used": tel.positions_used,
        "prefill_tokens": tel.prefill_tokens,
        "reused_positions": tel.reused_positions,
        "moves": tel.moves,
        "reply_tokens": n_reply,
        "bare_ms": bare,
        "same_reply_as_bare": bare_text.strip().startswith(text.strip()),
    }


def _together(engine, n: int, tokens: int, log) -> dict:
    """`n` new sessions built at once, one thread each: `extend` to `tokens` tokens in all
    of them, then `make_gists` in all of them (the gists of every session go through the
    engine's one `Gister`, in shared batches). Tokens/s of the sessions together."""
    cap = 2 * engine.config.working_budget
    run_id = uuid.uuid4().hex[:8]
    sessions = [engine.session(f"together-{run_id}-{k}") for k in range(n)]
    log(f"{n} sessions together, {tokens} tokens each")

    def all_at_once(work) -> float:
        errors: list[BaseException] = []

        def guarded(s, k) -> None:
            try:
                work(s, k)
            except BaseException as e:  # raised below, in the caller's thread
                errors.append(e)

        threads = [threading.Thread(target=guarded, args=(s, k)) for k, s in enumerate(sessions)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return time.perf_counter() - t0

    # the messages first, so that only `extend` is timed (making chat text takes longer)
    batches = [_batch(_chat(1 + k, cap), tokens) for k in range(n)]
    ingest_s = all_at_once(lambda s, k: s.extend(batches[k]))
    gist_s = all_at_once(lambda s, k: s.make_gists())
    built = sum(s.token_count() for s in sessions)
    gisted = sum(s.tree.count(1) for s in sessions) * engine.config.block_size
    for s in sessions:
        engine.release(s.id)
    return {
        "sessions": n,
        "tokens": built,
        "ingest_s": round(ingest_s, 3),
        "ingest_tokens_per_s": round(built / max(ingest_s, 1e-9)),
        "gist_s": round(gist_s, 3),
        "gist_tokens_per_s": round(gisted / max(gist_s, 1e-9)),
    }


def _summary(row: dict, turns: list[dict]) -> dict:
    turn_ms = statistics.median(t["total_ms"] for t in turns)
    bare_ms = statistics.median(t["bare_ms"]["total"] for t in turns)
    return {
        **row,
        "history_tokens": turns[-1]["history_tokens"],
        "turns": turns,
        "turn_ms_median": round(turn_ms, 2),
        "stage_ms_median": {
            k: round(statistics.median(t["latency_ms"][k] for t in turns), 2) for k in STAGES
        },
        "bare_ms_median": round(bare_ms, 2),
        "engine_over_bare": round(turn_ms / max(bare_ms, 1e-9), 3),
    }


def _ratio(values: list[float]) -> float:
    return round(max(values) / max(min(values), 1e-9), 3)


def headline(rows: list[dict]) -> dict:
    """The top-level numbers: the worst size's appends, the build rates of the largest
    builds (sizes >= 10k: a 1k build is mostly fixed costs), how flat turns and heap stay."""
    big = [r for r in rows if r["size"] >= 10000] or rows
    heap = "anon" if all("anon" in r["memory_mb"] for r in rows) else "peak"
    return {
        "append_p50_ms": max(r["append"]["p50_ms"] for r in rows),
        "append_p95_ms": max(r["append"]["p95_ms"] for r in rows),
        "ingest_tokens_per_s": min(r["build"]["ingest_tokens_per_s"] for r in big),
        "gist_tokens_per_s": min(r["build"]["gist_tokens_per_s"] for r in big),
        "latency_ratio_max_over_min": _ratio([r["turn_ms_median"] for r in rows]),
        # the same for the bare model on each turn's window: the machine's drift, ~1.0
        "bare_ratio_max_over_min": _ratio([r["bare_ms_median"] for r in rows]),
        "rss_ratio_max_over_min": _ratio([r["memory_mb"][heap] for r in rows]),
        "engine_over_bare": max(r["engine_over_bare"] for r in rows),
        "reply_agreement": round(
            statistics.mean(t["same_reply_as_bare"] for r in rows for t in r["turns"]), 3
        ),
    }


def run(
    sizes: list[int],
    *,
    budget: int = 1024,
    turns: int = TURNS,
    reply: int = REPLY,
    appends: int = APPENDS,
    overrides: dict | None = None,
    device: str | None = None,
    together: int = 8,
    together_tokens: int = 10000,
    engine=None,
    progress: bool = False,
    command: list[str] | None = None,
) -> dict:
    """Run the bench on new sessions, one per size. With `engine`, its
    store and config are used (`budget`, `overrides` and `device` are then ignored);
    otherwise an engine is made on a temporary store that is removed afterwards."""
    if turns < 1 or appends < 1 or reply < 1 or not sizes:
        raise ValueError("need at least one size, turn, append and reply token")
    if together < 0 or together_tokens < 1:
        raise ValueError("together must be >= 0 sessions and together_tokens >= 1")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="mc-latency-", ignore_cleanup_errors=True) as tmp:
        if engine is None:
            from .. import MegaContextEngine

            log("loading the engine ...")
            engine = MegaContextEngine(
                store=tmp, working_budget=budget, device=device, **(overrides or {})
            )
        sizes = sorted(set(sizes))
        typical = _typical(engine.base, appends, 2 * engine.config.working_budget)
        run_id = uuid.uuid4().hex[:8]
        sids = [f"latency-{run_id}-{size}" for size in sizes]
        # Phase one, size by size: build, appends, memory with that session alone open.
        built = []
        for sid, size in zip(sids, sizes, strict=True):
            built.append(_build_size(engine, sid, size, typical, reply, progress, log))
            engine.release(sid)
            _settle()
        # Phase two: the timed turns, round-robin over the sizes, so that a slow minute of
        # the machine slows every size alike instead of the one measured then.
        sessions = [engine.session(sid) for sid in sids]
        log(f"timed turns: a warm-up, then {turns} per size, round-robin")
        for s in sessions:  # reopened: the first turn prefills the window afresh
            s.append("user", "Thanks. Let us go on.")
            s.generate(max_new_tokens=reply)
        timed: list[list[dict]] = [[] for _ in sizes]
        for t in range(turns):
            for s, out in zip(sessions, timed, strict=True):
                out.append(_timed_turn(engine, s, QUESTIONS[t % len(QUESTIONS)], reply))
        rows = [_summary(row, ts) for row, ts in zip(built, timed, strict=True)]
        for sid in sids:
            engine.release(sid)
        _settle()
        return {
            **headline(rows),
            "together": _together(engine, together, together_tokens, log) if together else None,
            "device": _device_name(engine.base.device),
            "model_dtype": engine.base.dtype_name,
            "config": engine.config.to_dict(),
            "sizes": rows,
            "command": command or ["megacontext", "bench", "latency"],
        }


def table(result: dict) -> str:
    head = (
        f"{'size':>8} {'history':>9} {'build s':>8} {'ingest/s':>9} {'gist/s':>7} {'app p50':>7} "
        f"{'p95':>6} | {'ingest':>6} {'gist':>6} {'score':>6} {'alloc':>6} {'prefill':>7} "
        f"{'decode':>7} {'turn':>7} {'bare':>7} {'x bare':>6} | {'used':>5} {'prefl':>5} "
        f"{'reply':>5} {'rss':>6} {'anon':>6} {'disk MB':>8}"
    )
    lines = [head, "(ms unless marked; medians over the timed turns; MB)"]
    nan = float("nan")
    for r in result["sizes"]:
        b, a, st, mem = r["build"], r["append"], r["stage_ms_median"], r["memory_mb"]
        med = {
            k: statistics.median(t[k] for t in r["turns"])
            for k in ("positions_used", "prefill_tokens", "reply_tokens")
        }
        lines.append(
            f"{r['size']:>8} {r['history_tokens']:>9} {b['build_s']:>8.1f} {b['ingest_tokens_per_s']:>9} "
            f"{b['gist_tokens_per_s']:>7} {a['p50_ms']:>7.1f} {a['p95_ms']:>6.1f} | "
            f"{st['ingest']:>6.0f} {st['gist']:>6.0f} {st['score']:>6.0f} "
            f"{st['allocate']:>6.0f} {st['prefill']:>7.0f} {st['decode']:>7.0f} "
            f"{r['turn_ms_median']:>7.0f} {r['bare_ms_median']:>7.0f} "
            f"{r['engine_over_bare']:>6.2f} | {med['positions_used']:>5.0f} "
            f"{med['prefill_tokens']:>5.0f} {med['reply_tokens']:>5.0f} "
            f"{mem.get('rss', nan):>6.0f} {mem.get('anon', nan):>6.0f} "
            f"{r['disk_bytes'] / 1e6:>8.1f}"
        )
    lines.append("")
    keys = [
        "append_p50_ms",
        "append_p95_ms",
        "ingest_tokens_per_s",
        "gist_tokens_per_s",
        "latency_ratio_max_over_min",
        "bare_ratio_max_over_min",
        "rss_ratio_max_over_min",
        "engine_over_bare",
        "reply_agreement",
        "device",
    ]
    lines += [f"{k:>27}: {result[k]}" for k in keys]
    if result.get("together"):
        t = result["together"]
        lines.append(
            f"{'together':>27}: {t['sessions']} sessions, {t['tokens']} tokens: ingest "
            f"{t['ingest_tokens_per_s']} tokens/s, gisting {t['gist_tokens_per_s']} tokens/s"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    """Median turn ms stacked by stage at each history size, the bare model beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["sizes"]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    bottom = [0.0] * len(rows)
    for stage in STAGES:
        ys = [r["stage_ms_median"][stage] for r in rows]
        ax.bar([x - 0.2 for x in xs], ys, 0.4, bottom=bottom, label=stage)
        bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    ax.bar(
        [x + 0.2 for x in xs],
        [r["bare_ms_median"] for r in rows],
        0.4,
        color="grey",
        label="bare model, same window",
    )
    ax.set_xticks(list(xs), [f"{r['history_tokens']:,}" for r in rows])
    ax.set_xlabel("history (tokens)")
    ax.set_ylabel("ms per turn (median)")
    ax.set_title(
        f"turn latency by stage, budget {result['config']['working_budget']}, {result['device']}"
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def bench_latency_main(argv: list[str] | None = None) -> int:
    from ..serving.cli import add_engine_option, engine_overrides

    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="megacontext bench latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"sizes {QUICK_SIZES}, {QUICK_TURNS} turns, {QUICK_APPENDS} appends",
    )
    p.add_argument("--sizes", type=int, nargs="+", help=f"history lengths (default {SIZES})")
    p.add_argument("--budget", type=int, default=1024, help="working budget")
    p.add_argument("--turns", type=int, help=f"timed turns per size (default {TURNS})")
    p.add_argument("--reply", type=int, default=REPLY, help="reply length in tokens")
    p.add_argument("--appends", type=int, help=f"timed appends per size (default {APPENDS})")
    p.add_argument("--together", type=int, default=8, help="sessions built at once (0: none)")
    p.add_argument(
        "--together-tokens", type=int, default=10000, help="tokens of each of those sessions"
    )
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: automatic)")
    add_engine_option(p)
    p.add_argument("--out", help="folder for latency.json and latency.png")
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    args = p.parse_args(argv)
    result = run(
        args.sizes or (QUICK_SIZES if args.quick else SIZES),
        budget=args.budget,
        turns=args.turns or (QUICK_TURNS if args.quick else TURNS),
        reply=args.reply,
        appends=args.appends or (QUICK_APPENDS if args.quick else APPENDS),
        together=args.together,
        together_tokens=args.together_tokens,
        overrides=engine_overrides(args.engine_option),
        device=args.device,
        progress=True,
        command=["megacontext", "bench", "latency", *argv],
    )
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "latency.json").write_text(json.dumps(result, indent=2))
        plot(result, out / "latency.png")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(table(result))
    return 0
