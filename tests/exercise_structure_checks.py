"""What every exercise's own tests check, whatever its network: helpers for tests/test_exercise_*.py.

Each returns the problems it finds (an empty list when there are none), so a failing test names them.
"""

import ast
import dataclasses
import re
from pathlib import Path

import torch

from handprop.ninja.exercise import (
    check_solution,
    forward,
    parse_forward,
    reference_gradients,
    run_code,
    run_setup,
)

SOLUTION_RTOL = 1e-12   # a worked solution equals autograd in float64 up to rounding
SLIP_RTOL = 1e-3        # a slip must be this far from the right gradient (relative), or of another shape
SHAPE_COMMENT = re.compile(r"^(\w+) = .*#\s*(\([\d, ]*\))")
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
DOCS = Path(__file__).resolve().parents[1] / "docs"


def relative_diff(a, b):
    """max |a - b| relative to b's largest magnitude."""
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-300)


def solution_problems(exercise, solution_code=None):
    """The gradients of solution_code (default: the exercise's) that differ from autograd by more than rounding."""
    if solution_code is not None:
        exercise = dataclasses.replace(exercise, solution_code=solution_code, fused=())
    return [(name, rel) for name, _, rel in check_solution(exercise) if not rel <= SOLUTION_RTOL]


def setup_code_tensors(exercise):
    """The tensors setup_code makes, as it makes them (no cast)."""
    namespace = run_code(exercise.setup_code, {}, {}, f"<{exercise.name} setup>")
    return {k: v for k, v in namespace.items() if isinstance(v, torch.Tensor)}


def setup_problems(exercise):
    """Parameters that are not float32, trivially 0/1 or constant; a setup that differs between two runs."""
    first, second = setup_code_tensors(exercise), setup_code_tensors(exercise)
    problems = [f"{k} differs between runs" for k in first if not torch.equal(first[k], second[k])]
    for name in exercise.parameters:
        p = first[name]
        if p.dtype != torch.float32:
            problems.append(f"{name} is {p.dtype}, not float32")
        elif p.numel() > 1 and p.std() == 0 or bool(((p == 0) | (p == 1)).all()):
            problems.append(f"{name} is trivial (constant, or all 0 and 1)")
    return problems


def commented_shapes(exercise):
    """{name: shape} as the forward's comments write them: `xhat = xdiff * xvar_inv  # (4, 5, 8)`."""
    shapes = {}
    for line in exercise.forward_code.splitlines():
        found = SHAPE_COMMENT.match(line)
        if found:
            shapes[found.group(1)] = tuple(ast.literal_eval(found.group(2)))
    return shapes


def forward_problems(exercise):
    """Steps without a shape comment, whose value has another shape than it says, or that are not finite."""
    tensors, constants = run_setup(exercise)
    values = forward(exercise, tensors, constants)
    shapes = commented_shapes(exercise)
    problems = []
    for name in exercise.steps():
        if name not in shapes:
            problems.append(f"{name}: no shape comment")
        elif tuple(values[name].shape) != shapes[name]:
            problems.append(f"{name}: {tuple(values[name].shape)}, the comment says {shapes[name]}")
        if not torch.isfinite(values[name]).all():
            problems.append(f"{name}: not finite")
    return problems


def order_problems(exercise):
    """Gradients listed before a step that reads them (its gradient is needed first); intermediates not listed."""
    steps = exercise.steps()
    position = {name: i for i, name in enumerate(exercise.gradients)}
    problems = []
    expected = (set(steps) - {"loss"}) | set(exercise.parameters)
    if set(exercise.gradients) != expected or len(exercise.gradients) != len(expected):
        problems.append(f"gradients should list each intermediate and parameter once: {sorted(expected)}")
    for reader, step in steps.items():
        for name in step.inputs:
            if name in position and reader in position and position[name] < position[reader]:
                problems.append(f"d{name} comes before d{reader}, but {reader} reads {name}")
    return problems


def gradient_scope(exercise):
    """The forward values, the constants and autograd's d<name> for every gradient: what a slip runs with."""
    tensors, constants = run_setup(exercise)
    values = forward(exercise, tensors, constants)
    truth = reference_gradients(exercise, tensors, constants)
    return values | {"d" + name: g for name, g in truth.items()}, constants, truth


def slip_problems(exercise):
    """Pitfalls whose slip fails to run, or gives (nearly) the right gradient with the right shape."""
    scope, constants, truth = gradient_scope(exercise)
    problems = []
    for pitfall in exercise.pitfalls:
        name = "d" + pitfall.gradient
        try:
            slipped = run_code(pitfall.slip, dict(scope), constants, f"<slip {name}>")[name]
        except Exception as e:
            problems.append(f"{name}: {pitfall.slip.strip()} raised {e!r}")
            continue
        right = truth[pitfall.gradient]
        if slipped.shape == right.shape and not relative_diff(slipped, right) > SLIP_RTOL:
            problems.append(f"{name}: {pitfall.slip.strip()} is the right gradient")
    return problems


def forward_slip_problems(exercise):
    """Forward slips that fail to run, or compute (nearly) the right value with the right shape."""
    tensors, constants = run_setup(exercise)
    values = forward(exercise, tensors, constants)
    problems = []
    for slip in exercise.forward_slips:
        (step,) = parse_forward(f"{slip.name} = {slip.slip}", exercise.constants).values()
        wrong, right = step(values, constants), values[slip.name]
        if wrong.shape == right.shape and not relative_diff(wrong, right) > SLIP_RTOL:
            problems.append(f"{slip.name} = {slip.slip} is the right value")
    return problems


def page_problems(exercise):
    """Lines of the forward and the solution that the derivation page's code leaves out, and code lines it has that
    neither has (comments aside): the page derives exactly the exercise's code."""
    page = DOCS / exercise.page
    if not page.is_file():
        return [f"no page {page}"]
    shown = {line.strip() for block in PYTHON_BLOCK.findall(page.read_text()) for line in block.splitlines()}
    source = {line.strip() for line in (exercise.forward_code + exercise.solution_code).splitlines()}
    code = {line for line in source if line and not line.startswith("#")}
    return ([f"not on the page: {line}" for line in sorted(code - shown)]
            + [f"on the page only: {line}" for line in sorted(shown - source) if line and not line.startswith("#")])
