"""The attention exercise beyond what every exercise keeps (test_exercises.py): its two softmax backwards and the
future they leave at zero, handprop's own CausalSelfAttention on its numbers, and a mask the grader can check."""

import torch
from exercise_checks import relative, solved

from handprop.layers import CausalSelfAttention, Linear
from handprop.ninja.exercise import reference_gradients, run_code
from handprop.ninja.exercises.attention import EXERCISE, EXERCISE_1, FUSED
from handprop.ninja.grade import RTOL


def test_chunked_and_one_step_softmax_backward_both_equal_autograd_and_leave_the_future_at_zero():
    tensors, constants, values, _ = solved(EXERCISE)
    expected = reference_gradients(EXERCISE, tensors, constants)["scores_scaled"]
    chunked = run_code(EXERCISE_1, values, constants, "<exercise 1>")
    (fused,) = FUSED
    one_step = run_code(fused.code, {**values, "datt": chunked["datt"]}, constants, "<exercise 2>")
    future = values["tril"] == 0
    for mine in (chunked["dscores_scaled"], one_step["dscores_scaled"]):
        assert relative(mine, expected) <= 1e-12
        assert (mine[..., future] == 0).all()
    leaky = next(p for p in EXERCISE.pitfalls if "masked positions" in p.hint)
    leaked = run_code(leaky.slip, {**values, "datt": chunked["datt"]}, constants, "<slip>")["dscores_scaled"]
    assert (leaked[..., future] != 0).all()


def test_solution_matches_handprop_causal_self_attention():
    _, constants, values, mine = solved(EXERCISE)
    layer = CausalSelfAttention(Linear(values["W_qkv"], values["b_qkv"]), Linear(values["W_proj"], values["b_proj"]),
                                constants["n_head"])
    assert relative(layer.forward(values["x"]), values["out"]) <= 1e-12
    dx = layer.backward(values["upstream"])
    theirs = {"x": dx, "W_qkv": layer.grads["qkv.weight"], "b_qkv": layer.grads["qkv.bias"],
              "W_proj": layer.grads["proj.weight"], "b_proj": layer.grads["proj.bias"]}
    for name, gradient in theirs.items():
        assert relative(mine["d" + name], gradient) <= 1e-12, name
    assert torch.equal(mine["dout"], values["upstream"])


def test_the_mask_keeps_every_forward_step_checkable_by_the_grader():
    """The grader checks a forward step to RTOL of the largest magnitude among its value and inputs: the mask's fill
    value sets that scale for four steps, so it must be finite and small enough to keep the check near 0.1 or finer
    (-inf or -1e9 would pass `scores.masked_fill(...)`, the unscaled scores masked, as right)."""
    _, _, values, _ = solved(EXERCISE)
    for name, step in EXERCISE.steps().items():
        scale = max(values[n].abs().max().item() for n in (name, *step.inputs) if values[n].is_floating_point())
        assert RTOL * scale < 0.11, name
    future = values["tril"] == 0
    assert (values["att"][..., future] == 0).all() and (values["counts"][..., future] == 0).all()
