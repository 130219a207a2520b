"""The `megacontext` command: help for every command, inspect writes text and a PNG."""

from __future__ import annotations

import json

import pytest

from megacontext_memory.cli import DELEGATED, build_parser, main


def test_help_documents_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ("demo", "chat", "inspect", *DELEGATED):
        assert name in out
    for name in ("demo", "chat", "inspect"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([name, "--help"])
        assert "--store" in capsys.readouterr().out


def test_inspect_prints_levels_and_writes_png(engine_factory, tmp_path, capsys):
    store = tmp_path / "st"
    s = engine_factory(store=store).session("alice")
    s.append("system", "You are a helpful assistant.")
    for i in range(12):
        s.append("user", f"Line {i}: the weather in town number {i} is mild and sunny today.")
    png = tmp_path / "wc.png"
    rc = main(["inspect", "alice", "--store", str(store), "--budget", "256", "--png", str(png)])
    out = capsys.readouterr().out
    info = json.loads(out[: out.rindex("}") + 1])
    assert rc == 0 and info["history_tokens"] == s.token_count()
    assert info["positions_used"] <= 256 and "L1" in info["positions_per_level"]
    spread = info["gist_spread"]
    assert spread["L1"]["count"] == s.token_count() // 32 >= 5  # every complete block
    assert spread["L0"]["count"] == s.token_count()  # the tokens' embeddings, for comparison
    for level in ("L0", "L1"):
        assert spread[level]["norm"] > 0 and -1 <= spread[level]["cos_to_mean"] <= 1
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert main(["inspect", "nobody", "--store", str(store)]) == 2
