"""Store benchmark: crash safety, concurrency, append latency vs history, bytes per token.

    python -m megacontext_memory.eval.store_bench              # everything, 100 kills
    python -m megacontext_memory.eval.store_bench --only latency --sizes 1000,100000

Latency: a session's history is first written synthetically (token and gist payloads plus
message rows, at the real model's width and dtype), then `--appends` real messages are
appended and timed at three layers: `store` (SessionStore.append: payload write + fsync +
SQLite commit, gists precomputed), `tree` (MegaContextTree.append: + gisting the blocks the
message completes) and `engine` (Session.append: + tokenising and working-context upkeep).
Prints a table, then one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..operations.crashtest import concurrent_writers, crash_loop
from ..store import SessionStore, Store

K = 32
SAMPLE = (
    "Could you remind me what we decided about the quarterly budget, and whether the "
    "locker code changed after Tuesday's meeting? I think it was 4417 but I'm not sure."
)


def _level_counts(n_tokens: int) -> dict[int, int]:
    counts, level, n = {0: n_tokens}, 1, n_tokens // K
    while n:
        counts[level] = n
        level, n = level + 1, n // K
    return counts


def synthetic_history(ss: SessionStore, n_tokens: int, msg_tokens: int = 100, seed: int = 0):
    """Write `n_tokens` of history (messages of `msg_tokens`) straight into payloads + index.

    Gists are random vectors: their values do not matter for timing or size.
    """
    rng = np.random.default_rng(seed)
    with ss.lock():
        counts = ss.prepare()
        assert not counts, "synthetic history needs an empty session"
        chunk = 1 << 16
        done = 0
        while done < n_tokens:
            end = min(n_tokens, done + chunk)
            before, after = _level_counts(done), _level_counts(end)
            ss.payload(0).write_at(done, rng.integers(0, 49152, (end - done, 1), dtype=np.uint32))
            for level in sorted(after):
                if level and after[level] > before.get(level, 0):
                    f = ss.payload(level)
                    f.open_at(before.get(level, 0))
                    n_new = after[level] - before.get(level, 0)
                    gists = rng.standard_normal((n_new, ss.width), dtype=np.float32) * 0.05
                    f.write_at(before.get(level, 0), gists.astype(f.np_dtype))
            done = end
        rows, t, seq = [], time.time() - 86400, 0
        for start in range(0, n_tokens, msg_tokens):
            end = min(n_tokens, start + msg_tokens)
            role = "user" if seq % 2 == 0 else "assistant"
            rows.append((ss.key, seq, role, SAMPLE, "{}", t + seq, start, end))
            seq += 1
        with ss.store._write() as conn:
            conn.executemany("INSERT INTO messages VALUES (?,?,?,?,?,?,?,?)", rows)
            for level, count in _level_counts(n_tokens).items():
                conn.execute("INSERT INTO levels VALUES (?,?,?)", [ss.key, level, count])
            conn.execute(
                "UPDATE sessions SET n_tokens = ?, n_messages = ? WHERE key = ?",
                [n_tokens, seq, ss.key],
            )


def _pct(xs: list[float]) -> dict:
    a = np.asarray(xs) * 1000
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p95_ms": round(float(np.percentile(a, 95)), 3),
    }


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def latency(
    root: Path, sizes: list[int], appends: int, layers: list[str], model: str, engine_max: int
) -> list[dict]:
    """Append latency percentiles per history size and layer; bytes per history token."""
    from ..engine import MegaContextEngine
    from ..tree import MegaContextTree

    engine = MegaContextEngine(store=root / "warmup", model=model, gist_checkpoint=None)
    base, gister = engine.base, engine.gister
    ids = base.encode(base.render_message("user", SAMPLE))
    out = []
    for size in sizes:
        path = root / f"hist-{size}"
        store = Store(path)
        ss = store.session(
            "bench",
            model=base.name,
            width=base.width,
            block_size=K,
            gist_dtype=engine.config.gist_dtype,
            gist_version=gister.version,
        )
        t0 = time.perf_counter()
        synthetic_history(ss, size)
        build_s = time.perf_counter() - t0
        rec = {
            "history_tokens": size,
            "build_s": round(build_s, 2),
            "disk_bytes_per_token": round(_disk_bytes(path) / size, 2),
            "payload_bytes_per_token": round(_disk_bytes(ss.dir) / size, 2),
        }
        if "store" in layers:
            rng = np.random.default_rng(1)
            times = []
            for _ in range(appends):
                with ss.lock():
                    counts = ss.prepare()
                    n0 = counts.get(0, 0)
                    after = _level_counts(n0 + len(ids))
                    gists = {
                        lv: rng.standard_normal((c - counts.get(lv, 0), ss.width)).astype(
                            np.float16
                        )
                        for lv, c in after.items()
                        if lv and c > counts.get(lv, 0)
                    }
                    t = time.perf_counter()
                    ss.append("user", SAMPLE, {"bench": True}, np.asarray(ids), gists)
                    times.append(time.perf_counter() - t)
            rec["store"] = _pct(times)
        if "tree" in layers:
            tree = MegaContextTree(ss, gister)
            times = []
            for _ in range(appends):
                t = time.perf_counter()
                tree.append("user", SAMPLE, {"bench": True}, ids)
                times.append(time.perf_counter() - t)
            rec["tree"] = _pct(times)
        if "engine" in layers and size <= engine_max:
            eng = MegaContextEngine(store=path, model=model, gist_checkpoint=None)
            t = time.perf_counter()
            sess = eng.session("bench")
            rec["engine_open_s"] = round(time.perf_counter() - t, 3)
            times = []
            for _ in range(appends):
                t = time.perf_counter()
                sess.append("user", SAMPLE)
                times.append(time.perf_counter() - t)
            rec["engine"] = _pct(times)
        rec["message_tokens"] = len(ids)
        out.append(rec)
        shutil.rmtree(path, ignore_errors=True)
        print(f"  history {size}: {rec}", file=sys.stderr, flush=True)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="store_bench", description=__doc__.split("\n")[0])
    p.add_argument(
        "--only",
        choices=["crash", "concurrency", "latency"],
        action="append",
        help="run only these parts (repeat; default: all three)",
    )
    p.add_argument("--kills", type=int, default=100, help="SIGKILLs of the crash harness")
    p.add_argument("--processes", type=int, default=8, help="concurrent writer processes")
    p.add_argument("--sessions", type=int, default=50, help="sessions every process writes")
    p.add_argument("--messages", type=int, default=2, help="messages per process and session")
    p.add_argument(
        "--sizes", default="1000,100000,1000000", help="history sizes in tokens, comma-separated"
    )
    p.add_argument("--appends", type=int, default=100, help="timed appends per size and layer")
    p.add_argument(
        "--layers", default="store,tree,engine", help="layers to time: store, tree, engine"
    )
    p.add_argument(
        "--engine-max",
        type=int,
        default=100_000,
        help="time the engine layer only up to this history size (opening a session "
        "fits its whole history into the working context first)",
    )
    p.add_argument("--model", default="default", help="base model for the latency part")
    p.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the JSON result to this file")
    p.add_argument("--seed", type=int, default=0, help="seed of the crash harness")
    p.add_argument(
        "--regist-every",
        type=int,
        default=0,
        help="crash harness: flip the GistNet version every N messages, so kills also land "
        "inside whole-session re-gists (0 = never)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    parts = args.only or ["crash", "concurrency", "latency"]
    root = Path(args.dir or tempfile.mkdtemp(prefix="store-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": {"cpus": os.cpu_count()}}
    if "crash" in parts:
        r = crash_loop(root / "crash", args.kills, seed=args.seed, regist_every=args.regist_every)
        result["crash"] = {
            "kills": r.kills,
            "regist_every": args.regist_every,
            "acknowledged": r.acked,
            "messages": r.messages,
            "tokens": r.tokens,
            "verified_after_each_kill": True,
            "gist_max_abs_diff_vs_rebuild": r.gist_max_diff,
            "seconds": round(r.seconds, 1),
        }
        print(f"crash: {result['crash']}", file=sys.stderr, flush=True)
    if "concurrency" in parts:
        result["concurrency"] = concurrent_writers(
            root / "conc", args.processes, args.sessions, args.messages, seed=args.seed
        )
        result["concurrency"]["seconds"] = round(result["concurrency"]["seconds"], 1)
        print(f"concurrency: {result['concurrency']}", file=sys.stderr, flush=True)
    if "latency" in parts:
        random.seed(args.seed)
        sizes = [int(s) for s in args.sizes.split(",")]
        layers = [s.strip() for s in args.layers.split(",")]
        result["latency"] = latency(root, sizes, args.appends, layers, args.model, args.engine_max)
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    print(table(result))
    text = json.dumps(result, indent=None)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    bad = result.get("concurrency", {})
    return 1 if bad and (bad["errors"] or bad["lost"] or bad["misplaced"]) else 0


def table(result: dict) -> str:
    lines = []
    if "crash" in result:
        c = result["crash"]
        lines.append(
            f"crash: {c['kills']} SIGKILLs, {c['acknowledged']} acknowledged / {c['messages']} "
            f"stored messages, {c['tokens']} tokens, all verified; gist max |diff| vs rebuild "
            f"{c['gist_max_abs_diff_vs_rebuild']:.2g}; {c['seconds']} s"
        )
    if "concurrency" in result:
        c = result["concurrency"]
        lines.append(
            f"concurrency: {c['processes']} processes x {c['sessions']} sessions, "
            f"{c['messages']} messages: {c['errors']} errors, {c['lost']} lost, "
            f"{c['misplaced']} misplaced; {c['seconds']} s"
        )
    if "latency" in result:
        rows = result["latency"]
        layers = [x for x in ("store", "tree", "engine") if any(x in r for r in rows)]
        head = f"{'history':>10} | " + " | ".join(f"{x + ' p50/p95 ms':>22}" for x in layers)
        lines += [head + f" | {'disk B/token':>12} | {'payload B/token':>15}", "-" * len(head)]
        for r in rows:
            cells = " | ".join(
                f"{r[x]['p50_ms']:>10.2f} /{r[x]['p95_ms']:>10.2f}" if x in r else f"{'-':>22}"
                for x in layers
            )
            lines.append(
                f"{r['history_tokens']:>10} | {cells} | {r['disk_bytes_per_token']:>12} | "
                f"{r['payload_bytes_per_token']:>15}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
