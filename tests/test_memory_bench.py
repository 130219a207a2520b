"""The memory benchmark: seeded tasks, disjoint dev/test splits, answer matching, and
a bench run of every system end to end."""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3

import pytest

from megacontext_memory.cli import main
from megacontext_memory.eval.memory_bench import wilson
from megacontext_memory.eval.tasks import TEMPLATES, TaskGenerator, bench_split, mentions, score


def words(role: str, text: str) -> int:
    """A cheap stand-in for the reader's tokenizer: tasks only need a consistent measure."""
    return len(text.split()) + 4


@pytest.fixture(scope="module")
def generators():
    return {s: TaskGenerator(s, words) for s in ("dev", "test")}


def test_tasks_are_seeded(generators):
    a = generators["test"].task(2000, 5)
    assert a == TaskGenerator("test", words).task(2000, 5)
    assert a != generators["test"].task(2000, 6)
    assert a != TaskGenerator("test", words, seed=1).task(2000, 5)


def test_task_shape(generators):
    tasks = generators["test"].tasks(8000, 14)
    assert {t.kind for t in tasks} == {tpl.kind for tpl in TEMPLATES}
    assert any(t.updated for t in tasks) and not all(t.updated for t in tasks)
    for t in tasks:
        assert 7000 < t.tokens <= 8000
        assert 2 <= len(t.siblings) <= 3 and t.entity not in t.siblings
        assert t.entity in t.question
        assert len(t.fact_indices) == len(t.siblings) + 1 + t.updated
        facts = [t.messages[i][1] for i in t.fact_indices]
        # The answer is stated in the newest fact about the entity; siblings share a template.
        newest = [f for f in facts if re.search(rf"\b{t.entity}\b", f)][-1]
        assert mentions(newest, t.answers) and not mentions(newest, t.distractors)
        assert all(mentions(f, t.answers + t.distractors) for f in facts)
        assert t.tokens_back >= 0.1 * t.tokens
        assert all(len(text.split()) <= 200 for _, text in t.messages)
        # The latest value completes the answer's lead, as a reply would write it.
        assert mentions(t.values[t.answer_index], t.answers) and t.entity in t.lead


def test_dev_and_test_share_no_names_values_or_filler(generators):
    seen = {}
    for split, gen in generators.items():
        tasks = [gen.task(size, i) for size in (2000, 32000) for i in range(24)]
        seen[split] = {
            "names": {n for t in tasks for n in (t.entity, *t.siblings)},
            "values": {v for t in tasks for v in t.values},
            "filler": {k for t in tasks for k in t.filler},
        }
        assert all(bench_split("name", n) == split for n in seen[split]["names"])
        assert all(bench_split("doc", k) == split for k in seen[split]["filler"])
    for kind in ("names", "values", "filler"):
        assert seen["dev"][kind] and seen["test"][kind]
        assert not seen["dev"][kind] & seen["test"][kind], kind


def test_answer_matching():
    answers = ("March 14", "14 March", "Mar 14", "March 14th", "14th of March")
    others = ("March 1", "1 March", "Mar 1", "March 1st", "1st of March")
    assert score("The deadline is March 14.", answers, others)
    assert score("It's the 14th of march", answers, others)
    assert not score("March 1", answers, others)  # 'March 1' must not match inside 'March 14'
    assert not score("March 1 or March 14", answers, others)  # hedging is not an answer
    assert not score("I don't know.", answers, others)
    assert score("The budget is $48,500.", ("48,500", "48500"), ("8,500",))
    assert score("Code: KX4821", ("KX-4821", "KX4821"), ("KX-4812",))


def test_wilson_interval():
    assert wilson(0, 8)[0] == 0.0 and 0.3 < wilson(0, 8)[1] < 0.4
    lo, hi = wilson(12, 24)
    assert lo < 0.5 < hi and round(lo + hi, 3) == 1.0


def test_tuning_on_test_is_refused(capsys):
    argv = ["bench", "memory", "--split", "test", "--chunk-tokens", "64", "128"]
    assert main(argv) == 2
    assert "dev" in capsys.readouterr().err


def test_task_counts_are_one_for_all_sizes_or_one_per_size(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "memory", "--sizes", "2000", "8000", "--tasks", "4", "2", "1"])
    assert "one per size (2), not 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval-focus", "--sizes", "2000", "8000", "128000", "--tasks", "4", "2"])
    assert "one per size (3), not 2" in capsys.readouterr().err


