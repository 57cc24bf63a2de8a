"""The README's commands, run top to bottom in a fresh directory, work.

Every command line of the README's ```bash blocks is taken in order (backslash continuations
joined, comments dropped) and run in an empty directory holding only the repository's
`experiments/`, through the same entry point as the `covidnet` script. Long runs are shrunk
by `--set` overrides appended to the README's own arguments (fewer steps and proposals, a
smaller quickstart data set): what is tested is that each command works after the ones
above it, with the files they wrote (data folders, run directories, exports), not the
figures. Lines that cannot run here are skipped by rule, and the rules are asserted to match
only the lines they are meant for, so a new README command is run unless someone decides
otherwise here.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from search.cli import main

ROOT = Path(__file__).resolve().parents[1]

# Placeholders and commands that need what a test machine has not got.
SKIP = {
    "make test": "the suite itself",
    "covidnet data prepare --covidx-dir ~/covidx": "a real COVIDx download",
    "covidnet search --config FILE": "a placeholder config",
    "covidnet compare runs/a runs/b": "two searches named for the example",
    "python bench/": "a benchmark (bench/README.md)",
}
# `make search` is the Makefile's command.
MAKE = {
    "make search": "covidnet search --config experiments/quickstart.yaml --workdir runs/quickstart"
}
SHRINK = {
    "covidnet search": [
        "search.budget.max_trials=3",
        "search.budget.rungs=[6]",
        "search.budget.final_steps=6",
        "search.budget.max_wall_time_s=120",
        "search.confirm.seeds=0",
        "search.workers=1",
        "data.synth.per_class=40",
        "train.eval_every=3",
        "train.checkpoint_every=3",  # the quickstart's 100 is not a multiple of 3
        # A design must be declared for the export lines below: requirements a 6-step run
        # on 120 images meets.
        "search.requirements.max_macs=2.0e6",
        "search.requirements.min_accuracy=0.0",
        "search.requirements.classes.COVID-19.min_sensitivity=0.0",
    ],
    "covidnet train": ["train.steps=6", "train.eval_every=3", "train.log_every=3"],
}


def readme_commands() -> list[str]:
    """The command lines of the README's bash blocks, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #", 1)[0].split(" # ", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _argv(line: str) -> tuple[list[str], str | None]:
    line = MAKE.get(line, line)
    redirect = None
    if " > " in line:
        line, redirect = (part.strip() for part in line.split(" > ", 1))
    words = shlex.split(line)
    assert words[0] == "covidnet", line
    argv = words[1:]
    for prefix, sets in SHRINK.items():
        if line.startswith(prefix):
            for item in sets:
                argv += ["--set", item]
    return argv, redirect


def test_every_readme_command_is_run_or_skipped_by_a_rule_that_matches_it():
    commands = readme_commands()
    assert any(c.startswith("covidnet search") for c in commands)
    for prefix in SKIP:
        assert any(c.startswith(prefix) for c in commands), f"stale skip rule {prefix!r}"
    for command in commands:
        if not any(command.startswith(p) for p in SKIP):
            assert command.startswith("covidnet") or command in MAKE, command


@pytest.mark.slow
def test_the_readme_runs_top_to_bottom_in_a_fresh_directory(tmp_path, monkeypatch, capsys):
    shutil.copytree(ROOT / "experiments", tmp_path / "experiments")
    monkeypatch.chdir(tmp_path)
    ran = []
    for line in readme_commands():
        if any(line.startswith(p) for p in SKIP):
            continue
        argv, redirect = _argv(line)
        for i, word in enumerate(argv):
            if word.startswith("data/quickstart/test/") and not Path(word).exists():
                # The shrunk quickstart set numbers its patients differently: its first
                # test image stands for the README's.
                first = Path("data/quickstart/test.txt").read_text().split()[1]
                argv[i] = f"data/quickstart/test/{first}"
        if "--trial" in argv:
            # The README's trial number is an example: take a trained trial of this search.
            board = json.loads(Path("runs/quickstart/leaderboard.json").read_text())
            argv[argv.index("--trial") + 1] = str(board["rows"][-1]["trial"])
        out = io.StringIO()
        with contextlib.redirect_stdout(out) if redirect else contextlib.nullcontext():
            code = main(argv)
        if redirect:
            Path(redirect).write_text(out.getvalue(), encoding="utf-8")
        err = capsys.readouterr().err
        assert code == 0, f"README command failed ({code}): {line}\n{err[-2000:]}"
        ran.append(line)
    # What the README promises the commands leave behind.
    assert (tmp_path / "runs/quickstart/leaderboard.json").exists()
    assert (tmp_path / "runs/quickstart/export/export.json").exists()
    assert (tmp_path / "runs/smoke/checkpoints").is_dir()
    assert (tmp_path / "my_spec.json").read_text().lstrip().startswith("{")
    assert len(ran) >= 20
