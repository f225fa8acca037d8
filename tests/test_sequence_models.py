"""The sequence models end to end: each trains, resumes bit for bit, evaluates to the losses training printed,
samples plausibly without changing itself, its cached sampler equals the full forward, and its bad settings
are one error line with nothing written."""

import contextlib
import io
import math
import os
import random
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import generate_sequences

from handprop.checkpoint import load_checkpoint
from handprop.cli import main
from handprop.data import SEQUENCES, Sequences, load_corpus
from handprop.layers import eval_mode
from handprop.optim import AdamW
from handprop.sample import longest_sample, sample_items

STEPS = 60                  # a straight run's steps; the other run is stopped after half of them and resumed
MODELS = {                  # tiny, on their own recipes; a short warmup (and the transformer a higher lr) so they learn
    "bigram": [],
    "rnn": ["--n-embd", "16", "--n-hidden", "32", "--warmup", "5"],
    "gru": ["--n-embd", "16", "--n-hidden", "32", "--warmup", "5"],
    "transformer": ["--n-embd", "16", "--n-layers", "2", "--n-head", "2", "--block-size", "16", "--warmup", "5",
                    "--lr", "1e-2", "--min-lr", "1e-3"],                    # keeps the preset's dropout 0.3
}


def handprop(*argv):
    """The command line in this process: (exit status, what it printed on stdout)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            status = main([str(a) for a in argv])
        except SystemExit as e:             # argparse rejects a flag by exiting
            status = e.code
    return status, printed.getvalue()


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    """500 names drawn from names.txt: enough to learn from, small enough to evaluate in a blink."""
    path = tmp_path_factory.mktemp("corpus") / "names-small.txt"
    path.write_text("\n".join(random.Random(0).sample(load_corpus().items, 500)) + "\n")
    return path


@dataclass
class TrainedPair:
    """One model trained straight through, and the same run stopped half-way by SIGINT and resumed."""

    name: str
    straight: Path          # work dir of the straight run
    straight_log: str       # what its training printed
    resumed: Path           # work dir of the stopped-and-resumed run
    resumed_log: str        # what the resumed part printed


def train_pair(name, corpus_file, root):
    argv = ["train", "-i", corpus_file, "--model", name, *MODELS[name], "--max-steps", STEPS, "--save-every", 20,
            "--log-every", 10]
    status, straight_log = handprop(*argv, "-o", root / "straight")
    assert status == 0
    real_update = AdamW.update

    def update_then_interrupt(self, grads, *numbers):
        real_update(self, grads, *numbers)
        if self.t == STEPS // 2:
            os.kill(os.getpid(), signal.SIGINT)     # as Ctrl-C: the loop saves after this step and stops

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AdamW, "update", update_then_interrupt)
        assert handprop(*argv, "-o", root / "resumed")[0] == 128 + signal.SIGINT
    stopped = load_checkpoint(root / "resumed" / "model.safetensors")
    assert stopped.step == STEPS // 2 and not stopped.finished
    status, resumed_log = handprop(*argv, "-o", root / "resumed", "--resume")      # the same command, resumed
    assert status == 0 and f"resuming at step {STEPS // 2}" in resumed_log
    return TrainedPair(name, root / "straight", straight_log, root / "resumed", resumed_log)


@pytest.fixture(scope="module")
def trained(corpus_file, tmp_path_factory):
    """trained(name): the model's TrainedPair, trained once for the whole module."""
    pairs = {}

    def get(name):
        if name not in pairs:
            pairs[name] = train_pair(name, corpus_file, tmp_path_factory.mktemp(name))
        return pairs[name]

    return get


def every_tensor(work_dir):
    """A finished run's parameters, buffers and the state to go on (optimizer moments, the batch generator)."""
    checkpoint = load_checkpoint(work_dir / "model.safetensors")
    assert checkpoint.finished
    model = checkpoint.model
    return ({f"param.{k}": v for k, v in model.parameters().items()} | {f"buffer.{k}": v for k, v in
            model.buffers().items()} | {f"optimizer.{k}": v for k, v in checkpoint.optimizer_tensors.items()}
            | {"batch_generator": checkpoint.batch_generator})


@pytest.mark.parametrize("name", MODELS)
def test_a_run_stopped_half_way_and_resumed_equals_the_run_straight_through(name, trained):
    pair = trained(name)
    straight, resumed = every_tensor(pair.straight), every_tensor(pair.resumed)
    assert straight.keys() == resumed.keys() and any(k.startswith("optimizer.m.") for k in straight)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    assert pair.straight_log.splitlines()[-1] == pair.resumed_log.splitlines()[-1]     # the same final losses
    spec = load_checkpoint(pair.straight / "model.safetensors").spec
    assert spec.model_config.kind == name
    assert (spec.model_config.dropout > 0) == (name == "transformer")      # so the masks' generator state is saved
    final_train = float(pair.straight_log.splitlines()[-1].split()[2])
    assert final_train < math.log(spec.vocab.size)                          # it learned: below the uniform guess


