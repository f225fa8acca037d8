"""The compiled training step (compiled.py) takes the same steps as the eager one, in float64, for every model."""

import signal

import pytest
import torch
from cli_runner import run_main

from handprop.compiled import CompiledStep
from handprop.data import Corpus, form_named, make_splits
from handprop.layers import Dropout, walk
from handprop.models import build_model
from handprop.optim import SGD, make_optimizer
from handprop.settings import preset, recipe
from handprop.step import EagerStep
from handprop.stops import Interrupted, interruption

# every model of the README's table, made small where compiling it would take long (unrolled steps, blocks)
MODELS = {"mlp": {}, "wavenet": {}, "mlp-fast": {}, "bigram": {}, "rnn": {"n_hidden": 16},
          "gru": {"n_hidden": 16}, "transformer": {"n_layers": 1}}
STEPS = 3


@pytest.fixture(scope="module")
def corpus():
    """Short names, so that a sequence model's positions (and an rnn's unrolled graph) stay few."""
    names = ["ava", "emma", "mia", "zoe", "liam", "noah", "ella", "leo", "ivy", "max", "eva", "kai", "amy", "ben"]
    return Corpus(names * 20, 0, "0" * 64, "<test names>")


def float64_run(name, corpus, seed=0):
    """(model, optimizer, examples, settings): the preset in float64, every parameter moved off its init."""
    settings = recipe(name)
    config = preset(name, **MODELS[name])
    splits = make_splits(corpus, config.block_size or None, form=form_named(config.form))   # 0: as many as needed
    examples = splits.tensors["train"]
    g = torch.Generator().manual_seed(seed)     # the init's generator, and the dropout masks' too
    model = build_model(preset(name, vocab_size=splits.vocab.size, block_size=config.block_size or examples.width,
                               **MODELS[name]), g, dtype=torch.float64)
    for p in model.parameters().values():       # no zero table or bias, no unit gain: a wrong step cannot hide
        p += 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype)
    optimizer = make_optimizer(settings.optimizer, model.parameters(), settings.weight_decay)
    return model, optimizer, examples, settings


def learning_rate(settings, i):
    """A new learning rate each step."""
    return settings.lr * (i + 1) / STEPS


def take_steps(step, batches, settings):
    """step (eager or compiled: the same call) on each batch of rows; the losses."""
    return [step(ix, learning_rate(settings, i))[0] for i, ix in enumerate(batches)]


def eager_step(model, optimizer, examples, settings):
    return EagerStep(model, optimizer, examples.form.criterion(), examples, settings.grad_clip)


def compiled_step(model, optimizer, examples, settings, grad_clip=None):
    grad_clip = settings.grad_clip if grad_clip is None else grad_clip
    return CompiledStep(model, optimizer, examples.form.criterion(), examples, settings.batch_size, grad_clip)


def state(model, optimizer):
    return model.parameters() | model.buffers() | {f"optim.{k}": v for k, v in optimizer.state_dict()[0].items()}


@pytest.mark.parametrize("name", MODELS)
def test_compiled_steps_equal_eager_steps_in_float64(name, corpus):
    eager_model, eager_optimizer, examples, settings = float64_run(name, corpus)
    model, optimizer, _, _ = float64_run(name, corpus)
    g = torch.Generator().manual_seed(1)
    batches = [examples.draw(settings.batch_size, g) for _ in range(STEPS)]
    before = {k: v.clone() for k, v in model.parameters().items()}
    expected_losses = take_steps(eager_step(eager_model, eager_optimizer, examples, settings), batches, settings)

    step = compiled_step(model, optimizer, examples, settings)
    assert all(torch.equal(before[k], p) for k, p in model.parameters().items())    # compiling took no step
    losses = take_steps(step, batches, settings)

    assert losses == pytest.approx(expected_losses, rel=1e-13, abs=0)
    expected, got = state(eager_model, eager_optimizer), state(model, optimizer)
    worst = {k: (got[k] - expected[k]).abs().max().item() for k in expected}
    print("\n".join(f"{k:40s} {'OK' if d <= 1e-10 else 'NOT OK'} {d:.1e}" for k, d in worst.items()))
    assert max(worst.values()) <= 1e-10     # the whole-step tests' bound (test_model_step.py)
    assert all(not torch.equal(before[k], p) for k, p in model.parameters().items())   # every parameter moved
    assert optimizer.state_dict()[1] == eager_optimizer.state_dict()[1]                # AdamW's step count
    dropouts = [layer for layer in walk(model) if isinstance(layer, Dropout) and layer.p > 0]
    assert (name == "transformer") == bool(dropouts)
    if dropouts:    # the masks came from the run's generator, as many draws as the eager step's
        assert torch.equal(dropouts[0].generator.get_state(), walk_generator(eager_model).get_state())


