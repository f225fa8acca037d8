"""Becoming a backprop ninja: handprop's own solutions to the lecture's exercises, and the `check` report.

The mlp exercise's worked solution (exercises/mlp.py) in float32 on the lecture's batch: exercise 1
backpropagates by hand through every step, exercises 2 and 3 do the cross-entropy and the BatchNorm
layer in one fused step each. Each result is compared with autograd in the lecture's `cmp` format;
`check_report` adds gradcheck's float64 rows for every layer of the library.
"""

from dataclasses import dataclass

import torch

from ..gradcheck import relative_maxdiff
from .exercise import forward, reference_gradients, run_code, run_setup
from .exercises.mlp import EXERCISE as MLP
from .exercises.mlp import EXERCISE_1

CHECK_MAXDIFF = 1e-8        # a float32 cmp row passes when approximate and maxdiff is at most this


@dataclass(frozen=True)
class CmpRow:
    name: str               # the tensor whose gradient is compared, e.g. 'bnvar'
    exact: bool             # bit for bit equal to autograd
    approximate: bool       # torch.allclose with its default tolerances
    maxdiff: float          # max |mine - autograd|
    relerr: float           # maxdiff relative to max |autograd|
    ok: bool                # approximate and maxdiff <= CHECK_MAXDIFF


def cmp(name, mine, reference):
    """One row of the lecture's comparison of a hand-written gradient with autograd's."""
    maxdiff = (mine - reference).abs().max().item()
    approximate = torch.allclose(mine, reference)
    return CmpRow(
        name, torch.equal(mine, reference), approximate, maxdiff,
        relative_maxdiff(maxdiff, reference.abs().max().item()), approximate and maxdiff <= CHECK_MAXDIFF,
    )


def check_exercises(dtype=torch.float32):
    """The mlp exercise's three parts on the lecture's batch: {title: [CmpRow, ...]}."""
    tensors, constants = run_setup(MLP, dtype)
    values = forward(MLP, tensors, constants)
    reference = reference_gradients(MLP, tensors, constants)
    mine = run_code(EXERCISE_1, values, constants, "<mlp exercise 1>")
    exercises = {"exercise 1: backprop through every intermediate": [
        cmp(name, mine["d" + name], reference[name]) for name in MLP.gradients
    ]}
    for fused in MLP.fused:          # each formula reads exercise 1's gradients downstream of it
        one_step = run_code(fused.code, mine, constants, f"<mlp {fused.title}>")["d" + fused.gradient]
        exercises[fused.title] = [cmp(fused.gradient, one_step, reference[fused.gradient])]
    return exercises


def format_cmp(rows):
    """The rows as a table: name | exact | approximate | maxdiff | relerr | pass mark."""
    lines = [f"{'tensor':15s} | {'exact':5s} | {'approximate':11s} | {'maxdiff':>8s} | {'relerr':>8s} |"]
    for r in rows:
        lines.append(
            f"{r.name:15s} | {str(r.exact):5s} | {str(r.approximate):11s} | {r.maxdiff:8.1e} | {r.relerr:8.1e} | "
            + ("ok" if r.ok else "FAIL")
        )
    return "\n".join(lines)


def format_layer_rows(rows):
    """gradcheck's float64 rows as a table: layer | gradient | vs autograd | vs finite differences | pass mark."""
    wide, grad = max([28] + [len(r.layer) for r in rows]), max([9] + [len(r.tensor) for r in rows])
    lines = [f"{'layer':{wide}s} | {'grad':{grad}s} | {'maxdiff':>8s} | {'relative':>8s} | {'fd relerr':>9s} |"]
    for r in rows:
        relative = relative_maxdiff(r.autograd_maxdiff, r.scale)
        lines.append(
            f"{r.layer:{wide}s} | {r.tensor:{grad}s} | {r.autograd_maxdiff:8.1e} | {relative:8.1e} | "
            f"{r.fd_relerr:9.1e} | " + ("ok" if r.ok else "FAIL")
        )
    return "\n".join(lines)


def check_report(layer_rows):
    """The text `handprop check` prints, given gradcheck's float64 rows, and whether every row passed."""
    exercises = check_exercises()
    sections = [f"{title} (float32, against autograd)\n{format_cmp(rows)}" for title, rows in exercises.items()]
    sections.append(
        "every layer and the loss (float64; maxdiff against an autograd twin, relative to its largest entry;"
        " fd relerr against centred finite differences)\n" + format_layer_rows(layer_rows)
    )
    rows = [r for rows in exercises.values() for r in rows] + layer_rows
    failed = sum(not r.ok for r in rows)
    summary = f"{len(rows) - len(layer_rows)} float32 rows and {len(layer_rows)} float64 rows: " + (
        "all pass" if not failed else f"{failed} FAIL"
    )
    return "\n\n".join(sections + [summary]), failed == 0
