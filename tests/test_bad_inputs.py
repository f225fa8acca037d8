"""Every input a user can get wrong: exit status 2, one line on stderr, no traceback, no file touched."""

import subprocess
import sys

import pytest
import torch

from handprop.checkpoint import load_checkpoint, save_checkpoint
from handprop.cli import main

NAMES = "\n".join(["anna", "bob", "carla", "dora", "emil", "fritz", "gina", "hugo", "ines", "jonas", "karl", "lena"])


@pytest.fixture
def unfinished_dir(trained_dir, tmp_path):
    """A copy of the trained run, marked as stopped part-way, so --resume would continue it."""
    checkpoint = load_checkpoint(trained_dir / "model.safetensors")
    work_dir = tmp_path / "unfinished"
    work_dir.mkdir()
    checkpoint.finished = False
    save_checkpoint(work_dir / "model.safetensors", checkpoint)
    return work_dir


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


# (case id, argv from (tmp_path, trained_dir, unfinished_dir), the directory that must stay untouched, words in the error)
CASES = [
    ("missing file", lambda t, d, u: ["train", "-i", str(t / "nope.txt"), "-o", str(t / "out")], "out", "not found"),
    ("empty file", lambda t, d, u: ["train", "-i", write(t, "e.txt", b""), "-o", str(t / "out")], "out", "empty"),
    ("whitespace only", lambda t, d, u: ["train", "-i", write(t, "w.txt", b" \n\t\n\r\n"), "-o", str(t / "out")], "out", "empty"),
    ("binary", lambda t, d, u: ["train", "-i", write(t, "b.bin", b"ab\x00\x01\x02cd"), "-o", str(t / "out")], "out", "NUL"),
    ("not UTF-8", lambda t, d, u: ["train", "-i", write(t, "l.txt", "zoë\n".encode("latin-1")), "-o", str(t / "out")], "out", "UTF-8"),
    ("line too long", lambda t, d, u: ["train", "-i", write(t, "long.txt", b"ab\n" + b"x" * 1001), "-o", str(t / "out")], "out", "limited to 1000"),
    ("too few items", lambda t, d, u: ["train", "-i", write(t, "few.txt", b"ann\nbob\ncid\n"), "-o", str(t / "out")], "out", "too few"),
    ("five items", lambda t, d, u: ["train", "-i", write(t, "five.txt", b"ann\nbob\ncid\ndan\neve\n"),
                                    "-o", str(t / "out")], "out", "need at least 6"),
    ("max length within the prefix", lambda t, d, u: ["sample", "--prefix", "emma", "--max-length", "4", "-o", str(d)],
     "trained", "--max-length 4"),
    ("zero steps", lambda t, d, u: ["train", "--max-steps", "0", "-o", str(t / "out")], "out", "--max-steps"),
    ("negative batch", lambda t, d, u: ["train", "--batch-size", "-3", "-o", str(t / "out")], "out", "--batch-size"),
    ("absurd lr", lambda t, d, u: ["train", "--lr", "1e6", "-o", str(t / "out")], "out", "--lr"),
    ("nan lr", lambda t, d, u: ["train", "--lr", "nan", "-o", str(t / "out")], "out", "--lr"),
    ("word for a number", lambda t, d, u: ["train", "--n-hidden", "lots", "-o", str(t / "out")], "out", "--n-hidden"),
    ("absurd width", lambda t, d, u: ["train", "--n-hidden", "100000000", "-o", str(t / "out")], "out", "--n-hidden"),
    ("zero block size", lambda t, d, u: ["train", "--block-size", "0", "-o", str(t / "out")], "out", "--block-size"),
    ("zero samples", lambda t, d, u: ["sample", "-n", "0", "-o", str(d)], "trained", "--num-samples"),
    ("unknown prefix characters", lambda t, d, u: ["sample", "--prefix", "x!7", "-o", str(d)], "trained", "'!7'"),
    ("unwritable output", lambda t, d, u: ["train", "-i", write(t, "ok.txt", NAMES.encode()), "-o", write(t, "afile", b"x") + "/out",
                                           "--max-steps", "5"], "afile", "cannot write"),
    ("run already there", lambda t, d, u: ["train", "--max-steps", "5", "-o", str(d)], "trained", "--resume"),
    ("resume other corpus", lambda t, d, u: ["train", "--resume", "-i", write(t, "other.txt", NAMES.encode()), "-o", str(u)], "unfinished", "not the corpus"),
    ("resume corpus with new characters", lambda t, d, u: ["train", "--resume", "-i", write(t, "new.txt", NAMES.encode() + b"\nzoe!\n"), "-o", str(u)],
     "unfinished", "not the corpus"),
    ("resume other settings", lambda t, d, u: ["train", "--resume", "--n-hidden", "10", "-o", str(u)], "unfinished", "n_hidden"),
    ("eval other corpus", lambda t, d, u: ["eval", "-i", write(t, "other.txt", NAMES.encode()), "-o", str(d)], "trained", "not the corpus"),
    ("no checkpoint", lambda t, d, u: ["sample", "-o", str(t / "out")], "out", "no checkpoint"),
    ("corrupt checkpoint", lambda t, d, u: ["sample", "-o", str(t / "out")], "out", "not a readable checkpoint"),
    ("cuda without a gpu", lambda t, d, u: ["train", "--device", "cuda", "--max-steps", "5", "-o", str(t / "out")], "out", "CUDA"),
]


def snapshot(directory):
    """Every file under directory with its bytes (None when the directory does not exist)."""
    if not directory.exists():
        return None
    if directory.is_file():
        return directory.read_bytes()
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("argv, watched, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_and_exit_2_with_nothing_written(argv, watched, words, tmp_path, trained_dir,
                                                                     unfinished_dir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)      # the same on a GPU machine
    if words == "not a readable checkpoint":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    argv = argv(tmp_path, trained_dir, unfinished_dir)         # writes the case's input files
    directory = {"trained": trained_dir, "unfinished": unfinished_dir}.get(watched, tmp_path / watched)
    before = snapshot(directory)
    try:
        status = main(argv)
    except SystemExit as e:                 # argparse rejects a flag by exiting
        status = e.code
    err = capsys.readouterr().err
    assert status == 2
    assert len(err.splitlines()) == 1 and err.startswith("handprop") and "Traceback" not in err, err
    assert words in err, err
    assert snapshot(directory) == before


@pytest.mark.parametrize("args", [
    ["train", "-i", "missing.txt"],
    ["train", "--batch-size", "0"],
    ["sample", "-o", "no-such-dir"],
])
def test_the_real_process_prints_one_line_and_exits_2(args, tmp_path):
    result = subprocess.run([sys.executable, "-m", "handprop", *args], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []
