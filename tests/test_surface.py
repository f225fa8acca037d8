"""The command line as a new user meets it: --help, error lines, Ctrl-C, standard input and pipes, sampling."""

import argparse
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from cli_runner import run_main
from helpers import generate

from handprop.checkpoint import from_metadata, load_checkpoint, metadata
from handprop.cli import build_parser, main

NAMES = "\n".join(["anna", "bob", "carla", "dora", "emil", "fritz", "gina", "hugo", "ines", "jonas", "karl", "lena"])
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
RANGE = re.compile(r"(\S+) to (\S+)\)$")    # how a numeric flag's help ends: "...; 1 to 1,000,000)"


def subcommand(name):
    """The argparse parser of one subcommand."""
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


def shown_help(command, capsys, monkeypatch):
    """What `handprop COMMAND --help` prints, with its whitespace collapsed."""
    monkeypatch.setenv("COLUMNS", "1000")   # no wrapping, so every flag's help is one run of text
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())



def assert_one_error_line(status, err, *words):
    assert status == 2 and err.startswith("handprop: error: ") and len(err.splitlines()) == 1, (status, err)
    for word in words:
        assert word in err, err


# --- finding 1: the limits --help, the errors and the output promise ---------------------------------------------

@pytest.mark.parametrize("command, at_least", [("train", 13), ("sample", 3)])
def test_every_numeric_flag_shows_in_help_the_range_it_enforces(command, at_least, capsys, monkeypatch):
    shown = shown_help(command, capsys, monkeypatch)
    numeric = [a for a in subcommand(command)._actions if a.type is not None and a.dest != "threads"]  # N or auto:
    # tests/test_threads.py
    assert len(numeric) >= at_least
    for action in numeric:
        assert " ".join(action.help.split()) in shown, action.option_strings
        match = RANGE.search(action.help)
        assert match, f"{action.option_strings} shows no range: {action.help}"
        assert action.metavar in ("N", "X"), action.option_strings         # whole number or real number
        kind = int if action.metavar == "N" else float
        low, high = (kind(text.replace(",", "")) for text in match.groups())
        assert action.type(str(low)) == low and action.type(str(high)) == high, action.option_strings
        below, above = (low - 1, high + 1) if kind is int else (math.nextafter(low, -math.inf),
                                                                 math.nextafter(high, math.inf))
        for outside in (below, above):
            with pytest.raises(argparse.ArgumentTypeError):
                action.type(repr(outside))
    assert "e+" not in shown                # no number is shown as 9.22337e+18


def test_six_items_are_enough_to_train_and_five_are_not(tmp_path, capsys):
    six = tmp_path / "six.txt"
    six.write_text("\n".join(NAMES.split()[:6]) + "\n")
    status, out, _ = run_main(["train", "-i", str(six), "--max-steps", "5", "-o", str(tmp_path / "six")], capsys)
    assert status == 0 and out.startswith("6 items")
    six.write_text("\n".join(NAMES.split()[:5]) + "\n")
    status, _, err = run_main(["train", "-i", str(six), "--max-steps", "5", "-o", str(tmp_path / "five")], capsys)
    assert_one_error_line(status, err, "5 items are too few", "need at least 6")


@pytest.mark.parametrize("command", ["train", "sample"])
def test_the_seed_limit_is_printed_in_full(command, capsys, monkeypatch):
    shown = shown_help(command, capsys, monkeypatch)
    assert re.search(r"--seed N .*0 to 9,223,372,036,854,775,807\)", shown), shown


@pytest.mark.parametrize("argv", [
    ["train", "--batch-size", "0"],
    ["train", "--optimizer", "adam"],
    ["sample", "-n", "many"],
    ["eval", "--device", "tpu"],
    ["eval", "--bogus"],
    ["frobnicate"],
], ids=["train range", "train choice", "sample number", "eval choice", "eval unknown flag", "bad subcommand"])
def test_flag_errors_say_handprop_error_like_every_other_error(argv, capsys):
    status, _, err = run_main(argv, capsys)
    assert_one_error_line(status, err)


# --- finding 1: Ctrl-C while torch loads --------------------------------------------------------------------------

