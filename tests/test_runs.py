"""What a new user meets running, stopping, resuming and extending runs (issue 8): each finding reproduced."""

import builtins
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import run_main as cli

from handprop import checkpoint as checkpoint_module
from handprop import train as train_module
from handprop.checkpoint import load_checkpoint, save_checkpoint
from handprop.cli import main

FAST = ["--save-every", "10", "--log-every", "10"]


def command(*args):
    return [sys.executable, "-m", "handprop", *args]



def one_error_line(err, *words):
    """err is one `handprop: error:` line holding every word, with no traceback."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("handprop: error: ") and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, err)
    return lines[0]


def snapshot(directory):
    """Every file under directory with its bytes (None when the directory does not exist)."""
    if not directory.exists():
        return None
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def saved_tensors(path):
    checkpoint = load_checkpoint(path)
    return checkpoint.model.parameters() | checkpoint.model.buffers()


def write_corpus(path, items, seed=0):
    """A file of `items` random lowercase words, 3 to 12 letters each."""
    rng, letters = random.Random(seed), "abcdefghijklmnopqrstuvwxyz"
    path.write_text("".join("".join(rng.choices(letters, k=rng.randint(3, 12))) + "\n" for _ in range(items)))
    return path


# 1. --batch-size 1 with Bessel-corrected BatchNorm divided 0 by 0: a nan loss blamed on the learning rate


def test_batch_size_1_with_batchnorm_is_refused_before_anything_is_written(tmp_path, capsys):
    status, _, err = cli(["train", "-b", "1", "-o", tmp_path / "out"], capsys)
    assert status == 2
    one_error_line(err, "BatchNorm", "at least 2 examples", "--no-batchnorm")
    assert "learning rate" not in err and not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()            # an existing work dir stays as it was too
    assert cli(["train", "-b", "1", "-o", tmp_path / "empty"], capsys)[0] == 2
    assert snapshot(tmp_path / "empty") == {}
    status, out, _ = cli(["train", "-b", "1", "--no-batchnorm", "--max-steps", "3", "-o", tmp_path / "nobn"], capsys)
    assert status == 0 and "nan" not in out   # what the error suggests does train


# 2. --resume on a finished run: the same rules as on an unfinished one, and a larger --max-steps extends it


@pytest.fixture(scope="module")
def finished_300(tmp_path_factory):
    """A work dir holding a finished 300-step run of the default model."""
    work_dir = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "-o", str(work_dir), "--max-steps", "300", "--save-every", "100", "--log-every", "100"]) == 0
    return work_dir


def copy_run(source, target, finished=True):
    """A copy of a run's directory; finished=False marks its checkpoint as stopped before its final phase."""
    shutil.copytree(source, target)
    if not finished:
        checkpoint = load_checkpoint(target / "model.safetensors")
        checkpoint.finished, checkpoint.losses = False, None
        save_checkpoint(target / "model.safetensors", checkpoint)
    return target


CHANGED = [  # (flags a resume must refuse, words in the error)
    (["--max-steps", "6000", "--lr", "5"], "differ from it: lr"),
    (["--lr", "5"], "differ from it: lr"),
    (["--model", "wavenet"], "differ from it: kind"),
    (["-b", "64"], "differ from it: batch_size"),
    (["--n-hidden", "10"], "differ from it: n_hidden"),
    (["--no-batchnorm"], "differ from it: batchnorm"),
    (["-i", "OTHER"], "not the corpus"),
]


@pytest.mark.parametrize("finished", [True, False], ids=["finished", "unfinished"])
@pytest.mark.parametrize("flags, words", CHANGED, ids=[" ".join(c[0]) for c in CHANGED])
def test_resume_refuses_changed_settings_on_finished_and_unfinished_runs_alike(finished_300, tmp_path, capsys,
                                                                               finished, flags, words):
    work_dir = copy_run(finished_300, tmp_path / "run", finished)
    other = write_corpus(tmp_path / "other.txt", 100)
    before = snapshot(work_dir)
    status, out, err = cli(["train", "--resume", "-o", work_dir, *[str(other) if f == "OTHER" else f for f in flags]],
                           capsys)
    assert status == 2 and out == ""
    one_error_line(err, words)
    assert snapshot(work_dir) == before


