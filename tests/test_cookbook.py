"""Every cookbook example runs end to end, as a reader would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parents[1] / "cookbook").glob("*.py"))


def test_the_cookbook_has_examples():
    assert len(EXAMPLES) >= 5


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(example: Path, tmp_path):
    run = subprocess.run(
        [sys.executable, str(example), "--store", str(tmp_path / "store")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, (
        f"{example.name} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    )
