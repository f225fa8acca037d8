"""Diagnostics: the recorded statistics are the numbers an independent computation gives."""

import os
import signal
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import sample_batch

from handprop.checkpoint import LATEST, load_checkpoint
from handprop.cli import main
from handprop.config import TrainConfig
from handprop.data import IGNORED, load_corpus, make_splits
from handprop.diagnostics import FILENAME, Diagnostics, load_history
from handprop.evaluation import make_run_splits
from handprop.gradcheck import part_params, twin_forward
from handprop.layers import Residual, Sequential, walk
from handprop.models import build_model
from handprop.optim import make_optimizer
from handprop.packing import pack, real_positions
from handprop.settings import preset, recipe
from handprop.step import clip_and_update, forward_backward, schedule_for
from handprop.train import train


def recording_twin(layer, x, params, path, outputs):
    """twin_forward, keeping in outputs the output of every layer a Sequential runs, at any depth, by its label."""
    if isinstance(layer, Sequential):
        for i, inner in enumerate(layer.layers):
            x = recording_twin(inner, x, part_params(params, str(i), inner), f"{path}{i}.", outputs)
            x.retain_grad()
            outputs[f"{path}{i}.{type(inner).__name__}"] = x
        return x
    if isinstance(layer, Residual):
        return x + recording_twin(layer.inner, x, part_params(params, "inner", layer.inner), f"{path}inner.", outputs)
    return twin_forward(layer, x, params)


def autograd_pass(model, X, Y):
    """The loss, every layer's output and dL/d(output) by label, and every parameter's gradient, by autograd."""
    with torch.enable_grad():
        params = {k: v.detach().clone().requires_grad_(True) for k, v in model.parameters().items()}
        outputs = {}
        logits = recording_twin(model, X, params, "", outputs)          # (B, V) or (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y.reshape(-1), ignore_index=IGNORED)
        loss.backward()
    return (loss.item(), {k: o.detach() for k, o in outputs.items()}, {k: o.grad for k, o in outputs.items()},
            {k: p.grad for k, p in params.items()})


def eval_loss(model, X, Y):
    """Loss on a whole split in evaluation mode (BatchNorm's running statistics, no dropout), by the twins."""
    model.eval()
    logits = twin_forward(model, X, model.parameters())
    model.train()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y.reshape(-1), ignore_index=IGNORED).item()


# per model: the kinds of layer whose outputs are watched, and those whose saturation is recorded (tanh outputs)
WATCHED = {
    "deep": ({"Tanh"}, {"Tanh"}),
    "wavenet": ({"Tanh"}, {"Tanh"}),
    "transformer": ({"LayerNorm", "CausalSelfAttention", "GELU"}, set()),
    "rnn": ({"Recurrent"}, {"Recurrent"}),                 # an RNN's hidden state is a tanh output
    "gru": ({"Recurrent"}, set()),                         # a GRU's is not: its gradient passes through (1 - z)
    "bigram": (set(), set()),
}


def kind(label):
    return label.rsplit(".", 1)[1]


def clip_scale(param_grads, clip):
    """(global L2 norm of the gradients, the factor clipping to clip multiplies them by: 1 when it does not clip)."""
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in param_grads.values())).item()
    return norm, min(1.0, clip / (norm + 1e-6)) if clip else 1.0


def expected_statistics(model, name, passes, scored, val, scale):
    """The statistics of one step, computed directly from autograd's tensors at the scored positions.

    scale: what clipping multiplies the parameters' gradients by (the optimiser gets them clipped).
    """
    _, outputs, output_grads, param_grads = passes
    watched_kinds, saturating_kinds = WATCHED[name]
    at = (lambda t: t) if scored is None else (lambda t: t[scored])     # (N, C) at the positions the loss counts
    acts = {k: at(o) for k, o in outputs.items() if kind(k) in watched_kinds}
    params = model.parameters()
    expected = {
        "act_mean": {k: t.mean().item() for k, t in acts.items()},
        "act_std": {k: t.std().item() for k, t in acts.items()},
        "act_saturation": {k: 100.0 * (t.abs() > 0.97).sum().item() / t.numel() for k, t in acts.items()
                           if kind(k) in saturating_kinds},
        "grad_mean": {k: at(g).mean().item() for k, g in output_grads.items()},
        "grad_std": {k: at(g).std().item() for k, g in output_grads.items()},
        "grad_data": {k: (scale * param_grads[k].std() / p.std()).item() for k, p in params.items() if p.ndim == 2},
        "val_loss": {"val": eval_loss(model, *val)},
    }
    return {series: values for series, values in expected.items() if values}


