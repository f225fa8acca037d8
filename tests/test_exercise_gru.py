"""The `gru` exercise: its data (exercise_checks.py), and its solution equal to handprop's Recurrent(GRUCell) layer."""

import torch
from exercise_checks import (
    check_forward_shapes_and_finite,
    check_forward_slips,
    check_gradient_order,
    check_pitfalls,
    check_runs_as_a_float32_script,
    check_setup_seeded_float32_nontrivial,
    check_solution_matches_autograd,
    check_solution_writes,
    relative,
    solved,
)

from handprop.layers import Embedding, GRUCell, Linear, Recurrent
from handprop.losses import SequenceCrossEntropy
from handprop.ninja.exercises.gru import EXERCISE, T

CELL_NAMES = {"Wz": "weight_z", "bz": "bias_z", "Wr": "weight_r", "br": "bias_r", "Whbar": "weight_hbar",
              "bhbar": "bias_hbar"}     # the exercise's parameter names -> GRUCell's


def test_solution_matches_autograd():
    check_solution_matches_autograd(EXERCISE)


def test_forward_is_finite_with_the_shapes_its_comments_say():
    check_forward_shapes_and_finite(EXERCISE)


def test_setup_forward_and_solution_run_as_a_float32_script():
    check_runs_as_a_float32_script(EXERCISE)


def test_setup_is_seeded_float32_and_nontrivial():
    check_setup_seeded_float32_nontrivial(EXERCISE)


def test_every_pitfall_is_a_real_slip():
    check_pitfalls(EXERCISE)


def test_every_forward_slip_is_wrong():
    check_forward_slips(EXERCISE)


def test_gradients_come_after_their_readers():
    check_gradient_order(EXERCISE)


def test_solution_writes_in_order_and_adds_only_where_a_tensor_fans_out():
    check_solution_writes(EXERCISE)


def test_the_batch_looks_up_rows_more_than_once():
    """What the scatter-add needs to show: rows of C looked up more than once (every name starts with '.')."""
    tensors, constants, _, _ = solved(EXERCISE)
    assert tensors["Xb"].shape == (constants["B"], T) and torch.bincount(tensors["Xb"].view(-1)).max() > 1


def test_solution_equals_the_recurrent_layer():
    """The same numbers through Embedding, Recurrent(GRUCell), Linear and SequenceCrossEntropy, forward and back."""
    tensors, _, values, mine = solved(EXERCISE)
    embedding, head = Embedding(tensors["C"]), Linear(tensors["Wout"], tensors["bout"])
    cell = GRUCell(*(tensors[name] for name in CELL_NAMES))
    recurrent = Recurrent(cell, tensors["start"][0])
    loss_fn = SequenceCrossEntropy()
    hs = recurrent.forward(embedding.forward(tensors["Xb"]))        # (B, T, n_hidden)
    loss = loss_fn.forward(head.forward(hs), tensors["Yb"])
    assert relative(hs, values["hs"]) < 1e-12 and relative(loss, values["loss"]) < 1e-12
    dlogits = loss_fn.backward()
    dhs = head.backward(dlogits)
    demb = recurrent.backward(dhs)
    embedding.backward(demb)
    layers = {
        "dlogits": dlogits, "dhs": dhs, "demb": demb, "dC": embedding.grads["weight"],
        "dWout": head.grads["weight"], "dbout": head.grads["bias"], "dstart": recurrent.grads["h0"][None],
    } | {f"d{mine_name}": recurrent.grads[f"cell.{layer_name}"] for mine_name, layer_name in CELL_NAMES.items()}
    for name, layer_grad in layers.items():
        assert relative(mine[name], layer_grad) < 1e-12, name
