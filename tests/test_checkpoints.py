"""Checkpoints survive kills and interrupts, resume bit-identically, and refuse anything foreign."""

import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import run_main
from safetensors import safe_open
from safetensors.torch import save_file

from handprop.checkpoint import load_checkpoint, metadata, write_checkpoint
from handprop.cli import main
from handprop.data import bundled_corpus_path
from handprop.errors import UserError
from handprop.losses import CrossEntropy

RUN = ["--max-steps", "1500", "--save-every", "100", "--log-every", "1", "--n-hidden", "64"]


def handprop(*args):
    return [sys.executable, "-m", "handprop", *args]


def train_until(work_dir, kill_at, sig, resume):
    """Start training, send sig once it reports step kill_at (or later); return (exit status, last step seen)."""
    cmd = handprop("train", "-o", str(work_dir), *RUN, *(["--resume"] if resume else []))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    step = 0
    for line in proc.stdout:
        if line.startswith("step "):
            step = int(line.split()[1].split("/")[0])
            if step >= kill_at:
                proc.send_signal(sig)
                break
    proc.stdout.close()                     # the log's reader goes away too, as in `handprop train | head`
    proc.wait(timeout=60)
    return proc.returncode, step, proc.stderr.read()


def final_tensors(work_dir):
    checkpoint = load_checkpoint(work_dir / "model.safetensors")
    assert checkpoint.finished
    return checkpoint.model.parameters() | checkpoint.model.buffers()


def test_sigkill_at_five_random_steps_then_resume_is_bitwise_identical(tmp_path):
    subprocess.run(handprop("train", "-o", str(tmp_path / "straight"), *RUN), check=True, capture_output=True)
    kills = sorted(random.Random().sample(range(20, 1480), 5))
    for i, kill_at in enumerate(kills):
        status, step, _ = train_until(tmp_path / "killed", kill_at, signal.SIGKILL, resume=i > 0)
        assert status == -signal.SIGKILL and step >= kill_at, (kill_at, status, step)
        load_checkpoint(tmp_path / "killed" / "model.safetensors")  # whatever the moment, it loads
    subprocess.run(handprop("train", "-o", str(tmp_path / "killed"), "--resume"), check=True, capture_output=True)
    straight, resumed = final_tensors(tmp_path / "straight"), final_tensors(tmp_path / "killed")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), (name, kills)


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_saves_a_loadable_checkpoint_and_exits_128_plus_signal(tmp_path, sig, status):
    code, step, stderr = train_until(tmp_path, 100, sig, resume=False)
    assert code == status
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "checkpoint saved" in lines[0] and "Traceback" not in stderr
    checkpoint = load_checkpoint(tmp_path / "model.safetensors")
    assert checkpoint.step >= step and not checkpoint.finished


def test_a_nan_loss_stops_training_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_forward, calls = CrossEntropy.forward, []

    def forward_that_diverges(self, logits, targets):
        calls.extend([1] if logits.shape[0] == 32 else [])    # count training batches, not evaluations
        loss = real_forward(self, logits, targets)
        return loss * float("nan") if len(calls) == 30 else loss

    monkeypatch.setattr(CrossEntropy, "forward", forward_that_diverges)
    assert main(["train", "-o", str(tmp_path), "--max-steps", "100", "--save-every", "20"]) == 2
    error = capsys.readouterr().err
    assert "nan at step 29" in error and "learning rate (0.1)" in error and "(step 20)" in error
    checkpoint = load_checkpoint(tmp_path / "model.safetensors")
    assert checkpoint.step == 20
    assert all(torch.isfinite(p).all() for p in checkpoint.model.parameters().values())


