"""The transformer-block exercise's data: its solution is autograd's, its pitfalls are real, and handprop's own
transformer layers (the ones `handprop train --model transformer` trains) compute the same loss and gradients."""

import exercise_data_checks as checks
import torch
import torch.nn.functional as F

from handprop.layers import (
    GELU,
    CausalSelfAttention,
    LayerNorm,
    Linear,
    Residual,
    Sequential,
    TokenPositionEmbedding,
)
from handprop.losses import SequenceCrossEntropy
from handprop.ninja.exercises.transformer_block import EXERCISE


def test_solution_equals_autograd():
    checks.assert_solution_exact(EXERCISE)


def test_forward_is_finite_with_the_shapes_its_comments_give():
    checks.assert_forward_shapes(EXERCISE)


def test_setup_is_seeded_and_its_parameters_not_constant():
    checks.assert_seeded(EXERCISE)
    checks.assert_parameters_nontrivial(EXERCISE)


def test_gradients_come_in_backward_order():
    checks.assert_backward_order(EXERCISE)


def test_every_pitfall_is_a_value_apart_from_the_right_one():
    checks.assert_pitfalls_apart(EXERCISE, at_least=10)
    checks.assert_forward_slips_apart(EXERCISE)


def test_chunked_steps_are_the_library_functions_their_comments_name():
    values, constants, _ = checks.solved(EXERCISE)
    assert checks.relative(values["gelu"], F.gelu(values["h"], approximate="tanh")) <= 1e-12
    for ln, x in (("ln1", "x"), ("ln2", "x1"), ("lnf", "x2")):
        expected = F.layer_norm(values[x], (constants["C"],), values[ln + "_w"], values[ln + "_b"], constants["eps"])
        assert checks.relative(values[ln], expected) <= 1e-12, ln


def test_padding_takes_no_part_in_the_loss_or_its_gradient():
    values, _, mine = checks.solved(EXERCISE)
    padded = values["targets"] == -1
    assert padded.sum() == 4 and (mine["dlogits"][padded] == 0).all()
    assert (mine["dlogits"][~padded] != 0).all()
    # the tokens idx repeats (the padding's 0 among them) are what makes the scatter-add pitfall visible
    assert torch.bincount(values["idx"].view(-1)).max() > 1


def test_solution_matches_handprop_transformer_layers():
    values, constants, mine = checks.solved(EXERCISE)
    v, n_head = values, constants["n_head"]
    model = Sequential([
        TokenPositionEmbedding(v["wte"], v["wpe"]),
        Residual(Sequential([
            LayerNorm(v["ln1_w"], v["ln1_b"]),
            CausalSelfAttention(Linear(v["W_qkv"], v["b_qkv"]), Linear(v["W_attn_proj"], v["b_attn_proj"]), n_head),
        ])),
        Residual(Sequential([
            LayerNorm(v["ln2_w"], v["ln2_b"]), Linear(v["W_fc"], v["b_fc"]), GELU(),
            Linear(v["W_mlp_proj"], v["b_mlp_proj"]),
        ])),
        LayerNorm(v["lnf_w"], v["lnf_b"]),
        Linear(v["W_head"]),
    ])
    loss_fn = SequenceCrossEntropy()
    loss = loss_fn.forward(model.forward(v["idx"]), v["targets"])
    assert abs(loss.item() - v["loss"].item()) <= 1e-12 * v["loss"].item()
    model.backward(loss_fn.backward())
    named = {id(tensor): name for name, tensor in values.items()}
    parameters = model.parameters()
    assert sorted(named[id(p)] for p in parameters.values()) == sorted(EXERCISE.parameters)
    for key, gradient in model.grads.items():
        name = named[id(parameters[key])]
        assert checks.relative(mine["d" + name], gradient) <= 1e-12, name


def test_solution_in_float32_is_within_the_graders_tolerance():
    checks.assert_float32_solution_passes(EXERCISE)


def test_the_derivation_page_shows_the_forward_and_every_line_of_the_solution():
    checks.assert_page_shows_the_code(EXERCISE)
