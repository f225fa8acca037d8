"""The layernorm exercise beyond what every exercise keeps (test_exercises.py): its variance slips, and handprop's
LayerNorm (and torch's) on its numbers."""

import torch
from exercise_checks import relative, solved

from handprop.layers import LayerNorm
from handprop.ninja.exercise import reference_gradients, run_code
from handprop.ninja.exercises.layernorm import EXERCISE


def test_the_variance_slips_are_off_by_the_bessel_factor_only():
    # the slips' own arithmetic: dxdiff2 with 1/(C-1) is the right one times C/(C-1), exactly
    tensors, constants, values, _ = solved(EXERCISE)
    truth = reference_gradients(EXERCISE, tensors, constants)
    C = constants["C"]
    (bessel,) = [p for p in EXERCISE.pitfalls if p.gradient == "xdiff2"]
    slipped = run_code(bessel.slip, values | {"d" + name: g for name, g in truth.items()}, constants, "<slip>")
    assert relative(slipped["dxdiff2"], truth["xdiff2"] * C / (C - 1)) <= 1e-12


def test_the_solution_is_handprops_layernorm_on_the_same_numbers():
    tensors, constants, values, solution = solved(EXERCISE)
    layer = LayerNorm(tensors["gamma"], tensors["beta"], eps=constants["eps"])
    out = layer.forward(tensors["x"])
    dx = layer.backward(tensors["upstream"])
    assert relative(values["out"], out) <= 1e-12
    assert relative(solution["dx"], dx) <= 1e-12
    assert relative(solution["dgamma"], layer.grads["weight"]) <= 1e-12
    assert relative(solution["dbeta"], layer.grads["bias"]) <= 1e-12
    # and the layer is torch's own LayerNorm, biased variance included
    reference = torch.nn.functional.layer_norm(tensors["x"], (constants["C"],), tensors["gamma"], tensors["beta"],
                                               constants["eps"])
    assert relative(values["out"], reference) <= 1e-12
