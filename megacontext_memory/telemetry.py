"""Per-turn metrics: what the working context looked like and where the time went."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

STAGES = ("ingest", "gist", "score", "allocate", "prefill", "decode")


@dataclass
class TurnTelemetry:
    turn: int = 0
    history_tokens: int = 0
    budget: int = 0
    positions_used: int = 0
    entries_per_level: dict[int, int] = field(default_factory=dict)
    moves: int = 0
    expands: int = 0
    collapses: int = 0
    swap_rate: float = 0.0  # positions changed by moves / positions in use
    prefill_tokens: int = 0
    reused_positions: int = 0
    new_tokens: int = 0
    latency_ms: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.latency_ms[stage] += (time.perf_counter() - t0) * 1000

    def to_dict(self) -> dict:
        d = asdict(self)
        d["entries_per_level"] = {str(k): v for k, v in self.entries_per_level.items()}
        d["latency_ms"] = {k: round(v, 2) for k, v in self.latency_ms.items()}
        return d

    def write_jsonl(self, path: str | Path) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(self.to_dict()) + "\n")