MODELS = [
    ("deep", dict(n_hidden=30, n_layers=3), {}),           # (B, C) layers, BatchNorm, three tanh layers
    ("wavenet", dict(n_embd=8, n_hidden=16), {}),          # (B, T, C) BatchNorm and FlattenConsecutive
    # nested layers (residual blocks), dropout masks, padding; AdamW, warmup-cosine and clipping as in the recipe
    ("transformer", dict(n_embd=8, n_layers=1, n_head=2, dropout=0.2), dict(warmup=1, grad_clip=0.1)),
    ("gru", dict(n_embd=6, n_hidden=8), dict(warmup=1, grad_clip=0.1)),
    ("rnn", dict(n_embd=6, n_hidden=8), dict(warmup=1, grad_clip=0.1)),
    ("bigram", {}, {}),
]


@pytest.mark.parametrize("name, overrides, train_overrides", MODELS)
def test_recorded_statistics_equal_a_direct_computation(tmp_path, name, overrides, train_overrides):
    corpus, model_config = load_corpus(), preset(name, **overrides)
    config = replace(recipe(name), max_steps=4, diagnostics_every=2, seed=7, log_every=10, **train_overrides)
    trained, _ = train(corpus, model_config, config, tmp_path)   # records steps 0, 2 and 3
    history = load_history(tmp_path / FILENAME)
    assert history.steps == [0, 2, 3]

    # replay the run: the same seed gives the same init, batches and dropout masks; updates by the project's optimiser
    model_config = load_checkpoint(tmp_path / LATEST).spec.model_config     # vocabulary and positions from the data
    splits = make_run_splits(corpus, model_config)
    examples, val = splits.tensors["train"], splits.tensors["val"]
    generator = torch.Generator().manual_seed(config.seed)
    with torch.inference_mode():
        model = build_model(model_config, generator)
    model.take_noise_from(splits.form.noise_source(examples))  # the run's dropout masks, whatever a batch's width
    optimizer = make_optimizer(config.optimizer, model.parameters(), config.weight_decay)
    schedule = schedule_for(config)
    criterion, norms = splits.form.criterion(), []
    for step in range(config.max_steps):
        Xb, Yb = examples.sample(config.batch_size, generator)      # the run's batch, padded as the run padded it
        masks = generator.get_state()
        with torch.inference_mode():                           # the hand-written passes the run took
            X, Y = pack(Xb, Yb, real_positions(Yb)) if model.packs else (Xb, Yb)    # on the rows the run computed
            forward_backward(model, criterion, X, Y)           # (they move BatchNorm's running statistics)
        drawn = generator.get_state()
        generator.set_state(masks)                             # the twins draw the same dropout masks...
        passes = autograd_pass(model, Xb, Yb)
        assert torch.equal(generator.get_state(), drawn)       # ...and no other
        scored = Yb != IGNORED if Yb.ndim == 2 else None       # (B, T): padding left out
        norm, scale = clip_scale(passes[3], config.grad_clip)
        norms.append(norm)
        expected = expected_statistics(model, name, passes, scored, val, scale)
        assert history.train_loss[step] == pytest.approx(passes[0], rel=1e-6)
        with torch.inference_mode():
            before = {k: p.clone() for k, p in model.parameters().items()}
            clip_and_update(model, optimizer, config.grad_clip, optimizer.next_numbers(schedule(step)))
        if step not in history.steps:
            continue
        row = history.steps.index(step)
        assert set(history.columns) == set(expected) | {"update_ratio"}    # a series no layer has is left out
        for series, values in expected.items():
            labels = history.columns[series]
            assert sorted(labels) == sorted(values), (step, series)    # every layer, nested ones included
            recorded, values = history.series[series][row], [values[k] for k in labels]
            if series == "act_saturation":                     # a count of units: exactly the same
                assert recorded == pytest.approx(values, abs=1e-9), (step, series)
            elif series.endswith("_mean"):                     # cancelling (LayerNorm's is 0): judged by the spread
                spreads = [expected[series.replace("mean", "std")][k] for k in labels]
                for label, got, want, spread in zip(labels, recorded, values, spreads, strict=True):
                    assert got == pytest.approx(want, rel=1e-5, abs=max(1e-9, 1e-7 * spread)), (step, series, label)
            else:                                              # float32 twins round differently
                assert recorded == pytest.approx(values, rel=1e-5, abs=1e-9), (step, series)
        after = model.parameters()
        ratios = [((after[k] - before[k]).std() / after[k].std()).log10().item() for k in after]
        assert history.series["update_ratio"][row] == pytest.approx(ratios, rel=1e-6), step
        if step == 0:
            check_first_snapshots(history, name, passes, scored, scale, model)
    if config.grad_clip:
        assert max(norms) > config.grad_clip                   # the clipping took place
    for k, p in trained.parameters().items():
        assert torch.equal(p, model.parameters()[k]), k        # the replay took exactly the run's steps