def console_script_command():
    """What the installed `handprop` script runs: the [project.scripts] entry point, called as pip's wrapper does."""
    module, function = re.search(r'^handprop = "([\w.]+):(\w+)"', PYPROJECT.read_text(), re.MULTILINE).groups()
    return [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())"]


def torch_is_loading(pid):
    """Whether the process has mapped torch's libraries: it is inside the import that handprop guards."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.3, 1.0, 4.0])
@pytest.mark.parametrize("entry", ["python -m handprop", "console script"])
def test_ctrl_c_while_loading_is_one_line_and_exit_130(entry, delay, tmp_path):
    """SIGINT at several moments from inside torch's import to the command reading its (silent) stdin."""
    command = [sys.executable, "-m", "handprop"] if entry == "python -m handprop" else console_script_command()
    process = subprocess.Popen([*command, "train", "-i", "-", "-o", str(tmp_path / "out")], cwd=tmp_path,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not torch_is_loading(process.pid):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.001)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, (process.returncode, err)
    assert err == "handprop: interrupted\n" and out == ""
    assert not (tmp_path / "out").exists()


# --- finding 2: standard input, pipes and FIFOs -------------------------------------------------------------------

def saved_corpus(work_dir):
    return json.loads((work_dir / "config.json").read_text())["corpus"]


def test_a_corpus_from_standard_input_trains_and_must_be_given_again(tmp_path, capsys, monkeypatch):
    def stdin(text):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))

    work_dir = tmp_path / "out"
    stdin(NAMES)
    status, out, _ = run_main(["train", "-i", "-", "--max-steps", "5", "-o", str(work_dir)], capsys)
    assert status == 0 and "12 items" in out
    assert saved_corpus(work_dir)["path"] == "<stdin>" and saved_corpus(work_dir)["rereadable"] is False
    before = sorted((p.name, p.read_bytes()) for p in work_dir.iterdir())
    for argv in (["eval", "-o", str(work_dir)], ["train", "--resume", "--max-steps", "8", "-o", str(work_dir)]):
        status, _, err = run_main(argv, capsys)
        assert_one_error_line(status, err, "<stdin>", "-i")
    assert sorted((p.name, p.read_bytes()) for p in work_dir.iterdir()) == before
    stdin(NAMES)
    status, out, _ = run_main(["eval", "-i", "-", "-o", str(work_dir)], capsys)
    assert status == 0 and out.startswith("train ")
    stdin(NAMES + "\nzora\n")
    status, _, err = run_main(["eval", "-i", "-", "-o", str(work_dir)], capsys)
    assert_one_error_line(status, err, "not the corpus")
    stdin(NAMES)
    status, out, _ = run_main(["train", "--resume", "-i", "-", "--max-steps", "8", "-o", str(work_dir)], capsys)
    assert status == 0 and load_checkpoint(work_dir / "model.safetensors").step == 8


def test_a_pipe_given_by_path_is_recorded_as_read_once(tmp_path, capsys):
    read, write = os.pipe()                 # /dev/fd/N is what /dev/stdin and <(...) are: a pipe behind a path
    os.write(write, NAMES.encode())
    os.close(write)
    try:
        status, _, _ = run_main(["train", "-i", f"/dev/fd/{read}", "--max-steps", "5", "-o", str(tmp_path)], capsys)
    finally:
        os.close(read)
    assert status == 0 and saved_corpus(tmp_path)["rereadable"] is False
    status, _, err = run_main(["eval", "-o", str(tmp_path)], capsys)
    assert_one_error_line(status, err, "cannot be read a second time", "-i")