@pytest.mark.parametrize("name", MODELS)
def test_eval_prints_the_losses_training_printed(name, trained):
    pair = trained(name)
    for work_dir, log in ((pair.straight, pair.straight_log), (pair.resumed, pair.resumed_log)):
        status, printed = handprop("eval", "-o", work_dir)
        assert status == 0 and printed.strip() == log.splitlines()[-1] and printed.startswith("train loss ")


def bigram_nll(strings, items):
    """Mean -log p(next character | previous) of strings under the items' add-one bigram counts, ends included."""
    counts, chars = Counter(), set("".join(items)) | {"."}
    for item in items:
        counts.update(zip("." + item, item + ".", strict=True))
    rows = Counter()
    for (a, _), n in counts.items():
        rows[a] += n
    pairs = [(a, b) for s in strings for a, b in zip("." + s, s + ".", strict=True)]
    return -sum(math.log((counts[p] + 1) / (rows[p[0]] + len(chars))) for p in pairs) / len(pairs)


def sample_lines(work_dir, *flags):
    status, printed = handprop("sample", "-o", work_dir, *flags)
    assert status == 0
    return printed.splitlines()


@pytest.mark.parametrize("name", MODELS)
def test_samples_are_plausible_strings_of_the_vocabulary_and_start_with_the_prefix(name, trained, corpus_file):
    pair = trained(name)
    items = load_corpus(corpus_file).items
    vocabulary = set("".join(items))
    samples = sample_lines(pair.straight, "-n", 200, "--seed", 1)
    assert len(samples) == 200 and all(set(s) <= vocabulary for s in samples)
    assert sum(s == "" for s in samples) <= 10              # 60 steps in, a model may still end one at once
    # plausible: under the corpus's own bigram statistics the samples read more like names than like random strings
    rng = random.Random(0)
    noise = ["".join(rng.choice(sorted(vocabulary)) for _ in s) for s in samples]     # the samples' lengths
    assert bigram_nll(samples, items) < (bigram_nll(items, items) + bigram_nll(noise, items)) / 2
    assert sum(len(s) < 2 * max(map(len, items)) for s in samples) >= 180               # most of them ended
    prefixed = sample_lines(pair.straight, "-n", 50, "--seed", 2, "--prefix", "ma")
    assert len(prefixed) == 50 and all(s.startswith("ma") and set(s) <= vocabulary for s in prefixed)
    assert len(set(prefixed)) > 10                                          # what follows the prefix varies


def snapshot(directory):
    """Every file under directory with its bytes (None when it does not exist)."""
    if not directory.exists():
        return None
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", MODELS)
def test_sampling_never_changes_the_model(name, trained):
    work_dir = trained(name).straight
    before = snapshot(work_dir)
    sample_lines(work_dir, "-n", 20, "--seed", 3, "--prefix", "a")
    assert snapshot(work_dir) == before
    checkpoint = load_checkpoint(work_dir / "model.safetensors")
    tensors = {k: v.clone() for k, v in (checkpoint.model.parameters() | checkpoint.model.buffers()).items()}
    for prefix in ("", "ma"):
        sample_items(checkpoint.model, checkpoint.spec, 50, torch.Generator().manual_seed(4), prefix=prefix)
    assert checkpoint.model.training                                        # the mode it had before sampling
    for k, v in (checkpoint.model.parameters() | checkpoint.model.buffers()).items():
        assert torch.equal(v, tensors[k]), k


@pytest.mark.parametrize("name", MODELS)
def test_the_cached_step_equals_the_full_forward_at_every_position(name, trained):
    model = load_checkpoint(trained(name).straight / "model.safetensors").model     # float32, trained 60 steps
    X = torch.randint(0, 27, (32, 16), generator=torch.Generator().manual_seed(5))   # every one of 16 positions
    with eval_mode(model):
        full = model.forward(X)                                             # (B, T, V)
        cache = model.new_cache()
        stepped = torch.cat([model.step(X[:, t : t + 1], cache) for t in range(X.shape[1])], dim=1)   # (B, T, V)
    assert (stepped - full).abs().max() <= 1e-5


@pytest.mark.parametrize("name", MODELS)
def test_cached_and_uncached_sampling_draw_the_same_samples(name, trained):
    checkpoint = load_checkpoint(trained(name).straight / "model.safetensors")
    spec = checkpoint.spec
    for prefix in ("", "ma"):
        max_length = longest_sample(spec) or len(prefix) + 2 * spec.longest_item     # prefix included
        cached, uncached = (generate_sequences(checkpoint.model, spec.vocab, 100, torch.Generator().manual_seed(6),
                                               max_length, prefix, cached=flag) for flag in (True, False))
        assert cached == uncached and len(set(cached)) > 10


