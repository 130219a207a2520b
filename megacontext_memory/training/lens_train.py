"""LensNet training: counterfactual labels from the memory benchmark's dev tasks, then a
listwise fit.

Labels. For a task (a long history with look-alike facts, then a question), the session is
built as the engine builds it and its working context taken as the first refocus sees it.
Every block of the history is then shown raw (with the block after it, as notes straddle
block edges), alone, before the question, and the label is how much that lowers the
negative log-likelihood of the answer against the question asked with no block at all:
ΔNLL = NLL(answer | question) - NLL(answer | block, question), all blocks of a task in
batched forward passes (beyond `LABEL_EVERY_BLOCK` blocks, only the blocks holding an
informative word of the question). An entry's label is its block's; a gist wider than a
block takes the best of its blocks (expanding it is the way to that block). One `.npz` per
task, so labelling resumes where it stopped. Only the dev split is used; the test split
stays for `megacontext eval-focus` and `megacontext bench memory`.

Fit. Per snapshot, the scores' softmax is fitted to the labels' softmax (cross-entropy,
temperature `--temperature`), plus a small regression term so scores keep their sign
(a filler block's label is about 0). Tasks whose index is 0 mod 5 are held out of the
fit to pick the step count (by hit@4, then hit@1, then the answer's mean reciprocal
rank); the checkpoint records them there.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import BLOCK_SIZE as K
from ..focus.scorers import HeuristicScorer
from ..models.checkpoint import LENS_SHIPPED, base_meta, save_lensnet
from ..models.lensnet import FEATURES, LensNet

DEFAULT_TASKS = {2000: 60, 8000: 16, 32000: 12}
# Longer histories label only the block pairs that hold one of the question's informative
# tokens (`HeuristicScorer.window_matches`); the others get 0, which is what every pair
# without them gets in the short histories labelled whole (about 0).
LABEL_EVERY_BLOCK = 300


def answer_entries(session, task, entries) -> np.ndarray:
    """Indices of the entries overlapping the note that states the answer."""
    from ..eval.tasks import mentions

    msgs = session.messages()
    for i in task.fact_indices:
        m = msgs[i + 1]  # the history starts after the system prompt
        if mentions(m.content, task.answers):
            hit = [
                j for j, e in enumerate(entries) if e.start < m.token_end and m.token_start < e.end
            ]
            return np.asarray(hit, np.int64)
    raise ValueError(f"task {task.id}: no planted note states the answer")


@torch.no_grad()
def block_utilities(
    base,
    blocks: np.ndarray,
    question: str,
    answer: str,
    batch: int = 32,
    only: np.ndarray | None = None,
):
    """ΔNLL of `answer` per block [nb]: the question alone vs the block raw before it
    (with the block after it, so a note cut by a block edge is whole). With `only` [nb]
    (bool), the other blocks are not run and get 0."""
    prompt = base.encode(base.render_message("user", question))
    prompt += base.encode(base.generation_prompt())
    ans = base.encode(answer)

    def nll(rows: list[list[int]]) -> np.ndarray:
        ids = torch.as_tensor(rows, device=base.device)
        hidden = base.model.model(input_ids=ids).last_hidden_state
        logits = base.model.lm_head(hidden[:, -len(ans) - 1 : -1]).float()
        lp = logits.log_softmax(-1).gather(-1, ids[:, -len(ans) :, None])[..., 0]
        return (-lp.mean(-1)).cpu().numpy()

    # A note often straddles two blocks: block b is shown with the block after it.
    pairs = np.concatenate([blocks, np.roll(blocks, -1, 0)], 1)[: max(len(blocks) - 1, 0)]
    run = np.arange(len(pairs)) if only is None else np.flatnonzero(only[: len(pairs)])
    alone = nll([prompt + ans])[0]
    rows = [[*pairs[b].tolist(), *prompt, *ans] for b in run]
    out = [nll(rows[i : i + batch]) for i in range(0, len(rows), batch)]
    utility = np.zeros(len(blocks), np.float64)  # the last block: no pair, no label
    if out:
        utility[run] = alone - np.concatenate(out)
    return utility


def label_task(engine, scorer, task, path: Path) -> None:
    """Build the task's session, take its working context and write inputs and labels."""
    from ..baselines import SYSTEM_PROMPT

    session = engine.session(task.id)
    try:
        session.extend([("system", SYSTEM_PROMPT), *task.messages])
        session.append("user", task.question)
        wc = session.working_context()
        tree = session.tree
        n_blocks = tree.n_tokens // K
        blocks = tree.tokens(0, n_blocks * K).reshape(-1, K)
        query = engine.base.encode(task.question)
        only = None
        if n_blocks > LABEL_EVERY_BLOCK:  # only pairs holding a rare word of the question
            only = HeuristicScorer().window_matches(tree, query)[:n_blocks] > 0
        utility = block_utilities(engine.base, blocks, task.question, task.answers[0], only=only)
        labels = np.zeros(len(wc.entries), np.float32)
        for j, e in enumerate(wc.entries):
            lo, hi = e.start // K, min(-(-e.end // K), n_blocks)
            labels[j] = utility[lo:hi].max() if hi > lo else 0.0
        x = scorer.inputs(wc, tree, query)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(
            tmp,
            vectors=x["vectors"].astype(np.float16),
            query=x["query"],
            features=x["features"],
            levels=x["levels"],
            labels=labels,
            answer=answer_entries(session, task, wc.entries),
        )
        tmp.replace(path)
    finally:
        engine.delete_session(task.id)