def test_a_larger_max_steps_extends_a_finished_run(finished_300, tmp_path, capsys):
    work_dir = copy_run(finished_300, tmp_path / "run")
    status, out, _ = cli(["train", "--resume", "-o", work_dir, "--max-steps", "400", "--log-every", "50"], capsys)
    assert status == 0
    lines = out.splitlines()
    assert "resuming at step 300" in lines[1] and lines[2].startswith("threads: ")
    assert lines[3].startswith("step 350/400") and "lr 0.01 " in lines[3]
    assert lines[4].startswith("step 400/400")
    assert lines[5].startswith("setting BatchNorm statistics") and lines[6].startswith("evaluating on the full")
    checkpoint = load_checkpoint(work_dir / "model.safetensors")
    assert checkpoint.step == 400 and checkpoint.finished and checkpoint.spec.train_config.max_steps == 400
    losses = checkpoint.losses
    assert lines[7].startswith("wall time ") and lines[7].endswith(" for 100 steps")     # the steps this command ran
    assert lines[8] == (f"train loss {losses['train']:.4f} | val loss {losses['val']:.4f} | "
                        f"test loss {losses['test']:.4f}")
    readable = json.loads((work_dir / "config.json").read_text())
    assert readable["step"] == 400 and readable["finished"] and readable["losses"] == losses
    # resuming it again without a larger --max-steps says what it holds, losses in the order train, val, test
    status, out, _ = cli(["train", "--resume", "-o", work_dir], capsys)
    assert status == 0
    assert out.startswith(f"{work_dir} holds a finished run (400 steps): train loss {losses['train']:.4f} | "
                          f"val loss {losses['val']:.4f} | test loss {losses['test']:.4f}"), out
    before = snapshot(work_dir)
    status, _, err = cli(["train", "--resume", "-o", work_dir, "--max-steps", "350"], capsys)
    assert status == 2
    one_error_line(err, "at step 400 already", "--max-steps 350")
    assert snapshot(work_dir) == before


def interrupt_at_recalibration(monkeypatch):
    """SIGINT arrives while the final BatchNorm statistics are computed (a real signal, to this process)."""
    real = train_module.recalibrate_batchnorm

    def interrupted(model, X):
        os.kill(os.getpid(), signal.SIGINT)
        real(model, X)

    monkeypatch.setattr(train_module, "recalibrate_batchnorm", interrupted)


