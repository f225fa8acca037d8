"""Checks an exercise's data keeps, in float64 (the attention and transformer-block exercises' tests run them).

An exercise is only data: these say that the data is self-consistent before any grader reads it. The
solution equals autograd row by row, the forward is finite with the shapes its comments give, the
setup is seeded, the gradients come in an order a backward pass can follow, and every pitfall (and
forward slip) is a different value from the right one, so that its hint can be told apart.
"""

import ast
import re
from pathlib import Path

import torch

from handprop.ninja.exercise import (
    MODULES,
    check_solution,
    forward,
    parse_forward,
    reference_gradients,
    run_code,
    run_setup,
)
from handprop.ninja.grade import RTOL

SHAPE_COMMENT = re.compile(r"#\s*\(([\d,\s]*)\)")   # '# (4, 2, 5, 6): ...' -> '4, 2, 5, 6'; '# ()' -> ''
SLIP_APART = 1e-3       # a slip differs from the right value by more than this, relative to the right value
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
DOCS = Path(__file__).resolve().parents[1] / "docs"


def solved(exercise):
    """The float64 setup's tensors and constants, the forward's values, and the namespace after the solution."""
    tensors, constants = run_setup(exercise)
    values = forward(exercise, tensors, constants)
    namespace = run_code(exercise.solution_code, values, constants, f"<{exercise.name} solution>")
    return values, constants, namespace


def relative(a, b):
    """max |a - b| relative to b's largest magnitude."""
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_solution_exact(exercise):
    """Every gradient of the worked solution equals autograd's to 1e-12 of the gradient's scale.

    The scale is the gradient's own largest entry, or, for a gradient that is zero up to rounding (the
    max-subtracted softmax's max: the softmax does not depend on it), the largest entry among the
    gradients of the steps that read it, the scale its rounding comes from.
    """
    tensors, constants = run_setup(exercise)
    expected = reference_gradients(exercise, tensors, constants)
    readers = readers_of(exercise)
    for name, maxdiff, rel in check_solution(exercise):
        around = [expected[r].abs().max().item() for r in readers[name[1:]] if r in expected]
        assert rel <= 1e-12 or maxdiff <= 1e-12 * max(around, default=0.0), (name, maxdiff, rel)


def readers_of(exercise):
    """{tensor: the forward steps that read it}."""
    steps = exercise.steps()
    return {name: [out for out, step in steps.items() if name in step.inputs]
            for name in set(steps) | {i for step in steps.values() for i in step.inputs}}


def assert_forward_shapes(exercise):
    """Every forward line ends in its shape as a comment, the value has that shape, and every value is finite."""
    tensors, constants = run_setup(exercise)
    values = forward(exercise, tensors, constants)
    lines = [line for line in exercise.forward_code.splitlines() if line.strip()]
    assert len(lines) == len(exercise.steps())
    for line, name in zip(lines, exercise.steps(), strict=True):
        comment = SHAPE_COMMENT.search(line)
        assert comment, f"no shape comment: {line}"
        shape = tuple(int(d) for d in comment.group(1).replace(" ", "").split(",") if d)
        assert tuple(values[name].shape) == shape, (name, tuple(values[name].shape), shape)
        assert torch.isfinite(values[name]).all(), name
    assert values["loss"].ndim == 0


def assert_seeded(exercise):
    """Two runs of the setup give the same tensors, bit for bit, and the same constants."""
    (first, constants), (second, constants_again) = run_setup(exercise), run_setup(exercise)
    assert first.keys() == second.keys() and constants == constants_again
    for name in first:
        assert torch.equal(first[name], second[name]), name


def assert_parameters_nontrivial(exercise):
    """The parameters are float32 as the learner sees them, and none is constant (zero or one inits hide bugs)."""
    namespace = dict(MODULES)
    exec(compile(exercise.setup_code, f"<{exercise.name} setup>", "exec"), namespace)
    for name in exercise.parameters:
        p = namespace[name]
        assert p.dtype == torch.float32, name
        assert p.numel() > 1 and p.std() > 0.01, name