def make_labels(out: Path, sizes: dict[int, int], seed: int, engine_options: dict) -> list[Path]:
    """Label dev tasks into `out` (one file per task; existing files are kept)."""
    from ..engine import MegaContextEngine
    from ..eval.tasks import TaskGenerator, reader_counter
    from ..focus.scorers import LensScorer

    out.mkdir(parents=True, exist_ok=True)
    engine = MegaContextEngine(store=out / "store", **engine_options)
    scorer = LensScorer(LensNet(engine.base.width), engine.base)
    gen = TaskGenerator("dev", reader_counter(engine.base), seed=seed)
    todo = [(size, i) for size, n in sizes.items() for i in range(n)]
    paths = []
    for size, i in tqdm(todo, desc="labels", unit="task"):
        path = out / f"dev-{size}-{i:03d}-seed{seed}.npz"
        if not path.exists():
            label_task(engine, scorer, gen.task(size, i), path)
        paths.append(path)
    return paths


# ---- fit ---------------------------------------------------------------------------------
def _load(paths: list[Path]) -> list[dict]:
    out = []
    for p in paths:
        x = dict(np.load(p)) | {"name": p.stem}
        if x["features"].shape[1] != len(FEATURES):
            raise ValueError(
                f"{p} holds {x['features'].shape[1]} features per entry, LensNet reads "
                f"{len(FEATURES)} ({', '.join(FEATURES)}): label into a new folder (--labels)"
            )
        out.append(x)
    return out


def _batch(examples: list[dict]):
    n = max(len(x["labels"]) for x in examples)
    b, d = len(examples), examples[0]["vectors"].shape[1]
    out = {
        "vectors": torch.zeros(b, n, d),
        "query": torch.zeros(b, d),
        "features": torch.zeros(b, n, len(FEATURES)),
        "levels": torch.zeros(b, n, dtype=torch.long),
        "labels": torch.zeros(b, n),
        "mask": torch.zeros(b, n, dtype=torch.bool),
    }
    for i, x in enumerate(examples):
        m = len(x["labels"])
        out["vectors"][i, :m] = torch.as_tensor(x["vectors"].astype(np.float32))
        out["query"][i] = torch.as_tensor(x["query"])
        out["features"][i, :m] = torch.as_tensor(x["features"])
        out["levels"][i, :m] = torch.as_tensor(x["levels"])
        out["labels"][i, :m] = torch.as_tensor(x["labels"])
        out["mask"][i, :m] = True
    return out


def _scores(net: LensNet, b: dict) -> torch.Tensor:
    return net(b["vectors"], b["query"], b["features"], b["levels"], b["mask"])


def answer_rank(scores: np.ndarray, levels: np.ndarray, answer: np.ndarray) -> int:
    """Where the answer's note first comes among the gists (the expansion candidates)
    ordered by score, ties in working-context order: 1 = the best; 1 as well when the note
    is already raw."""
    if (levels[answer] == 0).any():
        return 1
    gists = np.flatnonzero(levels > 0)
    order = gists[np.argsort(-scores[gists], kind="stable")]
    return 1 + int(np.flatnonzero(np.isin(order, answer))[0])


def hits(scores: np.ndarray, levels: np.ndarray, answer: np.ndarray, k: int) -> bool:
    """Whether an entry of the answer's note is among the `k` best-scored gists."""
    return answer_rank(scores, levels, answer) <= k


