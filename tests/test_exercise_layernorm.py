"""The layernorm exercise: its worked solution, its forward, its pitfalls, and handprop's LayerNorm on its numbers."""

import torch
from exercise_structure_checks import (
    SOLUTION_RTOL,
    forward_problems,
    forward_slip_problems,
    gradient_scope,
    order_problems,
    page_problems,
    relative_diff,
    setup_problems,
    slip_problems,
    solution_problems,
)

from handprop.layers import LayerNorm
from handprop.ninja.exercise import forward, run_code, run_setup
from handprop.ninja.exercises.layernorm import EXERCISE, STEP_BY_STEP


def test_the_solution_matches_autograd_step_by_step_and_in_one_step():
    assert not solution_problems(EXERCISE)                      # ends with the one-step dx
    assert not solution_problems(EXERCISE, STEP_BY_STEP)        # every dx of step 1, before the one-step formula


def test_the_forward_is_finite_with_the_shapes_its_comments_say():
    assert not forward_problems(EXERCISE)


def test_the_setup_is_seeded_float32_and_not_trivial():
    assert not setup_problems(EXERCISE)


def test_the_derivation_page_shows_the_forward_and_every_line_of_the_solution():
    assert not page_problems(EXERCISE)


def test_each_gradient_comes_after_every_step_that_reads_its_tensor():
    assert not order_problems(EXERCISE)


def test_every_pitfall_and_forward_slip_runs_and_is_wrong():
    assert len(EXERCISE.pitfalls) >= 4
    assert not slip_problems(EXERCISE)
    assert not forward_slip_problems(EXERCISE)


def test_the_variance_slips_are_off_by_the_bessel_factor_only():
    # the slips' own arithmetic: dxdiff2 with 1/(C-1) is the right one times C/(C-1), exactly
    scope, constants, truth = gradient_scope(EXERCISE)
    C = constants["C"]
    (bessel,) = [p for p in EXERCISE.pitfalls if p.gradient == "xdiff2"]
    slipped = run_code(bessel.slip, dict(scope), constants, "<slip>")["dxdiff2"]
    assert relative_diff(slipped, truth["xdiff2"] * C / (C - 1)) <= SOLUTION_RTOL


def test_the_solution_is_handprops_layernorm_on_the_same_numbers():
    tensors, constants = run_setup(EXERCISE)
    values = forward(EXERCISE, tensors, constants)
    solution = run_code(EXERCISE.solution_code, dict(values), constants, "<layernorm solution>")
    layer = LayerNorm(tensors["gamma"], tensors["beta"], eps=constants["eps"])
    out = layer.forward(tensors["x"])
    dx = layer.backward(tensors["upstream"])
    assert relative_diff(values["out"], out) <= SOLUTION_RTOL
    assert relative_diff(solution["dx"], dx) <= SOLUTION_RTOL
    assert relative_diff(solution["dgamma"], layer.grads["weight"]) <= SOLUTION_RTOL
    assert relative_diff(solution["dbeta"], layer.grads["bias"]) <= SOLUTION_RTOL
    # and the layer is torch's own LayerNorm, biased variance included
    reference = torch.nn.functional.layer_norm(tensors["x"], (constants["C"],), tensors["gamma"], tensors["beta"],
                                               constants["eps"])
    assert relative_diff(values["out"], reference) <= SOLUTION_RTOL
