"""The scripts under examples/ run as a user runs them and print what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_python_api_example_searches_and_reports(tmp_path: Path) -> None:
    # A kept workdir (the script's argument) so that the files it reports can be checked.
    workdir = tmp_path / "api"
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "python_api.py"), str(workdir)],
        cwd=tmp_path,  # nothing relies on the repository being the working directory
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    out = done.stdout
    assert "leaderboard (best first):" in out
    assert "#1 trial " in out and " MACs, validation accuracy " in out
    assert "declared design: best design: trial " in out
    assert "accuracy >= 0.0: validation " in out and "-> met" in out
    assert (workdir / "best" / "spec.json").is_file()
    assert (workdir / "leaderboard.json").is_file()


@pytest.mark.slow
def test_the_python_api_walkthrough_runs_cell_by_cell(tmp_path: Path) -> None:
    """docs/python_api.md's code blocks, in order, in one namespace, as a notebook runs them."""
    import re

    text = (ROOT / "docs" / "python_api.md").read_text(encoding="utf-8")
    cells = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    script = "\n".join(cells) + "\nprint('walkthrough done', result.counts['proposed'])\n"
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,  # the walkthrough's relative paths (data/api, runs/api) land here
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "walkthrough done 3" in done.stdout
    assert (tmp_path / "runs" / "api" / "best" / "spec.json").is_file()
