"""An exercise as data: setup, a forward of small named steps, the gradients to write, pitfalls.

Every exercise (the lecture's mlp, layernorm, attention, ...) is one `Exercise`. Its code is
kept as the source text a learner sees: `setup_code` builds the seeded tensors, `forward_code`
computes one named intermediate per line (`name = expression  # (shape)`), `solution_code`
writes every gradient. The grader compiles each forward line into a step, a function of the
tensors it reads, so the text the starter shows and the steps the grader checks are one source.
"""

import ast
import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

MODULES = {"torch": torch, "F": F, "math": math}    # what setup, forward, solution and slips may use by name


@dataclass(frozen=True)
class Pitfall:
    gradient: str       # the tensor whose gradient the slip is about: 'bnmeani' (the learner writes dbnmeani)
    slip: str           # the wrong code as a learner writes it, assigning d<gradient>: 'dbnmeani = (-dbndiff).sum(0)'
    hint: str           # why it is wrong, in plain words, shown when the learner's gradient matches the slip


@dataclass(frozen=True)
class ForwardSlip:
    name: str           # the intermediate: 'bnraw'
    slip: str           # the wrong expression for it: 'hprebn - bnmeani * bnvar_inv'
    hint: str           # why it is wrong, in plain words


@dataclass(frozen=True)
class Fused:
    gradient: str       # the tensor whose gradient the one-step formula gives: 'logits'
    title: str          # what it is: 'exercise 2: cross-entropy backward in one step'
    code: str           # the formula as the solution writes it, assigning d<gradient>


@dataclass(frozen=True)
class Exercise:
    name: str                   # the CLI's name: 'layernorm'
    summary: str                # one line for `handprop exercise list`: what it covers
    setup_code: str             # source: seeded tensors (parameters float32, data) and constants such as n
    forward_code: str           # source: `name = expression  # (shape)` per intermediate; the last line sets loss
    parameters: tuple           # the leaves whose gradients are graded: ('C', 'W1', ...)
    gradients: tuple            # every tensor whose gradient the learner writes, from the loss backwards
    solution_code: str          # source: handprop's worked backward, each gradient with a comment on its origin
    page: str                   # the derivation's page under docs/: 'exercises/layernorm.md'
    fused: tuple = ()           # Fused one-step formulas (the lecture's exercises 2 and 3)
    pitfalls: tuple = ()        # Pitfall: known wrong gradients and their hints
    forward_slips: tuple = ()   # ForwardSlip: known wrong forward steps and their hints
    constants: tuple = field(default=("n",))   # plain numbers setup_code defines and the forward reads

    def steps(self):
        """The forward as an ordered {name: Step}, one per line of forward_code."""
        return parse_forward(self.forward_code, self.constants)

    def inputs(self):
        """The tensors the forward reads but does not compute (the parameters and the data), in order of first use."""
        steps = self.steps()
        return tuple(dict.fromkeys(n for step in steps.values() for n in step.inputs if n not in steps))


@dataclass(frozen=True)
class Step:
    name: str           # the intermediate it computes
    source: str         # its expression, as forward_code writes it
    inputs: tuple       # the names of the tensors it reads, in order of first use
    code: object        # the compiled expression

    def __call__(self, values, constants):
        """The step's value from the named tensors in values and the exercise's constants."""
        return eval(self.code, {**MODULES, **constants}, {name: values[name] for name in self.inputs})


def parse_forward(source, constants=()):
    """{name: Step} for each `name = expression` line of source, in order; inputs are the names read (not modules)."""
    return dict(parsed_forward(source, tuple(constants)))     # each caller gets its own dict


@functools.cache        # the grader asks for the steps many times: each source is parsed once
def parsed_forward(source, constants):
    steps = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ValueError(f"forward line {node.lineno}: each line assigns one name: {ast.unparse(node)}")
        expression = ast.Expression(node.value)
        read = [n.id for n in ast.walk(node.value) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)]
        inputs = tuple(dict.fromkeys(n for n in read if n not in MODULES and n not in constants and n != "range"))
        name = node.targets[0].id
        steps[name] = Step(name, ast.unparse(node.value), inputs, compile(expression, f"<forward: {name}>", "eval"))
    return steps


def run_setup(exercise, dtype=torch.float64):
    """Run setup_code: the tensors (floating ones cast to dtype) and the constants it defines."""
    namespace = dict(MODULES)
    exec(compile(exercise.setup_code, f"<{exercise.name} setup>", "exec"), namespace)
    tensors = {k: v for k, v in namespace.items() if isinstance(v, torch.Tensor)}
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return tensors, {name: namespace[name] for name in exercise.constants}


def forward(exercise, tensors, constants):
    """tensors with every intermediate of the forward added."""
    values = dict(tensors)
    for name, step in exercise.steps().items():
        values[name] = step(values, constants)
    return values


def reference_gradients(exercise, tensors, constants):
    """Autograd's dloss/dx for every name in exercise.gradients, through the whole forward (float64 in, float64 out)."""
    leaves = {k: v.detach().clone().requires_grad_(k in exercise.parameters) for k, v in tensors.items()}
    with torch.enable_grad():
        values = forward(exercise, leaves, constants)
        for name in exercise.gradients:
            if name not in exercise.parameters:
                values[name].retain_grad()
        values["loss"].backward()
    return {name: values[name].grad for name in exercise.gradients}


def run_code(code, values, constants, title):
    """Execute code (a solution, a slip) with the forward's values and constants in scope; the namespace after it."""
    namespace = {**MODULES, **constants, **values}
    exec(compiled_code(code, title), namespace)
    return namespace


@functools.cache
def compiled_code(code, title):
    """code compiled once (the grader runs each slip and fused formula for many versions)."""
    return compile(code, title, "exec")