# (case id, argv, words in the error); new runs are pointed at a work dir that must not come into being
BAD_SETTINGS = [
    ("heads do not divide n_embd", ["train", "--model", "transformer", "--n-embd", 30, "--n-head", 4], "multiple"),
    ("transformer positions below the longest name + 1", ["train", "--model", "transformer", "--block-size", 8],
     "at least 16"),
    ("gru positions below the longest name + 1", ["train", "--model", "gru", "--block-size", 8], "at least 16"),
    ("dropout above 1", ["train", "--model", "transformer", "--dropout", 1.5], "--dropout"),
    ("warmup as long as the run", ["train", "--model", "transformer", "--max-steps", 100, "--warmup", 100],
     "--warmup"),
    ("min-lr above lr", ["train", "--model", "rnn", "--lr", 0.01, "--min-lr", 0.02], "--min-lr"),
]


def one_error_line(err, words):
    lines = err.splitlines()
    return len(lines) == 1 and lines[0].startswith("handprop: error: ") and words in lines[0]


@pytest.mark.parametrize("argv, words", [c[1:] for c in BAD_SETTINGS], ids=[c[0] for c in BAD_SETTINGS])
def test_a_bad_sequence_model_setting_is_one_error_line_and_exit_2_with_nothing_written(argv, words, tmp_path,
                                                                                        capsys):
    status, printed = handprop(*argv, "-o", tmp_path / "out")
    err = capsys.readouterr().err
    assert status == 2 and printed == "" and one_error_line(err, words), err
    assert not (tmp_path / "out").exists()


def test_sampling_past_the_transformers_positions_is_one_error_line_and_changes_nothing(trained, capsys):
    work_dir = trained("transformer").straight
    assert load_checkpoint(work_dir / "model.safetensors").spec.model_config.block_size == 16
    before = snapshot(work_dir)
    capsys.readouterr()
    status, printed = handprop("sample", "-o", work_dir, "--max-length", 40)
    err = capsys.readouterr().err
    assert status == 2 and printed == "" and one_error_line(err, "16 positions"), err
    assert snapshot(work_dir) == before


def test_a_prefix_longer_than_the_transformer_reads_says_how_long_one_may_be(trained, capsys):
    # 16 positions: the start token, 14 characters of prefix, and a position for the first new character
    work_dir = trained("transformer").straight
    capsys.readouterr()
    status, printed = handprop("sample", "-o", work_dir, "--prefix", "abcdefghijklmnopqrstuvwxyzabcdefghijklm")
    err = capsys.readouterr().err
    assert status == 2 and printed == "" and one_error_line(err, "at most 14 characters"), err
    assert "--max-length" not in err and "has 39" in err
    status, printed = handprop("sample", "-o", work_dir, "-n", 3, "--seed", 1, "--prefix", "abcdefghijklmn")
    assert status == 0 and all(line.startswith("abcdefghijklmn") for line in printed.splitlines())
    assert len(printed.splitlines()) == 3


def test_one_long_line_among_names_pads_only_the_batches_that_hold_it(tmp_path, capsys, monkeypatch):
    # 52 names and one line of 1000 characters: every batch used to be padded to 1001 positions (79 s, 4.8 GB)
    corpus_file = tmp_path / "names-and-a-line.txt"
    corpus_file.write_text("\n".join(load_corpus().items[:52] + ["x" * 1000]) + "\n")
    widths = []                             # (the batch's longest item + 1, the width it was padded to) of each step
    batch = Sequences.batch

    def recorded(self, examples, ix, padded_to=None):
        X, Y = batch(self, examples, ix, padded_to)
        if padded_to is None:               # a training batch (evaluation pads to the split's width, a few rows a pass)
            widths.append((int((examples.bounds[ix + 1] - examples.bounds[ix]).max()), X.shape[1]))
        return X, Y

    monkeypatch.setattr(Sequences, "batch", recorded)
    status, printed = handprop("train", "--model", "transformer", "--n-layers", 1, "--max-steps", 3, "--warmup", 0,
                               "-i", corpus_file, "-o", tmp_path / "out")
    assert status == 0
    warnings = [line for line in printed.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "1000 characters" in warnings[0] and "99% of them at most" in warnings[0]
    assert len(widths) == 3 and all(width == longest for longest, width in widths)    # each its own longest + 1
    assert any(width <= 16 for _, width in widths)      # a batch of names only is as narrow as its names
    assert load_checkpoint(tmp_path / "out" / "model.safetensors").spec.model_config.block_size == 1001


def test_a_corpus_without_an_outlier_warns_of_nothing():
    assert SEQUENCES.padding_warning(load_corpus().items) is None
    assert SEQUENCES.padding_warning(["ab"] * 200 + ["x" * 100]) is not None