def check_first_snapshots(history, name, passes, scored, scale, model):
    """The first recorded step's histogram tensors are autograd's, at the scored positions (padding left out)."""
    _, outputs, output_grads, param_grads = passes
    at = (lambda t: t) if scored is None else (lambda t: t[scored])
    watched = [k for k in outputs if kind(k) in WATCHED[name][0]]
    logits = [f"{len(model.layers) - 1}.Linear"] if name in ("transformer", "rnn", "gru") else []
    weights = [k for k, p in model.parameters().items() if p.ndim == 2]
    keys = {f"act.{k}" for k in watched} | {f"grad.{k}" for k in watched + logits}
    keys |= {f"weight_grad.{w}" for w in weights}
    assert set(history.snapshots) == {f"{prefix}.{k}" for prefix in ("first", "last") for k in keys}
    # float32 twins round differently: each entry within 1e-5 of the tensor's scale
    for k in watched:
        close_to_scale(history.snapshots[f"first.act.{k}"], at(outputs[k]))
    for k in watched + logits:
        close_to_scale(history.snapshots[f"first.grad.{k}"], at(output_grads[k]))
    for w in weights:
        close_to_scale(history.snapshots[f"first.weight_grad.{w}"], scale * param_grads[w])   # as clipped


def close_to_scale(recorded, expected, rel=1e-5):
    """Every entry of recorded within rel * max|expected| of expected's, and the same shape."""
    torch.testing.assert_close(recorded, expected, rtol=0, atol=rel * expected.abs().max().item())