def assert_backward_order(exercise):
    """gradients holds every parameter and every intermediate but the loss, each after every tensor that reads it."""
    steps = exercise.steps()
    assert set(exercise.gradients) == (set(steps) - {"loss"}) | set(exercise.parameters)
    assert len(set(exercise.gradients)) == len(exercise.gradients)
    position = {name: i for i, name in enumerate(exercise.gradients)}
    for name, readers in readers_of(exercise).items():
        for reader in readers:
            if name in position and reader in position:
                assert position[reader] < position[name], f"d{name} comes before d{reader}, which it needs"


def assert_pitfalls_apart(exercise, at_least):
    """Each pitfall's slip assigns its gradient, runs on the solved values, and is no right gradient: it differs from
    the right one (and from every other slip for that gradient) by more than SLIP_APART."""
    assert len(exercise.pitfalls) >= at_least
    values, constants, namespace = solved(exercise)
    right = {name: namespace["d" + name] for name in exercise.gradients}
    slipped = {}
    for pitfall in exercise.pitfalls:
        assigned = {t.id for node in ast.walk(ast.parse(pitfall.slip)) if isinstance(node, ast.Assign | ast.AugAssign)
                    for t in ([node.target] if isinstance(node, ast.AugAssign) else node.targets)
                    if isinstance(t, ast.Name)}
        assert "d" + pitfall.gradient in assigned, pitfall.slip
        tensors = {name: t.clone() for name, t in namespace.items() if isinstance(t, torch.Tensor)}
        value = run_code(pitfall.slip, tensors, constants, f"<{exercise.name} slip>")["d" + pitfall.gradient]
        assert value.shape == right[pitfall.gradient].shape, pitfall.slip
        assert relative(value, right[pitfall.gradient]) > SLIP_APART, pitfall.slip
        for other in slipped.get(pitfall.gradient, []):
            assert relative(value, other) > SLIP_APART, pitfall.slip
        slipped.setdefault(pitfall.gradient, []).append(value)
        assert pitfall.hint and "\n" not in pitfall.hint


def assert_forward_slips_apart(exercise):
    """Each forward slip is an expression of the step's own inputs with the right shape and a value apart from the
    right one."""
    tensors, constants = run_setup(exercise)
    values = forward(exercise, tensors, constants)
    steps = exercise.steps()
    for slip in exercise.forward_slips:
        (step,) = parse_forward(f"{slip.name} = {slip.slip}", exercise.constants).values()
        assert set(step.inputs) <= set(steps[slip.name].inputs), slip.slip
        wrong = step(values, constants)
        assert wrong.shape == values[slip.name].shape, slip.slip
        assert relative(wrong, values[slip.name]) > SLIP_APART, slip.slip


def assert_float32_solution_passes(exercise):
    """The worked solution run in float32, as a learner's file runs, is within the grader's RTOL of autograd's
    float64 gradients (scaled as the grader scales them: by the gradient and the gradients of its readers)."""
    tensors, constants = run_setup(exercise, torch.float32)
    values = forward(exercise, tensors, constants)
    mine = run_code(exercise.solution_code, values, constants, f"<{exercise.name} solution>")
    as64 = {k: v.double() if v.is_floating_point() else v for k, v in tensors.items()}
    expected = reference_gradients(exercise, as64, constants)
    readers = readers_of(exercise)
    for name in exercise.gradients:
        assert mine["d" + name].dtype == torch.float32, name
        scale = max(expected[n].abs().max().item() for n in [name] + readers[name] if n in expected)
        assert (mine["d" + name].double() - expected[name]).abs().max().item() <= RTOL * scale, name


def assert_page_shows_the_code(exercise):
    """The derivation page's python blocks hold every line of the forward and of the solution, and no other code."""
    page = (DOCS / exercise.page).read_text()
    shown = {line.strip() for block in PYTHON_BLOCK.findall(page) for line in block.splitlines()}
    code = {line.strip() for line in (exercise.forward_code + exercise.solution_code).splitlines()}
    code = {line for line in code if line and not line.startswith("#")}
    assert not code - shown, f"not on the page: {sorted(code - shown)}"
    extra = {line for line in shown - code if line and not line.startswith("#")}
    assert not extra, f"on the page only: {sorted(extra)}"
