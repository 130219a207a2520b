"""GistNet checkpoints: safetensors weights + JSON metadata, tied to one base model.

A gist only means something to the model it was trained against, so a checkpoint records
the base model's name, embedding width, tokenizer hash and position convention, and
`load_gist_stack` refuses a mismatch rather than feeding the model noise.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from .gistnet import GistStack

SHIPPED = Path(__file__).resolve().parent.parent / "checkpoints" / "gistnet-smollm2-135m"


class CheckpointMismatch(ValueError):
    """The checkpoint was made for a different base model or convention."""


def save_gist_stack(stack: GistStack, path: str | Path, meta: dict) -> Path:
    """Write `path`.safetensors and `path`.json; returns the weights path."""
    net = stack.levels[0]
    shape = {
        "hidden": net.hidden,
        "heads": net.encode.attn.num_heads,
        "depth": net.depth,
        "feature_layers": stack.feature_layers,
    }
    return _save(stack, path, meta | shape)


def _save(net, path: str | Path, meta: dict) -> Path:
    """Weights, then the metadata (with the weights' version), each replaced whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = path.with_suffix(".safetensors")
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, tmp)
    tmp.replace(weights)
    meta = dict(meta, version=file_version(weights))
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return weights


def _load_meta(path: str | Path, what: str, expected: dict) -> tuple[dict, Path]:
    """A checkpoint's metadata and weights path; CheckpointMismatch unless it was made for
    what `expected` names."""
    path = Path(path)
    meta_path, weights = path.with_suffix(".json"), path.with_suffix(".safetensors")
    if not meta_path.exists() or not weights.exists():
        raise FileNotFoundError(
            f"{what} checkpoint {path} needs {weights.name} and {meta_path.name}"
        )
    meta = json.loads(meta_path.read_text())
    wrong = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    if wrong:
        detail = ", ".join(
            f"{k}: checkpoint has {a!r}, engine has {b!r}" for k, (a, b) in wrong.items()
        )
        raise CheckpointMismatch(
            f"{what} checkpoint {path} was made for another base model ({detail})"
        )
    return meta, weights


def file_version(weights: Path) -> str:
    return hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:12]


def load_gist_stack(path: str | Path, base, position_convention: str) -> tuple[GistStack, dict]:
    """Load a checkpoint for `base` (a BaseModel); raise CheckpointMismatch if not made for it."""
    meta, weights = _load_meta(path, "GistNet", base_meta(base, position_convention))
    stack = GistStack(
        base.width,
        hidden=meta["hidden"],
        heads=meta.get("heads", 6),
        embed_rms=base.embed_rms,
        depth=meta.get("depth", 1),
        feature_layers=meta.get("feature_layers", 0),
    )
    stack.load_state_dict(load_file(weights))
    return stack.eval().requires_grad_(False), meta


def base_meta(base, position_convention: str) -> dict:
    """The metadata that ties a checkpoint to `base`."""
    return {
        "base_model": base.name,
        "width": base.width,
        "tokenizer_hash": base.tokenizer_hash,
        "position_convention": position_convention,
    }


LENS_SHIPPED = SHIPPED.with_name("lensnet-smollm2-135m")


def save_lensnet(net, path: str | Path, meta: dict) -> Path:
    """Write a LensNet as `path`.safetensors + `path`.json (with `meta`, which must hold
    `base_meta`); returns the weights path."""
    return _save(net, path, meta | {"hidden": net.hidden, "project": net.project_dim})


def load_lensnet(path: str | Path, base):
    """A LensNet checkpoint for `base`; raises CheckpointMismatch when made for another
    base model or for other input features."""
    from .lensnet import FEATURES, LensNet

    expected = {"base_model": base.name, "width": base.width, "tokenizer_hash": base.tokenizer_hash}
    meta, weights = _load_meta(path, "LensNet", expected)
    if tuple(meta.get("features", ())) != FEATURES:
        raise CheckpointMismatch(
            f"LensNet checkpoint {path} reads other features: {meta.get('features')}"
        )
    net = LensNet(base.width, hidden=meta["hidden"], project=meta["project"])
    net.load_state_dict(load_file(weights))
    return net.eval().requires_grad_(False), meta
