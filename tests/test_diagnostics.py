"""Diagnostics: the recorded statistics are the numbers an independent computation gives."""

import os
import signal
import sys

import pytest
import torch
import torch.nn.functional as F

from handprop.cli import main
from handprop.config import TrainConfig
from handprop.data import load_corpus, make_splits, sample_batch
from handprop.diagnostics import FILENAME, Diagnostics, load_history
from handprop.gradcheck import twin_forward
from handprop.losses import CrossEntropy
from handprop.models import build_model, preset
from handprop.optim import SGD, lecture_lr
from handprop.train import train


def autograd_pass(model, X, Y):
    """Every layer's output and dL/d(output), and every parameter's gradient, by autograd through the twins."""
    with torch.enable_grad():
        params = {k: v.detach().clone().requires_grad_(True) for k, v in model.parameters().items()}
        x, outputs = X, []
        for i, layer in enumerate(model.layers):
            x = twin_forward(layer, x, {name: params[f"{i}.{name}"] for name in layer.parameters()})
            x.retain_grad()
            outputs.append(x)
        loss = F.cross_entropy(x, Y)
        loss.backward()
    return loss.item(), [o.detach() for o in outputs], [o.grad for o in outputs], {k: p.grad for k, p in params.items()}


def eval_loss(model, X, Y):
    """Loss on a whole split with BatchNorm's running statistics, by the twins."""
    model.eval()
    logits = twin_forward(model, X, model.parameters())
    model.train()
    return F.cross_entropy(logits, Y).item()


def expected_statistics(model, X, Y, val):
    """The lecture's statistics of one step, computed directly from autograd's tensors."""
    loss, outputs, output_grads, param_grads = autograd_pass(model, X, Y)
    tanh = [i for i, layer in enumerate(model.layers) if type(layer).__name__ == "Tanh"]
    params = model.parameters()
    weights = [k for k, p in params.items() if p.ndim == 2]
    return loss, {
        "act_mean": [outputs[i].mean().item() for i in tanh],
        "act_std": [outputs[i].std().item() for i in tanh],
        "act_saturation": [100.0 * (outputs[i].abs() > 0.97).sum().item() / outputs[i].numel() for i in tanh],
        "grad_mean": [g.mean().item() for g in output_grads],
        "grad_std": [g.std().item() for g in output_grads],
        "grad_data": [(param_grads[w].std() / params[w].std()).item() for w in weights],
        "val_loss": [eval_loss(model, *val)],
    }


@pytest.mark.parametrize("name, overrides", [
    ("deep", dict(n_hidden=30, n_layers=3)),                   # (B, C) layers, BatchNorm, three tanh layers
    ("wavenet", dict(n_embd=8, n_hidden=16)),                  # (B, T, C) BatchNorm and FlattenConsecutive
])
def test_recorded_statistics_equal_a_direct_computation(tmp_path, name, overrides):
    corpus, model_config = load_corpus(), preset(name, **overrides)
    config = TrainConfig(max_steps=4, diagnostics_every=2, seed=7, log_every=10)   # records steps 0, 2 and 3
    trained, _ = train(corpus, model_config, config, tmp_path)
    history = load_history(tmp_path / FILENAME)
    assert history.steps == [0, 2, 3]

    # replay the run: the same seed gives the same init and batches; updates by the project's SGD
    splits = make_splits(corpus, model_config.block_size)
    (Xtr, Ytr), val = splits.tensors["train"], splits.tensors["val"]
    generator = torch.Generator().manual_seed(config.seed)
    with torch.inference_mode():
        model = build_model(model_config, generator)
    optimizer, criterion = SGD(model.parameters()), CrossEntropy()
    for step in range(config.max_steps):
        Xb, Yb = sample_batch(Xtr, Ytr, config.batch_size, generator)
        with torch.inference_mode():                           # the hand-written passes the run took
            criterion.forward(model.forward(Xb), Yb)           # (they move BatchNorm's running statistics)
            model.backward(criterion.backward())
        loss, expected = expected_statistics(model, Xb, Yb, val)
        assert history.train_loss[step] == pytest.approx(loss, rel=1e-6)
        with torch.inference_mode():
            before = {k: p.clone() for k, p in model.parameters().items()}
            optimizer.step(model.grads, lecture_lr(step, config.max_steps, config.lr, config.lr_decay_at))
        if step not in history.steps:
            continue
        row = history.steps.index(step)
        for series, values in expected.items():
            recorded = history.series[series][row]
            if series == "act_saturation":                     # a count of units: exactly the same
                assert recorded == pytest.approx(values, abs=1e-9), (step, series)
            else:                                              # float32 twins round differently
                assert recorded == pytest.approx(values, rel=1e-5, abs=1e-9), (step, series)
        after = model.parameters()
        ratios = [((after[k] - before[k]).std() / after[k].std()).log10().item() for k in after]
        assert history.series["update_ratio"][row] == pytest.approx(ratios, rel=1e-6), step
    for k, p in trained.parameters().items():
        assert torch.equal(p, model.parameters()[k]), k        # the replay took exactly the run's steps


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
    torch.testing.assert_close(history.snapshots["first.act.4.Tanh"], outputs[4], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(history.snapshots["first.grad.4.Tanh"], output_grads[4], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(history.snapshots["first.weight_grad.2.weight"], param_grads["2.weight"],
                               rtol=1e-5, atol=1e-9)
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
