"""Prometheus metrics of a served engine: turns, latency split, ingest rate, focus."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from ..telemetry import TurnTelemetry

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """One registry per app, so several apps in one process (tests) do not collide."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.turns = Counter("megacontext_turns", "chat turns answered", registry=r)
        self.turn_seconds = Histogram(
            "megacontext_turn_seconds", "wall time of a turn", buckets=_SECONDS, registry=r
        )
        self.stage_seconds = Counter(
            "megacontext_stage_seconds", "time spent per engine stage", ["stage"], registry=r
        )
        self.ingested = Counter("megacontext_ingest_tokens", "tokens ingested", registry=r)
        self.ingest_seconds = Counter(
            "megacontext_ingest_seconds", "time spent ingesting", registry=r
        )
        self.positions = Gauge(
            "megacontext_positions_used", "working-context positions at the last turn", registry=r
        )
        self.swap_rate = Histogram(
            "megacontext_swap_rate",
            "positions changed by focus moves / positions in use, per turn",
            buckets=(0, 0.01, 0.05, 0.1, 0.25, 0.5, 1),
            registry=r,
        )

    def turn(self, tel: TurnTelemetry, seconds: float) -> None:
        self.turns.inc()
        self.turn_seconds.observe(seconds)
        for stage, ms in tel.latency_ms.items():
            self.stage_seconds.labels(stage).inc(ms / 1000)
        self.ingest(tel.new_tokens, tel.latency_ms.get("ingest", 0) / 1000)
        self.positions.set(tel.positions_used)
        self.swap_rate.observe(tel.swap_rate)

    def ingest(self, tokens: int, seconds: float) -> None:
        self.ingested.inc(tokens)
        self.ingest_seconds.inc(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
