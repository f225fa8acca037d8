"""What every exercise's data must satisfy, checked in float64 (tests/test_exercise_*.py call these).

Its worked solution equals autograd, and runs as a learner's float32 file does; its forward is
finite and has the shapes its comments say; its setup is seeded, float32 and non-trivial; each
pitfall's slip runs, keeps the shape and differs from the right gradient; its gradients are
listed (and written) each after every tensor that reads it, and `+=` only accumulates a tensor
that fans out.
"""

import ast
import re

import torch

from handprop.ninja.exercise import MODULES, check_solution, forward, reference_gradients, run_code, run_setup

SOLUTION_RTOL = 1e-12   # a solution row: max |solution - autograd| relative to the gradient's largest magnitude
SLIP_MIN_RELATIVE = 1e-3  # a slip must differ from the right gradient by more than this, relative
FLOAT32_RTOL = 1e-5     # the solution run as a learner's float32 file, against autograd in float32


def relative(a, b):
    """max |a - b| relative to max |b|."""
    return ((a - b).abs().max() / b.abs().max()).item()


def solved(exercise):
    """The setup's tensors and constants, every forward value, and the solution's namespace (all float64)."""
    tensors, constants = run_setup(exercise)
    values = forward(exercise, tensors, constants)
    solution = run_code(exercise.solution_code, values, constants, f"<{exercise.name} solution>")
    return tensors, constants, values, solution


def readers(exercise):
    """{tensor: the forward steps that read it}."""
    found = {}
    for name, step in exercise.steps().items():
        for read in step.inputs:
            found.setdefault(read, []).append(name)
    return found


def check_solution_matches_autograd(exercise):
    rows = check_solution(exercise)
    assert [r[0] for r in rows] == ["d" + name for name in exercise.gradients]
    wrong = [(name, rel) for name, _, rel in rows if not rel <= SOLUTION_RTOL]
    assert not wrong, wrong


def declared_shapes(exercise, constants):
    """{name: the shape its forward line's comment declares}: `name = expression  # (B, T, n_embd) ...`, or scalar."""
    shapes = {}
    for line in exercise.forward_code.splitlines():
        name, comment = re.fullmatch(r"(\w+) = .*?  # (.*)", line).groups()
        shape = "()" if comment.startswith("scalar") else re.match(r"\([^)]*\)", comment).group()
        declared = eval(shape, {}, dict(constants))
        shapes[name] = declared if isinstance(declared, tuple) else (declared,)
    return shapes


def check_forward_shapes_and_finite(exercise):
    _, constants, values, _ = solved(exercise)
    shapes = declared_shapes(exercise, constants)
    assert list(shapes) == list(exercise.steps())
    for name, shape in shapes.items():
        assert tuple(values[name].shape) == shape, name
        assert torch.isfinite(values[name]).all(), name
    tensors32, _ = run_setup(exercise, torch.float32)
    assert torch.isfinite(forward(exercise, tensors32, constants)["loss"])


def check_runs_as_a_float32_script(exercise):
    """Setup, forward and solution run top to bottom in one namespace, as a learner's file does, in float32."""
    namespace = dict(MODULES)
    exec(compile(exercise.setup_code + exercise.forward_code + exercise.solution_code, "<script>", "exec"), namespace)
    tensors, constants = run_setup(exercise, torch.float32)
    expected = reference_gradients(exercise, tensors, constants)
    for name in exercise.gradients:
        assert namespace["d" + name].dtype == torch.float32, name
        assert relative(namespace["d" + name], expected[name]) < FLOAT32_RTOL, name


def setup_namespace(exercise):
    namespace = dict(MODULES)
    exec(compile(exercise.setup_code, f"<{exercise.name} setup>", "exec"), namespace)
    return namespace


def check_setup_seeded_float32_nontrivial(exercise):
    first, second = setup_namespace(exercise), setup_namespace(exercise)
    tensors = [k for k, v in first.items() if isinstance(v, torch.Tensor)]
    assert set(exercise.parameters) <= set(tensors)
    for name in tensors:
        assert torch.equal(first[name], second[name]), name
    for name in exercise.parameters:
        p = first[name]
        assert p.dtype == torch.float32, name
        # no zero or one init (it hides wrong backward passes) and no constant tensor
        assert (p != 0).all() and (p != 1).all() and p.std() > 0, name
    assert all(first[c] == second[c] and isinstance(first[c], int | float) for c in exercise.constants)


def check_pitfalls(exercise):
    """Every slip assigns d<gradient>, runs on the right values, keeps the shape, is really wrong, and differs
    from the other slips of its gradient (so the hint shown is the one that explains it)."""
    _, constants, values, solution = solved(exercise)
    gradients = {"d" + name: solution["d" + name] for name in exercise.gradients}
    assert len(exercise.pitfalls) >= 4
    seen = {}
    for pitfall in exercise.pitfalls:
        target = "d" + pitfall.gradient
        assigned = [t.id for node in ast.parse(pitfall.slip).body if isinstance(node, ast.Assign | ast.AugAssign)
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target])]
        assert target in assigned, pitfall.slip
        scope = values | {k: v.clone() for k, v in gradients.items()}
        slipped = run_code(pitfall.slip, scope, constants, f"<slip {pitfall.slip}>")[target]
        assert slipped.shape == gradients[target].shape, pitfall.slip
        assert relative(slipped, gradients[target]) > SLIP_MIN_RELATIVE, pitfall.slip
        assert pitfall.hint and pitfall.gradient in exercise.gradients
        for other, value in seen.get(target, []):
            assert relative(slipped, value) > SLIP_MIN_RELATIVE, (pitfall.slip, other)
        seen.setdefault(target, []).append((pitfall.slip, slipped))


def check_forward_slips(exercise):
    _, constants, values, _ = solved(exercise)
    steps = exercise.steps()
    for slip in exercise.forward_slips:
        wrong = eval(slip.slip, {**MODULES, **constants}, values)
        assert wrong.shape == values[slip.name].shape, slip.slip
        assert relative(wrong, values[slip.name]) > SLIP_MIN_RELATIVE, slip.slip
        assert slip.name in steps and slip.hint


def check_gradient_order(exercise):
    """Each gradient after every tensor that reads it; every intermediate (but the loss) and parameter, once."""
    steps = exercise.steps()
    order = {name: i for i, name in enumerate(exercise.gradients)}
    assert len(order) == len(exercise.gradients)
    assert set(order) == (set(steps) - {"loss"}) | set(exercise.parameters)
    for name, reading in readers(exercise).items():
        if name in order:
            assert all(reader == "loss" or order[reader] < order[name] for reader in reading), name


def check_solution_writes(exercise):
    """The solution's last write of each gradient follows exercise.gradients; `+=` only where a tensor fans out."""
    fan_out = {name for name, reading in readers(exercise).items() if len(reading) > 1}
    last_write, assigned = {}, set()
    for i, node in enumerate(ast.parse(exercise.solution_code).body):
        if isinstance(node, ast.AugAssign):
            name = node.target.id
            assert name in assigned and name[1:] in fan_out, ast.unparse(node)
        else:
            (target,) = node.targets
            name = target.id
            assigned.add(name)
        last_write[name] = i
    written = sorted((n for n in last_write if n.startswith("d") and n[1:] in exercise.gradients), key=last_write.get)
    assert written == ["d" + name for name in exercise.gradients]
