"""The wavenet exercise: its worked solution, its forward, its pitfalls, and handprop's layers on its numbers."""

from exercise_structure_checks import (
    SOLUTION_RTOL,
    forward_problems,
    forward_slip_problems,
    order_problems,
    page_problems,
    relative_diff,
    setup_problems,
    slip_problems,
    solution_problems,
)

from handprop.layers import BatchNorm1d, Embedding, FlattenConsecutive, Linear, Sequential, Tanh
from handprop.losses import CrossEntropy
from handprop.ninja.exercise import forward, run_code, run_setup
from handprop.ninja.exercises.wavenet import EXERCISE, STEP_BY_STEP


def test_the_solution_matches_autograd_step_by_step_and_in_one_step():
    assert not solution_problems(EXERCISE)                      # ends with level 1's BatchNorm in one step
    assert not solution_problems(EXERCISE, STEP_BY_STEP)        # every gradient of step 1


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


def test_the_batch_looks_up_some_characters_more_than_once():
    # so a dC that keeps one of several lookups (dC[Xb] += demb) is wrong on these numbers
    tensors, _ = run_setup(EXERCISE)
    assert tensors["Xb"].view(-1).bincount().max() > 1


def test_the_solution_is_handprops_layers_on_the_same_numbers():
    t, constants = run_setup(EXERCISE)
    values = forward(EXERCISE, t, constants)
    solution = run_code(EXERCISE.solution_code, dict(values), constants, "<wavenet solution>")
    eps = constants["eps"]
    model = Sequential([
        Embedding(t["C"]),
        FlattenConsecutive(2), Linear(t["W_1"]), BatchNorm1d(t["bngain_1"], t["bnbias_1"], eps=eps), Tanh(),
        FlattenConsecutive(2), Linear(t["W_2"]), BatchNorm1d(t["bngain_2"], t["bnbias_2"], eps=eps), Tanh(),
        FlattenConsecutive(2), Linear(t["W_3"]), BatchNorm1d(t["bngain_3"], t["bnbias_3"], eps=eps), Tanh(),
        Linear(t["W_out"], t["b_out"]),
    ])
    criterion = CrossEntropy()
    loss = criterion.forward(model.forward(t["Xb"]), t["Yb"])
    model.backward(criterion.backward())
    assert relative_diff(values["loss"], loss) <= SOLUTION_RTOL
    layer_names = {
        "0.weight": "C", "2.weight": "W_1", "3.weight": "bngain_1", "3.bias": "bnbias_1",
        "6.weight": "W_2", "7.weight": "bngain_2", "7.bias": "bnbias_2",
        "10.weight": "W_3", "11.weight": "bngain_3", "11.bias": "bnbias_3", "13.weight": "W_out", "13.bias": "b_out",
    }
    assert set(layer_names) == set(model.grads) and set(layer_names.values()) == set(EXERCISE.parameters)
    for key, name in layer_names.items():
        assert relative_diff(solution["d" + name], model.grads[key]) <= SOLUTION_RTOL, name