@pytest.mark.slow
def test_end_to_end_at_two_sizes(tmp_path, capsys):
    # Two sizes past the budget with one task each, and GistNet's gists as they are: the
    # plumbing of every system is under test here, not the gists' quality (the in-context
    # refinement has its own tests in test_engine.py and test_write_path.py). 3,000 rather
    # than --quick's 8,000 tokens: the full-context system alone would read 8,000 for a
    # minute.
    out = tmp_path / "bench"
    argv = ["bench", "memory", "--sizes", "2000", "3000", "--tasks", "1", "--json"]
    argv += ["--out", str(out)]
    assert main([*argv, "--engine-option", "gist_refine_steps=0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"reader", "working_budget", "split", "commit"} <= set(result)
    assert result["working_budget"] == 1024 and result["split"] == "test"
    assert result["tasks_per_size"] == {"2000": 1, "3000": 1}
    options = result["settings"]["megacontext"]["engine_options"]
    assert options == {"gist_refine_steps": 0}
    systems = result["systems"]
    assert {"oracle", "full", "truncation", "rag", "megacontext"} <= set(systems)
    for cells in systems.values():
        for size in ("2000", "3000"):
            c = cells[size]
            assert c["n"] >= 1 and 0 <= c["ci95"][0] <= c["accuracy"] <= c["ci95"][1] <= 1
            assert c["positions_used"] <= 1024 or cells is systems["full"]
            assert 0 <= c["choice_accuracy"] <= 1
    assert systems["rag"]["2000"]["ingest_tokens_per_s"] > 0
    assert systems["megacontext"]["3000"]["ingest_tokens_per_s"] > 0
    png = out / "memory_bench.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    rows = [json.loads(line) for line in (out / "rows.jsonl").open()]
    for r in rows:  # every system that replied also scored the stated values
        assert "skipped" in r or isinstance(r["choice"], bool) and "choice_margin" in r
    assert len(rows) == 5 * sum(
        json.loads((out / "memory_bench.json").read_text())["tasks_per_size"].values()
    )


def _digest(folder) -> dict:
    """A store's content: SQLite databases as SQL dumps (a write-ahead log may be merged into
    the file whenever the last connection closes), every other file as bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.suffix == ".db":
            with contextlib.closing(sqlite3.connect(p)) as db:
                out[p.relative_to(folder)] = "\n".join(db.iterdump())
        elif p.is_file() and not p.name.endswith(("-wal", "-shm")):
            out[p.relative_to(folder)] = p.read_bytes()
    return out


@pytest.mark.slow
def test_store_cache_builds_each_history_once_and_replays_it_as_built(tmp_path, capsys):
    argv = ["bench", "memory", "--split", "dev", "--systems", "megacontext", "--json"]
    argv += ["--sizes", "2000", "--tasks", "1"]
    cache = tmp_path / "cache"

    def run(out: str, *extra: str) -> list[dict]:
        assert main([*argv, "--out", str(tmp_path / out), *extra]) == 0
        capsys.readouterr()
        return [json.loads(line) for line in (tmp_path / out / "rows.jsonl").open()]

    plain = run("plain")
    cached = run("cached", "--store-cache", str(cache))
    (built,) = cache.iterdir()
    assert json.loads((built / "built.json").read_text())["task"] == "dev-2000-000"
    before = _digest(built)
    other = run("other", "--store-cache", str(cache), "--engine-option", "shown_levels=0")
    assert _digest(built) == before  # replays ran on copies: the built store is untouched

    def answer(r: dict) -> tuple:
        return r["reply"], r["correct"], r["choice"], r["positions"]

    # Reopened from the cache, the engine answers as one that ingested the history itself.
    assert [answer(r) for r in cached] == [answer(r) for r in plain]
    assert cached[0]["choice_margin"] == pytest.approx(plain[0]["choice_margin"], abs=1e-2)
    assert cached[0]["ingest_s"] == other[0]["ingest_s"]  # the build's time, recorded once
    # Two small-talk turns before the question, on a copy again, recorded with the result.
    (warm,) = run("warm", "--store-cache", str(cache), "--warm-turns", "2")
    assert _digest(built) == before and warm["reply"].strip()
    summary = json.loads((tmp_path / "warm" / "memory_bench.json").read_text())
    assert summary["settings"]["megacontext"]["warm_turns"] == 2
    assert main([*argv, "--out", str(tmp_path / "bad"), "--warm-turns", "9"]) == 2
    assert "warm_turns must be in [0, 4], got 9" in capsys.readouterr().err


@pytest.mark.slow
def test_warm_turns_come_before_the_question_in_every_system_within_the_budget(tmp_path, capsys):
    argv = ["bench", "memory", "--split", "dev", "--sizes", "2000", "--tasks", "1", "--json"]
    argv += ["--systems", "oracle", "truncation"]

    def run(out: str, *extra: str) -> dict:
        assert main([*argv, "--out", str(tmp_path / out), *extra]) == 0
        rows = [json.loads(line) for line in (tmp_path / out / "rows.jsonl").open()]
        return json.loads(capsys.readouterr().out) | {"rows": {r["system"]: r for r in rows}}

    cold, warm = run("cold"), run("warm", "--warm-turns", "2")
    assert "warm_turns" not in cold["settings"].get("oracle", {})
    assert warm["settings"]["oracle"]["warm_turns"] == 2
    assert warm["settings"]["truncation"]["warm_turns"] == 2
    # the oracle reads its notes and the two exchanges: more positions than cold
    assert warm["rows"]["oracle"]["positions"] > cold["rows"]["oracle"]["positions"] + 20
    # truncation gives up history for the exchanges and stays within the budget
    assert cold["rows"]["truncation"]["positions"] <= 1024
    assert warm["rows"]["truncation"]["positions"] <= 1024
