"""Training end to end: autograd stays off, eval repeats training's numbers, sampling is pure."""

import math
import random
from dataclasses import replace

import pytest
import torch
from helpers import generate

from handprop.checkpoint import load_checkpoint
from handprop.cli import main
from handprop.data import load_corpus, split_items
from handprop.losses import CrossEntropy, SequenceCrossEntropy
from handprop.settings import preset, recipe
from handprop.train import train

TINY = {"rnn": {"n_embd": 8, "n_hidden": 16}, "gru": {"n_embd": 8, "n_hidden": 16},
        "transformer": {"n_embd": 8, "n_layers": 1, "n_head": 2}}     # the transformer keeps its dropout


def small_corpus(tmp_path, size=500):
    """size names drawn from names.txt, as a corpus file of their own (keeps the final evaluations quick)."""
    path = tmp_path / "names-small.txt"
    path.write_text("\n".join(random.Random(0).sample(load_corpus().items, size)) + "\n")
    return load_corpus(path)


@pytest.mark.parametrize("name", ["mlp", "bigram", "rnn", "gru", "transformer"])
def test_training_runs_with_autograd_disabled(name, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("autograd was called during training")

    monkeypatch.setattr(torch.Tensor, "backward", forbidden)
    monkeypatch.setattr(torch.autograd, "backward", forbidden)
    monkeypatch.setattr(torch.autograd, "grad", forbidden)
    modes = []
    for loss in (CrossEntropy, SequenceCrossEntropy):
        def spying_forward(self, logits, targets, original=loss.forward):
            modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled(), logits.requires_grad))
            return original(self, logits, targets)

        monkeypatch.setattr(loss, "forward", spying_forward)
    corpus = small_corpus(tmp_path)
    # the model's own recipe (optimizer, schedule, clipping), short: 50 steps, 5 of them warmup where it warms up
    config = replace(recipe(name), max_steps=50, warmup=min(recipe(name).warmup, 5), log_every=25, save_every=25)
    model, losses = train(corpus, preset(name, **TINY.get(name, {})), config, tmp_path / "run")
    assert len(modes) >= 50 and all(m == (True, False, False) for m in modes)
    assert all(not p.requires_grad and p.grad is None for p in model.parameters().values())
    vocab_size = len(set("".join(corpus.items))) + 1
    assert losses["train"] < math.log(vocab_size)               # it learned something: below the uniform guess


def test_eval_prints_the_losses_training_printed(trained_dir, capsys):
    train_lines = (trained_dir / "train.log").read_text().splitlines()
    assert main(["eval", "-o", str(trained_dir)]) == 0
    eval_line = capsys.readouterr().out.strip()
    assert eval_line == train_lines[-1] and eval_line.startswith("train loss ")
    assert (trained_dir / "config.json").is_file()


def test_sample_prints_n_names(trained_dir, capsys):
    assert main(["sample", "-o", str(trained_dir), "-n", "20", "--seed", "3"]) == 0
    names = capsys.readouterr().out.splitlines()
    assert len(names) == 20 and all(set(n) <= set("abcdefghijklmnopqrstuvwxyz") for n in names)
    assert sum(map(bool, names)) >= 18      # a model may end a sample at once (about 1 in 200 here), rarely


def test_samples_are_mostly_new_and_sampling_leaves_batchnorm_alone(trained_dir):
    checkpoint = load_checkpoint(trained_dir / "model.safetensors")
    buffers = {k: v.clone() for k, v in checkpoint.model.buffers().items()}
    assert buffers                                              # the default model has BatchNorm
    names = generate(checkpoint.model, checkpoint.spec.vocab, 3, 1000, torch.Generator().manual_seed(0), max_length=30)
    train_names = set(split_items(load_corpus().items)[0])
    assert len(names) == 1000 and sum(n not in train_names for n in names) >= 500
    for k, v in checkpoint.model.buffers().items():
        assert torch.equal(v, buffers[k]), k
    assert checkpoint.model.training                            # the mode it had before sampling


def test_sampling_with_a_prefix(trained_dir, capsys):
    assert main(["sample", "-o", str(trained_dir), "-n", "5", "--seed", "1", "--prefix", "ma"]) == 0
    assert all(n.startswith("ma") for n in capsys.readouterr().out.splitlines())


def test_the_best_checkpoint_has_the_lowest_val_loss_seen(trained_dir, capsys):
    assert main(["eval", "-o", str(trained_dir), "--best"]) == 0
    best_val = float(capsys.readouterr().out.split("val loss ")[1].split()[0])
    final_val = load_checkpoint(trained_dir / "model.safetensors").losses["val"]
    assert best_val <= round(final_val, 4)
    assert load_checkpoint(trained_dir / "best.safetensors").best_val <= final_val