@pytest.fixture
def checkpoint_file(trained_dir, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes((trained_dir / "model.safetensors").read_bytes())
    return path


def test_truncated_altered_and_foreign_files_are_refused(checkpoint_file, tmp_path):
    raw = checkpoint_file.read_bytes()
    cases = {
        "truncated": raw[: len(raw) // 2],
        "altered": raw[:-10] + bytes(b ^ 0xFF for b in raw[-10:]),   # flip bits in the last tensor
        "empty": b"",
        "text": b"not a checkpoint at all\n",
    }
    for content in cases.values():
        checkpoint_file.write_bytes(content)
        with pytest.raises(UserError, match="not a readable checkpoint|damaged"):
            load_checkpoint(checkpoint_file)
    save_file({"weight": torch.zeros(3)}, str(checkpoint_file))         # a safetensors file of someone else's
    with pytest.raises(UserError, match="not a handprop checkpoint"):
        load_checkpoint(checkpoint_file)


def test_a_checkpoint_of_another_format_version_is_refused(trained_dir, tmp_path):
    checkpoint = load_checkpoint(trained_dir / "model.safetensors")
    tensors = {f"param.{k}": v for k, v in checkpoint.model.parameters().items()}
    write_checkpoint(tmp_path / "model.safetensors", tensors, metadata(checkpoint) | {"version": 99})
    with pytest.raises(UserError, match="another format or version"):
        load_checkpoint(tmp_path / "model.safetensors")


class Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickle_payload_is_refused_without_executing_it(tmp_path, capsys):
    marker = str(tmp_path / "payload-ran")
    for blob in (pickle.dumps(Payload(marker)), None):
        if blob is None:
            torch.save({"model": Payload(marker)}, tmp_path / "model.safetensors")   # torch's own pickle format
        else:
            (tmp_path / "model.safetensors").write_bytes(blob)
        commands = (["sample", "-o", str(tmp_path)], ["eval", "-o", str(tmp_path)],
                    ["train", "--resume", "-o", str(tmp_path)])
        for argv in commands:
            assert main(argv) == 2
            assert "not a readable checkpoint" in capsys.readouterr().err
    assert not os.path.exists(marker)


# written by handprop d8edd87 (checkpoint version 2: the optimiser's tensors and the batch generator under 'extra.'):
# handprop train --model bigram --optimizer adamw -w 0.01 --schedule step --lr-decay-at 1 --max-steps 10 -o DIR
VERSION_2 = Path(__file__).parent / "fixtures" / "checkpoint-v2" / "model.safetensors"
VERSION_2_RUN = ["--model", "bigram", "--optimizer", "adamw", "-w", "0.01", "--schedule", "step", "--lr-decay-at", "1"]


def test_a_checkpoint_of_the_earlier_layout_loads_into_named_fields_and_resumes_exactly(tmp_path, capsys):
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(VERSION_2, old / "model.safetensors")
    checkpoint = load_checkpoint(old / "model.safetensors")
    assert checkpoint.step == 10 and checkpoint.optimizer_state == {"t": 10}
    assert set(checkpoint.optimizer_tensors) == {"m.0.weight", "v.0.weight"}
    assert all(t.abs().sum() > 0 for t in checkpoint.optimizer_tensors.values())     # ten steps of moments
    generator = torch.Generator()
    generator.set_state(checkpoint.batch_generator)     # a generator's state, not some other tensor
    # ten more steps from the old file end where twenty straight steps of this version end (constant lr)
    corpus = str(bundled_corpus_path())
    status, resumed, err = run_main(["train", "--resume", "--max-steps", "20", "-i", corpus, "-o", old], capsys)
    assert status == 0 and "resuming at step 10" in resumed, err
    status, straight, err = run_main(["train", *VERSION_2_RUN, "--max-steps", "20", "-o", tmp_path / "new"], capsys)
    assert status == 0, err
    assert resumed.splitlines()[-1] == straight.splitlines()[-1]    # train / val / test losses, to the digit
    with safe_open(str(old / "model.safetensors"), framework="pt") as f:     # saved again in the named layout
        names = set(f.keys())  # noqa: SIM118 (a safe_open handle is not a dict)
    assert {"batch_generator", "optimizer.m.0.weight", "optimizer.v.0.weight"} <= names
    assert not any(name.startswith("extra.") for name in names)
