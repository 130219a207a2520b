"""Held-out substitutability of gists: `megacontext eval-gist`.

For fixed held-out windows `[prefix][span][horizon]` (L1: a 32-token span, L2: a 1024-token
span) it measures the horizon NLL under the frozen LLM when the span is

    full    kept as raw tokens (the teacher)
    drop    removed
    mean    replaced by the mean of its token embeddings (one vector)
    gist    replaced by its GistNet gist (one vector; L2 = L2 net over 32 L1 gists)
    refined the level-1 gist as the engine shows it: fitted so the model continues
            after it as after its block, in the context of the block before it
            (`refine_gists`). The fit targets the model's own continuation: nothing
            after the span is used. (L2 gists are shown as the L2 net makes them from
            GistNet's L1 gists, the inputs it was trained on: `gist`.)

and, for L2 only, `l1_gists` (the 32 L1 gists the L2 gist is made from, for reference).
With `--free-steps N` it also reports `free`: one unconstrained vector per window, fitted
to the teacher on the very horizon it is scored on. That is an upper bound, not a held-out
result; the distance from the gist to it is what the encoder leaves unused in the format.
Positions are 'compact' (each entry takes one position). The headline is the recovery
ratio (NLL_drop - NLL_gist) / (NLL_drop - NLL_full) of the gists as the engine shows them
(`refined` at L1, or `gist` at L2 and with `--refine-steps 0`), over all windows and per
source, with a 95% bootstrap interval over windows; `recovery_gistnet` is GistNet's output
alone.
`engine_view` scores the gists as the engine shows them, on a test split of held-out
documents that no training probe drew from (`probe_free_streams`): the span follows
`--engine-prefix-blocks` blocks shown as level-1 gists (made as the engine makes them),
not one raw block, so the refinement's own context is not what is scored; full, drop and
gist all see that gisted prefix, with GistNet's gists alone beside the refined ones.
`by_horizon` splits the recovery by distance into the horizon (token 0, 1, 2-3, 4-7, ...),
which shows where a gist falls short: right after the span, where the next token hangs on
its last words, or further on. Everything
is fp32 and seeded: the same checkpoint, seed and settings give the same numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import corpora
from ..config import BLOCK_SIZE, MODEL_DTYPES, Config
from ..models.base import BaseModel
from ..models.checkpoint import SHIPPED, load_gist_stack
from ..training import data
from ..training import gist_objective as obj
from ..training.gist_train import make_gists

METHODS = ("full", "drop", "mean", "gist")


def recovery(full: np.ndarray, drop: np.ndarray, other: np.ndarray) -> float:
    gap = float(drop.mean() - full.mean())
    return float((drop.mean() - other.mean()) / gap) if gap > 0 else float("nan")


def bootstrap_ci(full, drop, other, n: int, seed: int) -> list[float]:
    """95% percentile interval of the recovery ratio, resampling windows."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(full), size=(n, len(full)))
    f, d, o = full[idx].mean(1), drop[idx].mean(1), other[idx].mean(1)
    gap = d - f
    r = np.where(gap > 0, (d - o) / np.where(gap > 0, gap, 1), np.nan)
    if np.isnan(r).all():  # dropping the span never hurt: recovery is undefined
        return [float("nan"), float("nan")]
    lo, hi = np.nanpercentile(r, [2.5, 97.5])
    return [float(lo), float(hi)]