def walk_generator(model):
    return next(layer.generator for layer in walk(model) if isinstance(layer, Dropout))


def test_the_comparison_sees_a_wrong_learning_rate(corpus):
    # the same comparison with the compiled step given another learning rate must fail it by far
    eager_model, eager_optimizer, examples, settings = float64_run("mlp", corpus)
    model, optimizer, _, _ = float64_run("mlp", corpus)
    ix = examples.draw(settings.batch_size, torch.Generator().manual_seed(1))
    eager_step(eager_model, eager_optimizer, examples, settings)(ix, settings.lr)
    compiled_step(model, optimizer, examples, settings, grad_clip=0.0)(ix, settings.lr * 1.01)
    worst = max((p - eager_model.parameters()[k]).abs().max().item() for k, p in model.parameters().items())
    assert worst > 1e-6


def test_a_step_that_reads_a_stale_view_of_what_it_updates_is_refused(corpus):
    # an optimiser holding a view made before the trace would be frozen into the graph: the check refuses it
    model, _, examples, settings = float64_run("mlp", corpus)
    params = model.parameters()

    class StaleViews(SGD):
        def __init__(self, params):
            super().__init__(params)
            self.flat = torch.zeros(sum(p.numel() for p in params.values()), dtype=torch.float64)
            self.first = self.flat[:1]      # made once, outside any step

        def update(self, grads, lr):
            self.flat.add_(1.0)
            super().update({k: g + self.first for k, g in grads.items()}, lr)

        def tensors(self):
            return [self.flat]

    with pytest.raises(RuntimeError, match="freeze"):
        compiled_step(model, StaleViews(params), examples, settings, grad_clip=0.0)


def test_train_compiles_when_asked_and_refuses_what_it_cannot_compile(tmp_path, capsys):
    code, out, _ = run_main(["train", "-o", tmp_path / "a", "--max-steps", "30", "--compile", "on"], capsys)
    assert code == 0 and "compiling the training step" in out and "done in" in out
    code, _, err = run_main(["train", "-o", tmp_path / "b", "--max-steps", "30", "--compile", "on", "--diagnostics"],
                            capsys)
    assert code == 2 and err.count("\n") == 1 and "--compile on" in err and not (tmp_path / "b").exists()
    code, out, _ = run_main(["train", "-o", tmp_path / "c", "--max-steps", "30"], capsys)   # auto: too short a run
    assert code == 0 and "compiling" not in out


def test_a_compiled_run_resumes_exactly(tmp_path, capsys):
    # a run of 20 steps extended to 40 ends where a run of 40 does (no learning-rate drop within 40 steps)
    flags = ["--max-steps", "40", "--save-every", "20", "--compile", "on", "--lr-decay-at", "1"]
    code, straight, _ = run_main(["train", "-o", tmp_path / "whole", *flags], capsys)
    assert code == 0
    assert run_main(["train", "-o", tmp_path / "split", "--max-steps", "20", *flags[2:]], capsys)[0] == 0
    code, resumed, _ = run_main(["train", "-o", tmp_path / "split", "--resume", *flags], capsys)
    assert code == 0 and "resuming at step 20" in resumed
    assert straight.splitlines()[-1] == resumed.splitlines()[-1]    # train / val / test losses, to the digit


def test_a_stop_inside_the_compiler_is_still_a_stop():
    # Ctrl-C while Inductor runs gcc comes back wrapped in Inductor's own error: it must stop the run, not fall back
    try:
        try:
            raise Interrupted(signal.SIGINT, "SIGINT while compiling the training step: nothing was saved yet")
        except Interrupted as stop:
            raise RuntimeError("C++ compile error") from stop
    except RuntimeError as wrapped:
        assert interruption(wrapped).signum == signal.SIGINT
    assert interruption(RuntimeError("no C++ compiler")) is None
