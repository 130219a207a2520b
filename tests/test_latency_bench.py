"""`megacontext bench latency` end to end at two small sizes, on the shared model."""

from __future__ import annotations

import json

from megacontext_memory.eval.latency import STAGES, run, table

HEADLINE = (
    "append_p50_ms",
    "append_p95_ms",
    "ingest_tokens_per_s",
    "gist_tokens_per_s",
    "latency_ratio_max_over_min",
    "bare_ratio_max_over_min",
    "rss_ratio_max_over_min",
    "engine_over_bare",
)


def test_bench_latency_small(engine_factory):
    engine = engine_factory(working_budget=256, gist_refine_steps=0)
    result = run(
        [300, 1200], turns=1, appends=5, reply=4, together=3, together_tokens=200, engine=engine
    )
    result = json.loads(json.dumps(result))
    for key in HEADLINE:
        assert isinstance(result[key], int | float) and result[key] > 0, key
    assert result["append_p95_ms"] >= result["append_p50_ms"]
    for key in ("latency_ratio_max_over_min", "rss_ratio_max_over_min"):
        assert result[key] >= 1
    assert result["device"] and result["config"]["gist_refine_steps"] == 0
    assert result["config"]["working_budget"] == 256
    assert result["command"][:3] == ["megacontext", "bench", "latency"]
    sizes = result["sizes"]
    assert [r["size"] for r in sizes] == [300, 1200]
    for r in sizes:
        assert r["history_tokens"] >= r["build"]["tokens"] >= r["size"]  # each from nothing
        assert r["build"]["ingest_tokens_per_s"] > 0 and r["build"]["gist_tokens_per_s"] > 0
        assert r["build"]["gists_made"] > 0
        assert r["append"]["n"] == 5 and 0 < r["append"]["p50_ms"] <= r["append"]["p95_ms"]
        assert 20 <= r["append"]["mean_tokens"] <= 60
        (turn,) = r["turns"]
        assert set(turn["latency_ms"]) == set(STAGES)
        assert turn["total_ms"] > 0 and turn["bare_ms"]["total"] > 0
        assert 0 < turn["positions_used"] <= 256 and turn["prefill_tokens"] > 0
        assert turn["bare_ms"]["positions"] <= 256
        assert 0 <= turn["reply_tokens"] <= 4 + 1
        assert r["engine_over_bare"] > 0
        assert r["memory_mb"]["peak"] > 0 and r["disk_bytes"] > 0
    assert result["engine_over_bare"] == max(r["engine_over_bare"] for r in sizes)
    assert str(sizes[1]["history_tokens"]) in table(result)
    together = result["together"]
    assert together["sessions"] == 3 and together["tokens"] >= 3 * 200
    assert together["ingest_tokens_per_s"] > 0 and together["gist_tokens_per_s"] > 0
    # one session per size and three built together, each released again
    ids = engine.sessions()
    assert len(ids) == 2 + 3 and not any(engine.release(sid) for sid in ids)
