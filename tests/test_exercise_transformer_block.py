"""The transformer-block exercise beyond what every exercise keeps (test_exercises.py): its chunked steps are the
library's functions, its padding is left out, and handprop's own transformer layers (the ones `handprop train --model
transformer` trains) compute the same loss and gradients."""

import torch.nn.functional as F
from exercise_checks import relative, solved

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


def test_chunked_steps_are_the_library_functions_their_comments_name():
    _, constants, values, _ = solved(EXERCISE)
    assert relative(values["gelu"], F.gelu(values["h"], approximate="tanh")) <= 1e-12
    for ln, x in (("ln1", "x"), ("ln2", "x1"), ("lnf", "x2")):
        expected = F.layer_norm(values[x], (constants["C"],), values[ln + "_w"], values[ln + "_b"], constants["eps"])
        assert relative(values[ln], expected) <= 1e-12, ln


def test_padding_takes_no_part_in_the_loss_or_its_gradient():
    _, _, values, mine = solved(EXERCISE)
    padded = values["targets"] == -1
    assert padded.sum() == 4 and (mine["dlogits"][padded] == 0).all()
    assert (mine["dlogits"][~padded] != 0).all()


def test_solution_matches_handprop_transformer_layers():
    _, constants, values, mine = solved(EXERCISE)
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
        assert relative(mine["d" + name], gradient) <= 1e-12, name