def test_extending_a_finished_run_equals_extending_it_stopped_before_its_final_phase(finished_300, tmp_path, capsys,
                                                                                     monkeypatch):
    # The final phase (BatchNorm statistics, evaluation, save) leaves nothing behind that changes further training:
    # training runs on batch statistics and the last recalibration replaces every running statistic.
    # It is NOT a straight 400-step run: the lecture's step decay falls at lr_decay_at * max_steps, at step 150 in
    # the 300-step run (steps 150-299 at lr 0.01), at step 200 in a 400-step one.
    extended = copy_run(finished_300, tmp_path / "extended")
    assert cli(["train", "--resume", "-o", extended, "--max-steps", "400"], capsys)[0] == 0
    stopped = tmp_path / "stopped"
    with monkeypatch.context() as m:
        interrupt_at_recalibration(m)
        status, _, err = cli(["train", "-o", stopped, "--max-steps", "300", "--save-every", "100"], capsys)
    assert status == 130 and "step 300 is kept" in err
    assert not load_checkpoint(stopped / "model.safetensors").finished
    assert cli(["train", "--resume", "-o", stopped, "--max-steps", "400"], capsys)[0] == 0
    a, b = saved_tensors(extended / "model.safetensors"), saved_tensors(stopped / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    straight = tmp_path / "straight"
    assert cli(["train", "-o", straight, "--max-steps", "400"], capsys)[0] == 0
    c = saved_tensors(straight / "model.safetensors")
    assert not torch.equal(a["2.weight"], c["2.weight"])    # the other schedule


# 3. --n-layers was ignored for wavenet while config.json recorded it


def test_a_wavenets_depth_follows_its_block_size_and_a_contrary_n_layers_is_refused(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "small.txt", 2000)    # a wavenet's final evaluation of names.txt takes a while
    argv = ["train", "-i", corpus, "--model", "wavenet", "--block-size", "16", "--max-steps", "2", "-o", tmp_path / "w"]
    status, out, _ = cli(argv, capsys)
    assert status == 0 and "wavenet, 4 hidden layers of 128, block 16" in out
    readable = json.loads((tmp_path / "w" / "config.json").read_text())
    assert readable["model_config"]["n_layers"] == 4 and readable["model_config"]["block_size"] == 16
    assert load_checkpoint(tmp_path / "w" / "model.safetensors").spec.model_config.n_layers == 4
    argv = ["train", "-i", corpus, "--model", "wavenet", "--n-layers", "2", "-o", tmp_path / "w2"]
    status, _, err = cli(argv, capsys)
    assert status == 2 and not (tmp_path / "w2").exists()
    one_error_line(err, "block size", "block 8 gives 3 hidden layers, not 2")
    argv = ["train", "-i", corpus, "--model", "wavenet", "--n-layers", "3", "--max-steps", "1", "-o", tmp_path / "w3"]
    status, out, _ = cli(argv, capsys)
    assert status == 0 and "3 hidden layers" in out    # a --n-layers that agrees is fine


# 4. -w with SGD was saved and did nothing


def test_weight_decay_with_sgd_is_refused(tmp_path, capsys):
    status, _, err = cli(["train", "-w", "0.5", "-o", tmp_path / "out"], capsys)
    assert status == 2 and not (tmp_path / "out").exists()
    one_error_line(err, "adamw only", "--optimizer adamw")
    status, _, _ = cli(["train", "-w", "0.5", "--optimizer", "adamw", "--max-steps", "2", "-o", tmp_path / "ok"],
                       capsys)
    assert status == 0
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["train_config"]["weight_decay"] == 0.5


# 5. a one-step run took its only step at the decayed rate


def test_a_one_step_run_takes_its_step_at_the_undecayed_learning_rate(tmp_path, capsys):
    status, out, _ = cli(["train", "--max-steps", "1", "-o", tmp_path / "out"], capsys)
    step_lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert status == 0 and len(step_lines) == 1
    assert step_lines[0].startswith("step 1/1 | loss ") and " | lr 0.1 | " in step_lines[0], step_lines


# 6. SIGINT during the final BatchNorm statistics and evaluation of a big corpus lost the run's last steps


def test_sigint_during_the_final_phase_keeps_the_last_step_and_resume_finishes_it(tmp_path):
    corpus = write_corpus(tmp_path / "big.txt", 60_000)    # 0.5 MB: the final phase lasts a good second
    work_dir = tmp_path / "run"
    cmd = command("train", "-i", corpus, "-o", work_dir, "--max-steps", "10", "--n-hidden", "32")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("setting BatchNorm statistics"):
            proc.send_signal(signal.SIGINT)
            break
    proc.stdout.close()
    proc.wait(timeout=60)
    stderr = proc.stderr.read()
    assert seen[-1].startswith("setting BatchNorm statistics"), seen
    assert proc.returncode == 130
    lines = stderr.splitlines()
    assert len(lines) == 1 and "SIGINT" in lines[0] and "step 10 is kept" in lines[0], stderr
    assert f"handprop train --resume -o {work_dir}" in lines[0]
    checkpoint = load_checkpoint(work_dir / "model.safetensors")
    assert checkpoint.step == 10 and not checkpoint.finished
    assert not list(work_dir.glob(".*tmp*"))
    resumed = subprocess.run(command("train", "--resume", "-o", work_dir), capture_output=True, text=True, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 10" in resumed.stdout and resumed.stdout.splitlines()[-1].startswith("train loss ")
    checkpoint = load_checkpoint(work_dir / "model.safetensors")
    assert checkpoint.step == 10 and checkpoint.finished


@pytest.mark.parametrize("finished", [False, True], ids=["the last step's save", "the final save"])
def test_sigint_during_the_last_saves_is_obeyed_once_the_save_is_complete(tmp_path, capsys, monkeypatch, finished):
    real = train_module.write_readable_config

    def write_then_interrupt(path, checkpoint):     # the signal lands inside the save, before its last file
        if checkpoint.step == 20 and checkpoint.finished == finished:
            os.kill(os.getpid(), signal.SIGINT)
        real(path, checkpoint)

    monkeypatch.setattr(train_module, "write_readable_config", write_then_interrupt)
    status, out, err = cli(["train", "-o", tmp_path / "run", "--max-steps", "20", *FAST], capsys)
    assert status == 130 and len(err.splitlines()) == 1
    checkpoint = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert checkpoint.step == 20 and checkpoint.finished == finished
    assert json.loads((tmp_path / "run" / "config.json").read_text())["finished"] == finished
    if finished:
        assert "SIGINT during the final save: the run finished and is saved (train loss " in err
    else:                                   # stopped before the long final phase, which --resume does
        assert "SIGINT at step 20: checkpoint saved; continue with: handprop train --resume" in err
        assert "setting BatchNorm" not in out


# 7. config.json appeared only once a run finished


def test_config_json_is_written_with_the_step_0_checkpoint(tmp_path):
    work_dir = tmp_path / "run"
    cmd = command("train", "-o", work_dir, "--max-steps", "100000", "--log-every", "1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("step "):        # the step-0 save comes before the first step
            proc.kill()
            break
    proc.stdout.close()
    proc.wait(timeout=60)
    readable = json.loads((work_dir / "config.json").read_text())
    assert readable["step"] == 0 and not readable["finished"] and readable["train_config"]["max_steps"] == 100000
    assert load_checkpoint(work_dir / "model.safetensors").step == 0


# 8. a work dir that stops being writable, or a disk that fills up, mid-run: one error line, the last good checkpoint


class FullDisk:
    """A file that takes half of what is written, then fails as a full disk does."""

    def __init__(self, path):
        self.file = builtins.open(path, "wb")  # noqa: SIM115 (closed by __exit__, as open's own file is)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def write(self, data):
        self.file.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def failing_writes(monkeypatch, name, nth, error):
    """From the nth write of the file `name` on, every write in handprop fails with error (EACCES or ENOSPC)."""
    seen = []

    def open_(path, *args, **kwargs):
        target = Path(path).name.split(".tmp-")[0].removeprefix(".")    # atomic writes go through '.NAME.tmp-PID'
        seen.extend([1] if target == name else [])
        if len(seen) >= nth:
            if error == errno.EACCES:       # as a directory made read-only or immutable: no file is created
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return FullDisk(path)
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "open", open_, raising=False)


# (file whose write fails, at its nth write, error, the step of the checkpoint kept); saves at steps 0, 10, 20, 30
SAVE_FAILURES = [
    ("model.safetensors", 3, errno.EACCES, 10),
    ("model.safetensors", 3, errno.ENOSPC, 10),
    ("config.json", 3, errno.ENOSPC, 20),              # the checkpoint of step 20 was complete
    ("diagnostics.safetensors", 2, errno.ENOSPC, 10),
    ("model.safetensors", 1, errno.ENOSPC, None),      # the very first save
    ("model.safetensors", 5, errno.ENOSPC, 30),        # the finished run's save, after the last step's
]


@pytest.mark.parametrize("name, nth, error, kept", SAVE_FAILURES,
                         ids=[f"{n} {k} {errno.errorcode[e]}" for n, k, e, _ in SAVE_FAILURES])
def test_a_failed_save_is_one_error_line_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch,
                                                                           name, nth, error, kept):
    work_dir = tmp_path / "run"
    flags = ["--max-steps", "30", *FAST, *(["--diagnostics-every", "5"] if name.startswith("diagnostics") else [])]
    with monkeypatch.context() as m:
        failing_writes(m, name, nth, error)
        status, _, err = cli(["train", "-o", work_dir, *flags], capsys)
    assert status == 2
    line = one_error_line(err, f"cannot save in {work_dir}: {os.strerror(error)}")
    assert not [p for p in work_dir.iterdir() if ".tmp-" in p.name]
    if kept is None:
        assert "no checkpoint to resume was saved" in line and not (work_dir / "model.safetensors").exists()
        return
    assert f"the last good checkpoint (step {kept}) is kept" in line
    checkpoint = load_checkpoint(work_dir / "model.safetensors")
    assert checkpoint.step == kept and not checkpoint.finished
    status, out, _ = cli(["train", "--resume", "-o", work_dir], capsys)        # and the run goes on from there
    assert status == 0 and f"resuming at step {kept}" in out
    assert load_checkpoint(work_dir / "model.safetensors").finished


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """A short run with recorded diagnostics and no report drawn yet."""
    work_dir = tmp_path_factory.mktemp("recorded") / "run"
    assert main(["train", "-o", str(work_dir), "--max-steps", "30", "--diagnostics-every", "5", *FAST]) == 0
    return work_dir


REPORT_FAILURES = [("loss.png", errno.EACCES), ("weight_gradients.png", errno.ENOSPC), ("report.html", errno.ENOSPC)]


@pytest.mark.parametrize("name, error", REPORT_FAILURES, ids=[f"{n} {errno.errorcode[e]}" for n, e in REPORT_FAILURES])
def test_diagnose_that_cannot_write_is_one_error_line_and_writes_no_figure(recorded_run, tmp_path, capsys,
                                                                          monkeypatch, name, error):
    work_dir = copy_run(recorded_run, tmp_path / "run")
    before = snapshot(work_dir)
    with monkeypatch.context() as m:
        failing_writes(m, name, 1, error)
        status, out, err = cli(["diagnose", "-o", work_dir], capsys)
    assert status == 2 and out == ""
    one_error_line(err, f"cannot write the report in {work_dir}: {os.strerror(error)}")
    assert snapshot(work_dir) == before     # not half the figures: none, and no temporary file
    status, out, _ = cli(["diagnose", "-o", work_dir], capsys)
    assert status == 0 and len(list(work_dir.glob("*.png"))) == 5 and (work_dir / "report.html").is_file()


# 9. two trains on one work dir at once: the last writer won


def test_a_second_train_on_a_work_dir_in_use_is_refused_until_the_first_ends(tmp_path, capsys):
    work_dir = tmp_path / "run"
    cmd = command("train", "-o", work_dir, "--max-steps", "1000000", "--save-every", "1000000", "--log-every", "1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step "):    # training: the step-0 checkpoint is on disk
                break
        for argv in (["train", "-o", work_dir, "--max-steps", "5"], ["train", "--resume", "-o", work_dir]):
            status, _, err = cli(argv, capsys)
            assert status == 2
            one_error_line(err, f"another handprop train is using {work_dir}")
        assert cli(["sample", "-o", work_dir, "-n", "3"], capsys)[0] == 0    # readers may read meanwhile
        assert cli(["eval", "-o", work_dir], capsys)[0] == 0
    finally:
        proc.kill()                         # a crash: the lock goes with the process
        proc.stdout.close()
        proc.wait(timeout=60)
    status, out, _ = cli(["train", "--resume", "-o", work_dir, "--max-steps", "3"], capsys)
    assert status == 0 and "resuming at step 0" in out


@pytest.mark.parametrize("resume", [False, True], ids=["new run", "resume"])
def test_a_run_saved_by_another_train_while_this_one_started_is_not_overwritten(finished_300, tmp_path, capsys,
                                                                              monkeypatch, resume):
    work_dir = copy_run(finished_300, tmp_path / "run", finished=False) if resume else tmp_path / "run"
    real_prepare = train_module.prepare

    def prepare_while_another_saves(*args):
        prepared = real_prepare(*args)
        work_dir.mkdir(exist_ok=True)       # meanwhile another handprop train saves a run there, and exits
        shutil.copy(finished_300 / "model.safetensors", work_dir / "model.safetensors")
        return prepared

    monkeypatch.setattr(train_module, "prepare", prepare_while_another_saves)
    status, _, err = cli(["train", "-o", work_dir, "--max-steps", "400", *(["--resume"] if resume else [])], capsys)
    assert status == 2
    one_error_line(err, "was saved by another handprop train" if resume else "another handprop train saved it")
    assert (work_dir / "model.safetensors").read_bytes() == (finished_300 / "model.safetensors").read_bytes()


# 10. -o naming a file said "File exists"


@pytest.mark.parametrize("command", ["train", "sample", "eval", "diagnose"])
def test_a_work_dir_that_is_a_file_is_named_as_one(tmp_path, capsys, command):
    path = tmp_path / "notes.txt"
    path.write_text("mine\n")
    status, _, err = cli([command, "-o", path], capsys)
    assert status == 2
    one_error_line(err, f"{path} is a file, not a directory")
    assert path.read_text() == "mine\n"