def evaluate(net: LensNet, examples: list[dict]) -> dict:
    """hit@1, hit@4 and the mean reciprocal rank of the answer's note among the gists."""
    with torch.no_grad():
        ranks = []
        for x in examples:
            s = _scores(net, _batch([x]))[0, : len(x["labels"])].numpy()
            ranks.append(answer_rank(s, x["levels"], x["answer"]))
    r = np.asarray(ranks, np.float64)
    n = max(len(r), 1)
    return {
        "tasks": len(r),
        "hit@1": float((r <= 1).sum() / n),
        "hit@4": float((r <= 4).sum() / n),
        "mrr": round(float((1.0 / r).sum() / n), 4),
    }


def fit(
    examples: list[dict], held: list[dict], steps: int, lr: float, temperature: float, seed: int
):
    torch.manual_seed(seed)
    rng = random.Random(seed)
    width = examples[0]["vectors"].shape[1]
    net = LensNet(width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    best, best_state, log = (-1.0, -1.0, -1.0), None, []
    for step in tqdm(range(1, steps + 1), desc="train-lens", unit="step"):
        b = _batch(rng.sample(examples, min(8, len(examples))))
        pred = _scores(net, b)
        neg = torch.finfo(pred.dtype).min
        target = (b["labels"] / temperature).masked_fill(~b["mask"], neg).softmax(-1)
        logp = pred.masked_fill(~b["mask"], neg).log_softmax(-1)
        listwise = -(target * logp.masked_fill(~b["mask"], 0)).sum(-1).mean()
        regress = ((pred - b["labels"]) ** 2)[b["mask"]].mean()
        loss = listwise + 0.1 * regress
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps:
            m = evaluate(net, held)
            log.append({"step": step, "loss": round(loss.item(), 4), **m})
            if (m["hit@4"], m["hit@1"], m["mrr"]) > best:
                best = (m["hit@4"], m["hit@1"], m["mrr"])
                best_state = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    return net, log


def train_lens_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="megacontext train-lens",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--labels", default="runs/lens-labels", help="folder of per-task label files")
    p.add_argument(
        "--tasks-2k", type=int, default=DEFAULT_TASKS[2000], help="dev tasks of 2k tokens"
    )
    p.add_argument(
        "--tasks-8k", type=int, default=DEFAULT_TASKS[8000], help="dev tasks of 8k tokens"
    )
    p.add_argument(
        "--tasks-32k", type=int, default=DEFAULT_TASKS[32000], help="dev tasks of 32k tokens"
    )
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=int, default=1024, help="working budget of the snapshots")
    p.add_argument("--out", default=str(LENS_SHIPPED), help="checkpoint path (no suffix)")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    sizes = {2000: args.tasks_2k, 8000: args.tasks_8k, 32000: args.tasks_32k}
    t0 = time.perf_counter()
    # The labels never read a gist; LensNet's inputs read only gists wider than a block
    # (made from GistNet's level-1 gists), so the refinement of shown level-1 gists is off.
    options = {"working_budget": args.budget, "gist_refine_steps": 0}
    paths = make_labels(Path(args.labels), sizes, args.seed, options)
    examples = _load(paths)
    is_held = [int(x["name"].split("-")[2]) % 5 == 0 for x in examples]
    held = [x for x, h in zip(examples, is_held, strict=True) if h]
    train = [x for x, h in zip(examples, is_held, strict=True) if not h]
    net, log = fit(train, held, args.steps, args.lr, args.temperature, args.seed)
    from ..engine import _shared_base

    base = _shared_base("default", None, "auto")
    meta = base_meta(base, "compact") | {
        "features": list(FEATURES),
        "data": "memory-bench dev split (never test): "
        + ", ".join(f"{n} tasks of {s} tokens" for s, n in sizes.items()),
        "held_out_dev": evaluate(net, held),
        "train_dev": evaluate(net, train),
        "steps": args.steps,
        "lr": args.lr,
        "temperature": args.temperature,
        "seed": args.seed,
        "budget": args.budget,
        "log": log,
        "seconds": round(time.perf_counter() - t0),
    }
    path = save_lensnet(net, args.out, meta)
    print(json.dumps({k: meta[k] for k in ("held_out_dev", "train_dev", "data")}, indent=2))
    print(f"wrote {path}", file=sys.stderr)
    return 0