def token_nll(lp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL [B, H] of each horizon token `targets` [B, H] under `lp` [B, H, V]."""
    return -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def engine_gists(base, stack, ids: torch.Tensor, prefix: int, refine: tuple):
    """Level-1 gists [B, 1, d] of the 32-token span after `prefix` as the engine shows
    them: refined in the context of the block before (the prefix's last block)."""
    if prefix < BLOCK_SIZE:
        raise ValueError(f"refined gists need a prefix of at least {BLOCK_SIZE} tokens")
    context, block = ids[:, prefix - BLOCK_SIZE : prefix], ids[:, prefix : prefix + BLOCK_SIZE]
    g = obj.refine_gists(base, stack.from_tokens(base, block), context, block, *refine)
    return g[:, None]


@torch.no_grad()
def window_nlls(
    base,
    stack,
    ids: torch.Tensor,
    level: int,
    prefix: int,
    horizon: int,
    free_steps: int = 0,
    refine: tuple[int, float, int] = (0, 0.0, 0),
) -> dict:
    """Per-token horizon NLL [B, H] for every method, windows `ids` [B, L] with one span."""
    span = 32**level
    tgt = obj.horizon_targets(ids, horizon)
    teacher, cache = obj.teacher_logprobs(base, ids, prefix, horizon)
    _, spans, hor = obj.split_window(ids, prefix, 1, span, horizon)
    out = {"full": token_nll(teacher, tgt)}
    out["drop"] = token_nll(obj.drop_logprobs(base, ids, prefix, horizon), tgt)
    mean = base.embed(spans).mean(-2)  # [B, 1, d]
    out["mean"] = token_nll(obj.student_logprobs(base, cache, prefix, mean, hor), tgt)
    gist = make_gists(base, stack, spans, level)
    out["gist"] = token_nll(obj.student_logprobs(base, cache, prefix, gist, hor), tgt)
    if level == 2:
        l1 = stack.from_tokens(base, spans.reshape(ids.shape[0], -1, 32))  # [B, 32, d]
        out["l1_gists"] = token_nll(obj.student_logprobs(base, cache, prefix, l1, hor), tgt)
    if refine[0] and level == 1:
        refined = engine_gists(base, stack, ids, prefix, refine)
        out["refined"] = token_nll(obj.student_logprobs(base, cache, prefix, refined, hor), tgt)
    if free_steps:
        free = obj.fit_middle(base, cache, prefix, gist, hor, teacher, free_steps, lr=0.01)
        out["free"] = token_nll(obj.student_logprobs(base, cache, prefix, free, hor), tgt)
    return out


def horizon_buckets(horizon: int) -> list[tuple[int, int]]:
    """Token ranges [lo, hi) of the horizon: 0, 1, 2-3, 4-7, ... up to `horizon`."""
    edges = [0, 1]
    while edges[-1] < horizon:
        edges.append(min(2 * edges[-1], horizon))
    return list(zip(edges[:-1], edges[1:], strict=True))


def by_horizon(tokens: dict) -> list[dict]:
    """Recovery of the gist per horizon range, from per-token NLLs [N, H]."""
    out = []
    for lo, hi in horizon_buckets(tokens["full"].shape[1]):
        f, d, g = (tokens[k][:, lo:hi].mean(1) for k in ("full", "drop", "gist"))
        stored = tokens.get("refined", tokens["gist"])[:, lo:hi].mean(1)
        out.append(
            {
                "tokens": [lo, hi - 1],
                "nll_full": float(f.mean()),
                "gap": float(d.mean() - f.mean()),
                "recovery": recovery(f, d, stored),
                "recovery_gistnet": recovery(f, d, g),
            }
        )
    return out


def _summary(tokens: dict, n_boot: int, seed: int) -> dict:
    nlls = {k: v.mean(1) for k, v in tokens.items()}
    full, drop = nlls["full"], nlls["drop"]
    stored = nlls.get("refined", nlls["gist"])  # the gists the engine feeds the model
    res = {
        "recovery": recovery(full, drop, stored),
        "ci95": bootstrap_ci(full, drop, stored, n_boot, seed),
        "recovery_gistnet": recovery(full, drop, nlls["gist"]),
        "ci95_gistnet": bootstrap_ci(full, drop, nlls["gist"], n_boot, seed),
        "recovery_mean": recovery(full, drop, nlls["mean"]),
        "nll": {k: float(v.mean()) for k, v in nlls.items()},
        "n_windows": len(full),
    }
    if "l1_gists" in nlls:
        res["recovery_l1_gists"] = recovery(full, drop, nlls["l1_gists"])
    if "free" in nlls:
        res["recovery_free"] = recovery(full, drop, nlls["free"])
    return res


def evaluate_level(
    base,
    stack,
    level: int,
    per_source: int,
    prefix: int,
    horizon: int,
    seed: int,
    n_boot: int,
    batch: int,
    progress: bool = False,
    free_steps: int = 0,
    refine: tuple[int, float, int] = (0, 0.0, 0),
) -> dict:
    spec = data.WindowSpec(prefix, 1, horizon, span=32**level)
    windows = data.heldout_windows(base, spec, per_source, seed=seed + 1000 * level)
    per_source, everything = {}, {}
    for src in sorted(windows):
        ids = torch.as_tensor(windows[src], device=base.device)
        parts: dict[str, list] = {}
        for i in range(0, len(ids), batch):
            for k, v in window_nlls(
                base, stack, ids[i : i + batch], level, prefix, horizon, free_steps, refine
            ).items():
                parts.setdefault(k, []).append(v.float().cpu())
            if progress:
                print(f"  L{level} {src}: {min(i + batch, len(ids))}/{len(ids)}", file=sys.stderr)
        nlls = {k: torch.cat(v).numpy().astype(np.float64) for k, v in parts.items()}
        per_source[src] = _summary(nlls, n_boot, seed)
        for k, v in nlls.items():
            everything.setdefault(k, []).append(v)
    tokens = {k: np.concatenate(v) for k, v in everything.items()}
    res = _summary(tokens, n_boot, seed)
    res["by_horizon"] = by_horizon(tokens)
    res["per_source"] = per_source
    res["window"] = {"prefix": prefix, "span": 32**level, "horizon": horizon}
    return res


# ---- the engine's view, on documents no probe saw ----------------------------------------
PROBE_SEED, PROBE_PREFIX, PROBE_HORIZON = 1234, 32, 32  # `HeldoutProbe` in gist_train


def probe_settings(meta: dict) -> set[tuple[int, int]]:
    """(level, windows per source) of every held-out probe run while training a checkpoint,
    from its metadata (every stage of `training`, continued ones included)."""
    found: set[tuple[int, int]] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            cfg = node.get("config")
            if isinstance(cfg, dict) and cfg.get("eval_every") and cfg.get("eval_windows"):
                found.add((int(cfg.get("level", 1)), int(cfg["eval_windows"])))
            for v in node.values():
                walk(v)

    walk(meta.get("training", {}))
    return found


def probe_free_streams(base, probes: set[tuple[int, int]], cache=None) -> dict[str, np.ndarray]:
    """Per source, the held-out documents that none of the `probes` (level, windows) drew a
    window from, concatenated in the held-out stream's order."""
    out = {}
    for src in corpora.SOURCES:
        stream = data.token_stream(base, src, "heldout", cache)
        docs = [t for d, t in corpora.documents(src, base) if corpora.split_of(src, d) == "heldout"]
        docs.sort(key=lambda t: hashlib.sha1(t.encode()).hexdigest())  # as token_stream
        lengths = []
        for i in range(0, len(docs), 256):
            enc = base.tokenizer(docs[i : i + 256], add_special_tokens=False)["input_ids"]
            lengths += [len(e) for e in enc]
        ends = np.cumsum(lengths)
        if not len(ends) or ends[-1] != len(stream):
            raise RuntimeError(f"held-out {src} documents do not make up its token stream")
        starts = ends - np.asarray(lengths)
        touched = np.zeros(len(docs), bool)
        for level, per_source in probes:
            length = PROBE_PREFIX + 32**level + PROBE_HORIZON
            rng = np.random.default_rng([PROBE_SEED, corpora.SOURCES.index(src)])
            room = len(stream) - length
            if room <= per_source:
                continue
            stride = room // per_source
            for a in np.arange(per_source) * stride + rng.integers(0, stride, per_source):
                touched[(starts < a + length) & (ends > a)] = True
        keep = [stream[a:b] for a, b, t in zip(starts, ends, touched, strict=True) if not t]
        out[src] = np.concatenate(keep) if keep else np.zeros(0, np.uint32)
    return out


def spread_windows(stream: np.ndarray, length: int, n: int, seed: int) -> np.ndarray:
    """`n` windows of `length` tokens spread evenly over `stream`, jittered by `seed`."""
    room = len(stream) - length
    if room <= n:
        raise ValueError(f"test stream of {len(stream)} tokens too short for {n} windows")
    stride = room // n
    starts = np.arange(n) * stride + np.random.default_rng(seed).integers(0, stride, n)
    return np.stack([stream[a : a + length].astype(np.int64) for a in starts])


def _horizon_nll(base, before: torch.Tensor, horizon_ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL [B, H] of the horizon after the entries `before` [B, T, d]."""
    x = torch.cat([before, base.embed(horizon_ids[:, :-1])], 1)
    lp = obj.run_model(base, x, 0, None, horizon_ids.shape[1])[0]
    return token_nll(lp, horizon_ids)


@torch.no_grad()
def engine_view_nlls(base, stack, ids, level: int, blocks: int, horizon: int, refine) -> dict:
    """Per-token horizon NLLs [B, H] of windows [B, (blocks + 1) * 32 + span + horizon] with
    the prefix as the engine shows it: `blocks` level-1 gists (the first block only gives
    the first gist its context). For each way of making gists ('gistnet' alone, 'stored'
    as the engine shows them: level-1 gists refined in context, an L2 gist made from
    GistNet's L1 gists) the span is kept raw (full), dropped, or that way's gist."""
    b, k = ids.shape[0], BLOCK_SIZE
    span = k**level
    hor = ids[:, -horizon:]
    chunks = ids[:, : (blocks + 1) * k + span].reshape(b, -1, k)
    made = {
        "gistnet": stack.from_tokens(base, chunks[:, 1:].flatten(0, 1)).reshape(b, -1, base.width)
    }
    if refine[0]:
        shown = blocks + 1 if level == 1 else blocks  # level-1 gists shown: prefix (+ span)
        g = made["gistnet"][:, :shown].flatten(0, 1)
        ctx, blk = chunks[:, :shown].flatten(0, 1), chunks[:, 1 : shown + 1].flatten(0, 1)
        fitted = obj.refine_gists(base, g, ctx, blk, *refine).reshape(b, shown, base.width)
        made["stored"] = torch.cat([fitted, made["gistnet"][:, shown:]], 1)
    raw_span = base.embed(ids[:, (blocks + 1) * k : (blocks + 1) * k + span])
    out = {}
    for name, g in made.items():
        g = g.reshape(b, -1, base.width)
        prefix, l1 = g[:, :blocks], g[:, blocks:]
        gist = l1 if level == 1 else stack(l1.reshape(b, 1, 1, k, base.width), level)[:, 0]
        gist = gist.reshape(b, 1, base.width)
        out[f"{name}_full"] = _horizon_nll(base, torch.cat([prefix, raw_span], 1), hor)
        out[f"{name}_drop"] = _horizon_nll(base, prefix, hor)
        out[f"{name}_gist"] = _horizon_nll(base, torch.cat([prefix, gist], 1), hor)
    return out


def evaluate_engine_view(
    base, stack, level, per_source, blocks, horizon, seed, n_boot, batch, probes, refine
) -> dict:
    """Recovery of gists in a gisted prefix, on the probe-disjoint test split."""
    length = (blocks + 1) * BLOCK_SIZE + BLOCK_SIZE**level + horizon
    parts: dict[str, list] = {}
    per_src = {}
    for i, (src, stream) in enumerate(sorted(probe_free_streams(base, probes).items())):
        ids = spread_windows(stream, length, per_source, seed + 1000 * level + i)
        ids = torch.as_tensor(ids, device=base.device)
        src_parts: dict[str, list] = {}
        for j in range(0, len(ids), batch):
            for key, v in engine_view_nlls(
                base, stack, ids[j : j + batch], level, blocks, horizon, refine
            ).items():
                src_parts.setdefault(key, []).append(v.float().cpu())
        nlls = {key: torch.cat(v).numpy().astype(np.float64) for key, v in src_parts.items()}
        per_src[src] = {"n_windows": len(ids), **_view_summary(nlls, n_boot, seed)}
        for key, v in nlls.items():
            parts.setdefault(key, []).append(v)
    nlls = {key: np.concatenate(v) for key, v in parts.items()}
    res = _view_summary(nlls, n_boot, seed)
    res.update(n_windows=len(next(iter(nlls.values()))), per_source=per_src)
    res["window"] = {"gist_prefix_blocks": blocks, "span": BLOCK_SIZE**level, "horizon": horizon}
    return res


def _view_summary(tokens: dict, n_boot: int, seed: int) -> dict:
    m = {key: v.mean(1) for key, v in tokens.items()}
    res = {"nll": {key: float(v.mean()) for key, v in m.items()}}
    for name in ("stored", "gistnet"):
        if f"{name}_gist" not in m:
            continue
        f, d, g = m[f"{name}_full"], m[f"{name}_drop"], m[f"{name}_gist"]
        key = "recovery" if name == "stored" else "recovery_gistnet"
        res[key] = recovery(f, d, g)
        res[f"ci95{key[8:]}"] = bootstrap_ci(f, d, g, n_boot, seed)
    res.setdefault("recovery", res["recovery_gistnet"])
    res.setdefault("ci95", res["ci95_gistnet"])
    return res


def evaluate(
    base,
    stack,
    checkpoint: str,
    levels=(1, 2),
    l1_windows: int = 80,
    l2_windows: int = 12,
    prefix: int = 32,
    horizon: int = 32,
    seed: int = 0,
    n_boot: int = 1000,
    batch: int = 8,
    progress: bool = False,
    free_steps: int = 0,
    refine: tuple[int, float, int] = (0, 0.0, 0),
    engine_blocks: int = 0,
    probes: set[tuple[int, int]] | None = None,
) -> dict:
    """Today's held-out numbers per level and, with `engine_blocks` > 0, `engine_view`
    beside them: gists after that many gisted blocks, on documents none of `probes` saw."""
    torch.manual_seed(seed)
    stack = stack.to(base.device).eval()
    out: dict = {"checkpoint": checkpoint, "model_dtype": base.dtype_name}
    t0 = time.time()
    for level in levels:
        per = l1_windows if level == 1 else l2_windows
        out[f"L{level}"] = evaluate_level(
            base,
            stack,
            level,
            per,
            prefix,
            horizon,
            seed,
            n_boot,
            batch if level == 1 else max(1, batch // 4),
            progress,
            free_steps,
            refine,
        )
        if engine_blocks:
            out[f"L{level}"]["engine_view"] = evaluate_engine_view(
                base,
                stack,
                level,
                per,
                engine_blocks,
                horizon,
                seed,
                n_boot,
                batch if level == 1 else max(1, batch // 4),
                probes or set(),
                refine,
            )
    out["n_windows"] = sum(out[f"L{lv}"]["n_windows"] for lv in levels)
    out["refine"] = dict(zip(("steps", "lr", "tokens"), refine, strict=True))
    out["seed"] = seed
    out["seconds"] = round(time.time() - t0, 1)
    return out


def record_metrics(checkpoint: str | Path, res: dict) -> None:
    """Write an eval result into the checkpoint's metadata (weights untouched)."""
    meta_path = Path(checkpoint).with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["metrics"] = {
        "eval": "megacontext eval-gist (held-out, fp32)",
        **{k: v for k, v in res.items() if k != "checkpoint"},
    }
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megacontext eval-gist",
        description="Held-out horizon NLL with the span kept / dropped / mean-embedded / "
        "gisted, for L1 and L2, per source, with the recovery ratio and a bootstrap 95%% CI.",
    )
    p.add_argument(
        "--checkpoint",
        default=str(SHIPPED),
        help="GistNet checkpoint path without suffix (default: the shipped one)",
    )
    p.add_argument("--model", default="default", help="base model: 'default' or an HF id/path")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA if available)")
    p.add_argument("--levels", default="1,2", help="comma-separated levels to evaluate")
    p.add_argument("--l1-windows", type=int, default=80, help="held-out L1 windows per source")
    p.add_argument("--l2-windows", type=int, default=12, help="held-out L2 windows per source")
    p.add_argument("--prefix", type=int, default=32, help="prefix tokens before the span")
    p.add_argument("--horizon", type=int, default=32, help="horizon tokens scored")
    p.add_argument("--seed", type=int, default=0, help="seed for window choice and bootstrap")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CI")
    p.add_argument("--batch", type=int, default=8, help="L1 windows per forward pass")
    p.add_argument(
        "--free-steps",
        type=int,
        default=0,
        help="also fit one free vector per window for this many Adam steps on the scored "
        "horizon (an upper bound for the one-vector format, not a held-out result)",
    )
    p.add_argument(
        "--refine-steps",
        type=int,
        default=Config().gist_refine_steps,
        help="also score gists as the engine stores them, refined for this many steps "
        "(the engine's gist_refine_steps; 0: skip)",
    )
    p.add_argument(
        "--refine-lr", type=float, default=Config().gist_refine_lr, help="their step size"
    )
    p.add_argument(
        "--refine-tokens",
        type=int,
        default=Config().gist_refine_tokens,
        help="length of the model's own continuation they are fitted to",
    )
    p.add_argument(
        "--engine-prefix-blocks",
        type=int,
        default=4,
        help="also score gists after this many blocks shown as level-1 gists, as in the "
        "engine, on held-out documents no training probe saw (0: skip)",
    )
    p.add_argument(
        "--model-dtype",
        choices=MODEL_DTYPES,
        default="auto",
        help="the base model's weights, as the engine's model_dtype (auto: half precision "
        "where the hardware computes it)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.add_argument(
        "--record",
        action="store_true",
        help="store the result under 'metrics' in the checkpoint's JSON metadata",
    )
    return p


def _table(res: dict) -> str:
    lines = [
        f"checkpoint: {res['checkpoint']}  ({res['n_windows']} held-out windows, "
        f"model in {res['model_dtype']})"
    ]
    refine = res.get("refine", {}).get("steps", 0)
    stored = f"as stored (refined, {refine} steps)" if refine else "as stored (GistNet)"
    for lv in ("L1", "L2"):
        if lv not in res:
            continue
        r = res[lv]
        lines.append(
            f"{lv}  recovery {stored} {r['recovery']:.3f}  "
            f"ci95 [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
        )
        extra = f"GistNet alone {r['recovery_gistnet']:.3f}"
        extra += f"  mean-of-embeddings {r['recovery_mean']:.3f}"
        if "free" in r["nll"]:
            extra += f"  free vector (upper bound) {r['recovery_free']:.3f}"
        lines.append(f"    {extra}")
        header = (
            f"  {'source':8s} {'n':>4s} " + " ".join(f"{m:>9s}" for m in r["nll"]) + "  recovery"
        )
        lines.append(header)
        for src, s in [*r["per_source"].items(), ("all", r)]:
            row = " ".join(f"{s['nll'][m]:9.4f}" for m in r["nll"])
            lines.append(f"  {src:8s} {s['n_windows']:4d} {row}  {s['recovery']:.3f}")
        ranges = r["by_horizon"]
        lines.append(
            "  horizon token  "
            + " ".join(f"{b['tokens'][0]}-{b['tokens'][1]}".rjust(7) for b in ranges)
        )
        lines.append("  drop - full    " + " ".join(f"{b['gap']:7.3f}" for b in ranges))
        lines.append("  recovery       " + " ".join(f"{b['recovery']:7.3f}" for b in ranges))
        lines.append(
            "  GistNet alone  " + " ".join(f"{b['recovery_gistnet']:7.3f}" for b in ranges)
        )
        if "engine_view" in r:
            v = r["engine_view"]
            lines.append(
                f"  as the engine shows it (after {v['window']['gist_prefix_blocks']} gisted "
                f"blocks, {v['n_windows']} windows of documents no probe saw): "
                f"recovery {v['recovery']:.3f} ci95 [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"
                f"  GistNet alone {v['recovery_gistnet']:.3f}"
            )
    return "\n".join(lines)


def eval_gist_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = BaseModel.load(args.model, args.device, args.model_dtype)
    stack, meta = load_gist_stack(args.checkpoint, base, obj.POSITION_CONVENTION)
    levels = tuple(int(x) for x in args.levels.split(",") if x.strip())
    res = evaluate(
        base,
        stack,
        str(args.checkpoint),
        levels,
        args.l1_windows,
        args.l2_windows,
        args.prefix,
        args.horizon,
        args.seed,
        args.bootstrap,
        args.batch,
        progress=not args.json,
        free_steps=args.free_steps,
        refine=(args.refine_steps, args.refine_lr, args.refine_tokens),
        engine_blocks=args.engine_prefix_blocks,
        probes=probe_settings(meta),
    )
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    if args.record:
        record_metrics(args.checkpoint, res)
    print(json.dumps(res, indent=2) if args.json else _table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(eval_gist_main())