def test_snapshots_hold_the_first_and_last_recorded_tensors(tmp_path):
    corpus, model_config = load_corpus(), preset("mlp", n_hidden=16)
    train(corpus, model_config, TrainConfig(max_steps=3, diagnostics_every=2, seed=3, log_every=10), tmp_path)
    history = load_history(tmp_path / FILENAME)
    splits = make_splits(corpus, model_config.block_size)
    generator = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        model = build_model(model_config, generator)
    Xb, Yb = sample_batch(*splits.tensors["train"], 32, generator)
    _, outputs, output_grads, param_grads = autograd_pass(model, Xb, Yb)
    torch.testing.assert_close(history.snapshots["first.act.4.Tanh"], outputs["4.Tanh"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(history.snapshots["first.grad.4.Tanh"], output_grads["4.Tanh"], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(history.snapshots["first.weight_grad.2.weight"], param_grads["2.weight"], rtol=1e-5,
                               atol=1e-9)
    assert set(history.snapshots) == {f"{p}.{k}" for p in ("first", "last") for k in
                                      ("act.4.Tanh", "grad.4.Tanh", "weight_grad.0.weight", "weight_grad.2.weight",
                                       "weight_grad.5.weight")}
    assert not torch.equal(history.snapshots["first.act.4.Tanh"], history.snapshots["last.act.4.Tanh"])


def first_saturation(tmp_path, *flags):
    work_dir = tmp_path / "-".join(flags)
    argv = ["train", "-o", str(work_dir), "--model", "deep", "--max-steps", "1", "--diagnostics-every", "1", *flags]
    assert main(argv) == 0
    return load_history(work_dir / FILENAME).series["act_saturation"][0]


def test_naive_init_saturates_the_tanh_layers_far_more_than_the_lecture_init(tmp_path, capsys):
    naive = first_saturation(tmp_path, "--init", "naive", "--no-batchnorm")
    lecture = first_saturation(tmp_path, "--init", "lecture", "--no-batchnorm")
    batchnorm = first_saturation(tmp_path, "--init", "lecture")
    assert len(naive) == len(lecture) == len(batchnorm) == 5
    # unit-variance weights: preactivations with std ~sqrt(fan_in) push most units past 0.97
    assert min(naive) > 50
    assert all(n > 2 * k for n, k in zip(naive, lecture, strict=True))
    assert all(n > 2 * b for n, b in zip(naive, batchnorm, strict=True))


def test_sequential_records_only_when_asked_and_changes_no_number():
    model = build_model(preset("mlp", n_hidden=8), torch.Generator().manual_seed(0))
    X, dout = torch.randint(0, 27, (5, 3)), torch.randn(5, 27)
    y = model.forward(X)
    model.backward(dout)
    grads = dict(model.grads)
    assert model.outputs == [] and model.output_grads == []
    model.record = True
    assert torch.equal(model.forward(X), y)
    model.backward(dout)
    assert all(torch.equal(g, grads[k]) for k, g in model.grads.items())
    assert [tuple(o.shape) for o in model.outputs] == [(5, 3, 10), (5, 30), (5, 8), (5, 8), (5, 8), (5, 27)]
    assert model.output_grads[-1] is dout
    assert torch.equal(model.output_grads[0], model.layers[1].backward(model.output_grads[1]))


def test_every_nested_sequential_records_at_the_recorded_steps_only():
    model = build_model(preset("transformer", n_embd=8, n_layers=2, n_head=2, block_size=6, dropout=0.0),
                        torch.Generator().manual_seed(0))
    sequentials = [layer for layer in walk(model) if isinstance(layer, Sequential)]
    assert len(sequentials) == 5                                # the model and the inside of each of 4 residuals
    diagnostics = Diagnostics(model, every=3, max_steps=8, val_loss=lambda: 0.0)
    X, dlogits = torch.randint(0, 27, (4, 6)), torch.randn(4, 6, 27)
    for step in range(8):
        diagnostics.begin(step)
        assert [s.record for s in sequentials] == [step in (0, 3, 6, 7)] * 5, step
        model.forward(X)
        model.backward(dlogits)
        diagnostics.after_backward()
        assert not any(s.record for s in sequentials), step      # the val forward leaves what was kept alone
        diagnostics.after_update(step, 1.0)
    history = diagnostics.history
    assert history.steps == [0, 3, 6, 7]
    assert history.columns["act_mean"] == [                     # in the model's order, labelled by path
        "2.inner.0.LayerNorm", "2.inner.1.CausalSelfAttention", "3.inner.0.LayerNorm", "3.inner.2.GELU",
        "4.inner.0.LayerNorm", "4.inner.1.CausalSelfAttention", "5.inner.0.LayerNorm", "5.inner.2.GELU", "6.LayerNorm"]
    assert history.columns["grad_mean"][:7] == ["0.TokenPositionEmbedding", "1.Dropout", "2.Residual",
                                                "2.inner.0.LayerNorm", "2.inner.1.CausalSelfAttention",
                                                "2.inner.2.Dropout", "3.Residual"]
    assert len(history.columns["grad_mean"]) == 8 + 2 * (3 + 5) and "act_saturation" not in history.columns
    assert history.column("grad_mean", "7.Linear") == pytest.approx([dlogits.mean().item()] * 4)  # all scored


def test_tensorboard_logs_the_recorded_statistics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["train", "-o", str(tmp_path), "--max-steps", "20", "--diagnostics-every", "10", "--tensorboard",
                 "--n-hidden", "16"]) == 0
    history = load_history(tmp_path / FILENAME)
    events = EventAccumulator(str(tmp_path)).Reload()
    saturation = [e.value for e in events.Scalars("act_saturation/4.Tanh")]
    assert [e.step for e in events.Scalars("act_saturation/4.Tanh")] == history.steps == [0, 10, 19]
    assert saturation == pytest.approx(history.column("act_saturation", "4.Tanh"), rel=1e-6)
    train_loss = [e.value for e in events.Scalars("loss/train")]   # mean since the previous record
    windows = [history.train_loss[0:1], history.train_loss[1:11], history.train_loss[11:20]]
    assert train_loss == pytest.approx([sum(w) / len(w) for w in windows], rel=1e-6)
    assert "update_ratio/2.weight" in events.Tags()["scalars"] and "act.4.Tanh" in events.Tags()["histograms"]


def test_tensorboard_flag_without_the_package_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)     # import fails as if not installed
    work_dir = tmp_path / "run"
    assert main(["train", "-o", str(work_dir), "--max-steps", "5", "--tensorboard"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'handprop[tensorboard]'" in err
    assert not (work_dir / "model.safetensors").exists()


def test_a_resumed_run_records_the_same_history_as_a_straight_one(tmp_path, monkeypatch):
    flags = ["--max-steps", "30", "--diagnostics-every", "5", "--n-hidden", "16", "--log-every", "10"]
    assert main(["train", "-o", str(tmp_path / "straight"), *flags]) == 0
    original = Diagnostics.after_update

    def interrupt_after_step_11(self, step, loss):
        original(self, step, loss)
        if step == 11:
            os.kill(os.getpid(), signal.SIGINT)     # the loop saves at the end of this step and stops

    monkeypatch.setattr(Diagnostics, "after_update", interrupt_after_step_11)
    assert main(["train", "-o", str(tmp_path / "resumed"), *flags]) == 130
    assert len(load_history(tmp_path / "resumed" / FILENAME).train_loss) == 12
    monkeypatch.setattr(Diagnostics, "after_update", original)
    assert main(["train", "-o", str(tmp_path / "resumed"), "--resume"]) == 0   # goes on recording as it did
    straight, resumed = (load_history(tmp_path / name / FILENAME) for name in ("straight", "resumed"))
    assert resumed.steps == straight.steps == [0, 5, 10, 15, 20, 25, 29]
    assert resumed.train_loss == straight.train_loss and resumed.series == straight.series
    assert all(torch.equal(v, straight.snapshots[k]) for k, v in resumed.snapshots.items())