def test_eval_of_a_run_trained_from_a_fifo_refuses_instead_of_hanging(tmp_path, capsys):
    fifo = tmp_path / "names.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text(NAMES))   # open() waits for the reader
    writer.start()
    status, _, _ = run_main(["train", "-i", str(fifo), "--max-steps", "5", "-o", str(tmp_path / "out")], capsys)
    writer.join()
    assert status == 0 and saved_corpus(tmp_path / "out") | {"sha256": ""} == {
        "path": str(fifo), "sha256": "", "items": 12, "rereadable": False}
    # a subprocess with a time limit, because the old behaviour was to block on the FIFO forever
    result = subprocess.run([sys.executable, "-m", "handprop", "eval", "-o", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert_one_error_line(result.returncode, result.stderr, str(fifo), "-i")


def test_checkpoints_from_before_rereadable_load_as_a_file(trained_dir):
    checkpoint = load_checkpoint(trained_dir / "model.safetensors")
    saved = metadata(checkpoint)
    del saved["corpus"]["rereadable"]        # what a checkpoint written before this field holds
    assert from_metadata(saved, trained_dir).spec.corpus == checkpoint.spec.corpus
    assert checkpoint.spec.corpus.rereadable is True


# --- finding 2: --max-length is the whole sample ------------------------------------------------------------------

def test_max_length_counts_the_prefix(trained_dir):
    checkpoint = load_checkpoint(trained_dir / "model.safetensors")
    spec = checkpoint.spec
    names = generate(checkpoint.model, spec.vocab, 3, 500, torch.Generator().manual_seed(0), 5, prefix="mar")
    assert all(n.startswith("mar") for n in names)
    assert max(len(n) for n in names) == 5  # many names go on past "mar": they stop at 5 characters in all


@pytest.mark.parametrize("max_length", ["2", "3"])
def test_max_length_not_longer_than_the_prefix_is_refused(max_length, trained_dir, capsys):
    status, out, err = run_main(["sample", "--prefix", "mar", "--max-length", max_length, "-o", str(trained_dir)],
                                capsys)
    assert_one_error_line(status, err, f"--max-length {max_length}", "prefix")
    assert out == ""


def test_the_default_max_length_leaves_room_after_any_prefix(trained_dir, capsys):
    longest = load_checkpoint(trained_dir / "model.safetensors").spec.longest_item
    prefix = "an" * longest                 # longer than twice the longest item, the old default
    status, out, _ = run_main(["sample", "--prefix", prefix, "-n", "200", "--seed", "1", "-o", str(trained_dir)],
                              capsys)
    names = out.splitlines()
    assert status == 0 and len(names) == 200 and all(n.startswith(prefix) for n in names)
    assert any(len(n) > len(prefix) for n in names) and max(len(n) for n in names) <= len(prefix) + 2 * longest


# --- finding 3: sampling as a new user tries it -------------------------------------------------------------------

def test_a_prefix_longer_than_the_block_size_conditions_on_its_last_characters(trained_dir):
    checkpoint = load_checkpoint(trained_dir / "model.safetensors")
    vocab, block_size = checkpoint.spec.vocab, checkpoint.spec.model_config.block_size
    long_prefix, tail = "zzkarlmar", "mar"
    assert block_size == len(tail) < len(long_prefix)

    def suffixes(prefix):
        names = generate(checkpoint.model, vocab, block_size, 300, torch.Generator().manual_seed(7),
                         len(prefix) + 30, prefix)
        assert all(n.startswith(prefix) for n in names)
        return [n[len(prefix):] for n in names]

    assert suffixes(long_prefix) == suffixes(tail)


def buffered_env():
    """The environment without PYTHONUNBUFFERED, so stdout is block-buffered as it is for most users."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


@pytest.mark.parametrize("argv", [["sample", "-n", "5"], ["sample", "-n", "12000"], ["eval"]],
                         ids=["sample 5", "sample 12000", "eval"])
def test_writing_into_a_closed_pipe_is_quiet(argv, trained_dir, tmp_path):
    """`handprop sample | true`: the reader is gone before anything is written; no traceback, no noise, 141."""
    process = subprocess.Popen([sys.executable, "-m", "handprop", *argv, "-o", str(trained_dir)], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=buffered_env())
    process.stdout.close()                  # the reader exits before torch has even loaded
    err = process.stderr.read().decode()
    process.wait(timeout=120)
    assert err == "" and process.returncode == 128 + signal.SIGPIPE, (process.returncode, err)


def test_sample_piped_into_head(trained_dir, tmp_path):
    result = subprocess.run(f"{sys.executable} -m handprop sample -n 12000 -o {trained_dir} | head -1", shell=True,
                            cwd=tmp_path, capture_output=True, text=True, timeout=120, env=buffered_env())
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 1 and result.stderr == "", result
