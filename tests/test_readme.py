"""Every command in the README's bash blocks runs, in order, as a new user would paste it.

Trainings the README runs in full are cut to a few steps here (the suite has minutes, not hours);
everything else runs exactly as written, in a fresh directory.
"""

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from handprop.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
SHORT_RUN = ["--max-steps", "30"]      # appended to a `handprop train` line that sets no --max-steps
NOT_RUN_HERE = ("python3 -m venv", "pip install", ". .venv/bin/activate", "bash .ci/run")   # set-up, and CI itself


def readme_commands():
    """Each command of the README's bash blocks, in order, as written: lines split at &&."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    commands = []
    for line in "\n".join(blocks).splitlines():
        for command in line.split("&&"):
            command = command.strip()
            if command and not command.startswith(NOT_RUN_HERE):
                commands.append(command)
    return commands


def as_run_here(command):
    """The argument list handprop's main() gets for a README line (a full training cut short)."""
    args = shlex.split(command, comments=True)[1:]
    if args[:1] == ["train"] and "--max-steps" not in args and "--resume" not in args:
        args += SHORT_RUN
    return args


def test_the_readme_shows_the_commands_a_new_user_needs():
    commands = readme_commands()
    for needed in ("handprop train", "handprop sample", "handprop eval", "handprop check", "handprop exercise start",
                   "handprop grade"):
        assert any(c.startswith(needed) for c in commands), needed


def test_every_readme_command_runs_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for command in readme_commands():
        if command.startswith("handprop "):   # in this process: the suite has torch imported already
            status = main(as_run_here(command))
            out, err = capsys.readouterr()
            assert status in (0, None), f"{command}\n{err[-2000:]}"
        else:   # a shell line that makes a file the next commands read
            done = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True)
            assert done.returncode == 0, f"{command}\n{done.stderr}"
    assert (tmp_path / "out" / "people" / "model.safetensors").exists()


@pytest.mark.parametrize("line", ["handprop train --model mlp-fast -o out/fast  # a comment", "handprop train"])
def test_a_training_without_a_length_is_cut_short_and_nothing_else_changes(line):
    args = as_run_here(line)
    assert args[-2:] == SHORT_RUN and args[:-2] == shlex.split(line, comments=True)[1:]
