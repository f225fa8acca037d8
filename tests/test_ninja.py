"""The lecture's step-by-step network (exercises/mlp.py), the hand-written exercises 1-3 (solutions.py), `handprop
check`."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from handprop import cli
from handprop.cli import main
from handprop.ninja import solutions as ninja
from handprop.ninja.exercise import Fused, forward, reference_gradients, run_code, run_setup
from handprop.ninja.exercises.mlp import EXERCISE as MLP


@pytest.fixture(scope="module")
def tensors():
    return {name: run_setup(MLP, torch.float32)[0][name] for name in MLP.inputs()}


def lecture_forward(tensors):
    return forward(MLP, tensors, {"n": 32})


@pytest.fixture(scope="module")
def exercises():
    return ninja.check_exercises()


def test_the_lecture_setup(tensors):
    assert sum(tensors[name].numel() for name in MLP.parameters) == 4137
    assert tensors["Xb"].shape == (32, 3) and tensors["Yb"].shape == (32,)
    # non-trivial parameters: a zero bias or a unit gain could hide a wrong backward
    assert tensors["b1"].abs().min() > 0 and tensors["b2"].abs().min() > 0 and tensors["bnbias"].abs().min() > 0
    assert (tensors["bngain"] != 1).all()
    assert all(torch.equal(tensors[k], run_setup(MLP, torch.float32)[0][k]) for k in tensors)  # fixed seed


def test_the_step_by_step_loss_is_the_lectures_starting_point(tensors):
    loss = lecture_forward(tensors)["loss"].item()
    assert loss == pytest.approx(3.3677, abs=1e-4)          # the lecture's run: 3.3377 (bngain, bnbias differ)
    assert abs(loss - 3.34) < 0.05 and loss > math.log(27)


def test_the_steps_compose_to_the_compact_network(tensors):
    t = {k: v.double() if v.is_floating_point() else v for k, v in tensors.items()}
    hprebn = t["C"][t["Xb"]].view(32, -1) @ t["W1"] + t["b1"]
    hpreact = t["bngain"] * (hprebn - hprebn.mean(0)) / torch.sqrt(hprebn.var(0, correction=1) + 1e-5) + t["bnbias"]
    compact = F.cross_entropy(torch.tanh(hpreact) @ t["W2"] + t["b2"], t["Yb"])
    assert lecture_forward(t)["loss"].item() == pytest.approx(compact.item(), abs=1e-12)


def test_exercise_1_every_row_passes_and_is_bit_exact(exercises):
    rows = exercises["exercise 1: backprop through every intermediate"]
    assert [r.name for r in rows] == list(MLP.gradients) and len(rows) == 26
    assert all(r.ok and r.approximate and r.maxdiff <= 1e-8 for r in rows)
    # every step is the same float32 arithmetic autograd does, as in the lecture
    assert all(r.exact and r.maxdiff == 0.0 for r in rows)


def test_exercises_2_and_3_pass(exercises):
    (ex2,) = exercises["exercise 2: cross-entropy in one step"]
    (ex3,) = exercises["exercise 3: BatchNorm in one step"]
    assert ex2.name == "logits" and ex2.ok and ex2.maxdiff <= 1e-8
    assert ex3.name == "hprebn" and ex3.ok and ex3.maxdiff <= 1e-8


def biased_fused_batchnorm():
    """The mlp exercise's pitfall: the fused BatchNorm backward written for the biased (1/n) variance."""
    (slip,) = [p.slip for p in MLP.pitfalls if p.gradient == "hprebn"]
    return slip


def test_cmp_fails_a_wrong_gradient(tensors):
    v = lecture_forward(tensors)
    reference = reference_gradients(MLP, tensors, {"n": 32})["hprebn"]
    mine = run_code(MLP.solution_code, v, {"n": 32}, "<solution>")
    biased = run_code(biased_fused_batchnorm(), v | {"dhpreact": mine["dhpreact"]}, {"n": 32}, "<slip>")["dhprebn"]
    row = ninja.cmp("hprebn", biased, reference)
    assert not row.ok and not row.exact and row.maxdiff > 1e-6
    assert not ninja.cmp("x", reference * (1 + 1e-4), reference).ok


def test_format_cmp_shows_the_lectures_columns(exercises):
    text = ninja.format_cmp(exercises["exercise 3: BatchNorm in one step"])
    header, row = text.splitlines()
    assert header.split("|")[:4] == ["tensor          ", " exact ", " approximate ", "  maxdiff "]
    assert row.startswith("hprebn") and "False" in row and row.endswith("ok")


def test_handprop_check_passes_and_prints_every_table(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    for title in ("exercise 1", "exercise 2", "exercise 3", "every layer and the loss (float64"):
        assert title in out
    for layer in (
        "Embedding", "Linear", "BatchNorm1d bessel", "BatchNorm1d biased", "Tanh", "FlattenConsecutive", "CrossEntropy",
    ):
        assert f"\n{layer}" in out
    assert "FAIL" not in out
    assert out.rstrip().splitlines()[-1].startswith("28 float32 rows and ")
    assert out.rstrip().endswith("float64 rows: all pass")


def test_handprop_check_exits_1_when_a_row_fails(monkeypatch, capsys):
    cross_entropy, batchnorm = MLP.fused
    biased = Fused("hprebn", batchnorm.title, biased_fused_batchnorm())
    monkeypatch.setattr(ninja, "MLP", dataclasses.replace(MLP, fused=(cross_entropy, biased)))
    monkeypatch.setattr(cli, "check_layers", lambda: [])        # the float64 part is proven in the test above
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert out.count("FAIL") == 2 and out.rstrip().endswith("1 FAIL")
