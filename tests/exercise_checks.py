"""What the exercises' tests share: an exercise solved in float64 and its solution checked against autograd, the
relative difference their checks use, a recurrent exercise's numbers through handprop's own layers, and the lines a
grader's row points at.

The checks every exercise keeps are generic tests in test_exercises.py; tests/test_exercise_<name>.py hold
what only one exercise has (its equality with handprop's own layers, its padding, its mask).
"""

import re

import torch

from handprop.layers import Embedding, Linear, Recurrent
from handprop.losses import SequenceCrossEntropy
from handprop.ninja.exercise import forward, reference_gradients, run_code, run_setup


def relative(a, b):
    """max |a - b| relative to max |b|."""
    return ((a - b).abs().max() / b.abs().max()).item()


def solved(exercise):
    """The setup's tensors and constants, every forward value, and the namespace after the solution (all float64)."""
    tensors, constants = run_setup(exercise)
    values = forward(exercise, tensors, constants)
    solution = run_code(exercise.solution_code, values, constants, f"<{exercise.name} solution>")
    return tensors, constants, values, solution


def recurrent_layers(tensors, cell):
    """A recurrent exercise's numbers through Embedding, Recurrent(cell), Linear and SequenceCrossEntropy, forward and
    back: hs, the loss, the recurrent layer, and the gradients every recurrent exercise names alike."""
    embedding, head = Embedding(tensors["C"]), Linear(tensors["Wout"], tensors["bout"])
    recurrent = Recurrent(cell, tensors["start"][0])
    loss_fn = SequenceCrossEntropy()
    hs = recurrent.forward(embedding.forward(tensors["Xb"]))        # (B, T, n_hidden)
    loss = loss_fn.forward(head.forward(hs), tensors["Yb"])
    dlogits = loss_fn.backward()
    dhs = head.backward(dlogits)
    demb = recurrent.backward(dhs)
    embedding.backward(demb)
    gradients = {
        "dlogits": dlogits, "dhs": dhs, "demb": demb, "dC": embedding.grads["weight"],
        "dWout": head.grads["weight"], "dbout": head.grads["bias"], "dstart": recurrent.grads["h0"][None],
    }
    return hs, loss, recurrent, gradients


def lines_in(where):
    """The line numbers a row's where ('line 7', 'lines 7-9', 'cell 3, lines 1-2') covers."""
    first, last = re.fullmatch(r"(?:cell \d+, )?lines? (\d+)(?:-(\d+))?", where).groups()
    return range(int(first), int(last or first) + 1)


def check_solution(exercise, dtype=torch.float64):
    """[(d<name>, max |solution - autograd|, that relative to the gradient's largest magnitude)] for every gradient."""
    tensors, constants = run_setup(exercise, dtype)
    values = forward(exercise, tensors, constants)
    expected = reference_gradients(exercise, tensors, constants)
    mine = run_code(exercise.solution_code, values, constants, f"<{exercise.name} solution>")
    rows = []
    for name in exercise.gradients:
        diff = (mine["d" + name] - expected[name]).abs().max().item()
        rows.append(("d" + name, diff, diff / max(expected[name].abs().max().item(), 1e-300)))
    return rows
