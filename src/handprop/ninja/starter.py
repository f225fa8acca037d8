"""A learner's file for an exercise: the starter (a blank for every gradient) or the worked solution.

Both begin with the marker line that tells `handprop grade` which exercise a file is, then the
exercise's setup and its forward in small steps (the same source the grader recomputes), and end
with the grading call. The starter also runs autograd once, so the lecture's `cmp` can compare each
gradient as it is written; the solution does not need it. A notebook is the same code in cells.
"""

import json
import textwrap
from pathlib import Path

from ..errors import UserError
from .learner import MARKER

IMPORTS = "import math\n\nimport torch\nimport torch.nn.functional as F\n\nfrom handprop import grade\n"

CMP = '''\
def cmp(s, dt, t):
    """The lecture's check: your dt against autograd's t.grad, bit for bit, close, and the largest difference."""
    if dt is None:
        print(f"{s:15s} | not written yet")
    elif dt.shape != t.grad.shape:
        print(f"{s:15s} | shape {tuple(dt.shape)}, expected {tuple(t.shape)}")
    else:
        ex = torch.all(dt == t.grad).item()
        app = torch.allclose(dt, t.grad)
        maxdiff = (dt - t.grad).abs().max().item()
        print(f"{s:15s} | exact: {str(ex):5s} | approximate: {str(app):5s} | maxdiff: {maxdiff}")
'''


def listing(names):
    """[a, b, c] as source, wrapped to stay within 120 characters a line."""
    lines, line = [], "["
    for name in names:
        piece = name + ", "
        if len(line) + len(piece) > 110:
            lines.append(line.rstrip())
            line = "    "
        line += piece
    return "\n".join(lines + [line.rstrip(", ") + "]"])


DOCS_SECTION = "Backprop ninja"         # the section of mkdocs.yml's nav that lists each exercise's page
DOCS_TITLE = "Exercise: {}"             # the page's title in that section, for an exercise's name


def derivation(exercise):
    """Where the exercise's derivation page is, in words that hold wherever the learner's file is written."""
    return (f'the page "{DOCS_SECTION} > {DOCS_TITLE.format(exercise.name)}" of handprop\'s docs site, '
            f"`docs/{exercise.page}` in handprop's repository")


def header(exercise, kind):
    """The marker line and a docstring: what the file is, where the derivation is, how to grade it."""
    about = textwrap.fill(
        f"{exercise.summary[0].upper()}{exercise.summary[1:]}. The derivation of every gradient: "
        f"{derivation(exercise)}. Run this file; `handprop grade` on it grades every version of each gradient it "
        "writes.", 100, break_on_hyphens=False, break_long_words=False)
    return f'{MARKER}{exercise.name}\n"""Backprop ninja, {exercise.name}: {kind}.\n\n{about}\n"""\n\n{IMPORTS}'


def autograd_part(exercise):
    """Before the forward: the parameters require gradients; after it: autograd's, for cmp (as the lecture has it)."""
    intermediates = [name for name in exercise.gradients if name not in exercise.parameters]
    before = ("\n# autograd computes every gradient too, only for cmp below: the lecture's way of checking as you go\n"
              f"parameters = {listing(exercise.parameters)}\nfor p in parameters:\n    p.requires_grad = True\n")
    after = (f"\nfor t in {listing(intermediates)}:\n    t.retain_grad()\nloss.backward()\n")
    return before, after


def starter_sections(exercise):
    """The starter as [(title, code)]: what each piece of code is, then the code (the imports not included)."""
    before, after = autograd_part(exercise)
    blanks = "".join(f"d{name} = None  # TODO\n" for name in exercise.gradients)
    checks = "".join(f"cmp({name!r}, d{name}, {name})\n" for name in exercise.gradients)
    sections = [
        ("The setup: seeded parameters and data", exercise.setup_code + before),
        ("The forward pass, in small steps", exercise.forward_code + after + "\n\n" + CMP),
        ("The backward pass: every gradient from the loss backwards (d<name> is dloss/d<name>, shaped as <name>)",
         blanks),
        ("Compare each with autograd", checks),
    ]
    sections += [(f"{fused.title[0].upper()}{fused.title[1:]}: write d{fused.gradient} again, in one formula",
                  f"# d{fused.gradient} = ...  (grade checks this version and the one above apart)\n")
                 for fused in exercise.fused]
    grading = f"result = grade(globals(), exercise={exercise.name!r})\n"
    sections.append(("Grade: what is wrong, in plain words", grading))
    return sections


def solution_source(exercise):
    """The worked solution as a script: setup, forward, every gradient with a comment on its origin, the grading."""
    return (header(exercise, "the worked solution") + "\n# the setup: seeded parameters and data\n"
            + exercise.setup_code + "\n# the forward pass, in small steps\n" + exercise.forward_code + "\n"
            + exercise.solution_code + f"\nresult = grade(globals(), exercise={exercise.name!r})\n")


def starter_script(exercise):
    """The starter as one Python script: each section under its title as a comment."""
    return header(exercise, "a starter") + "".join(
        f"\n# {title[0].lower()}{title[1:]}\n{source}" for title, source in starter_sections(exercise))


def starter_notebook(exercise):
    """The starter as a Jupyter notebook (nbformat 4): a markdown cell with each title, a code cell with its code."""
    intro = (f"# Backprop ninja: {exercise.name}\n\n{exercise.summary[0].upper()}{exercise.summary[1:]}.\n\n"
             f"Write every gradient where it says TODO, from the loss backwards; `cmp` compares each with "
             f"autograd, and `grade` says what is wrong in plain words. The derivation of every gradient: "
             f"{derivation(exercise)}. From a shell, `handprop grade` on this "
             "notebook grades every version of each gradient it writes.")
    cells = [markdown_cell(intro)]
    for i, (title, source) in enumerate(starter_sections(exercise)):
        first = f"{MARKER}{exercise.name}\n{IMPORTS}\n" if i == 0 else ""
        cells += [markdown_cell(f"## {title}"), code_cell(first + source)]
    for i, cell in enumerate(cells):
        cell["id"] = f"cell-{i}"
    return json.dumps({"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                   "language": "python"}},
                       "nbformat": 4, "nbformat_minor": 5}, indent=1) + "\n"


def markdown_cell(text):
    return {"cell_type": "markdown", "metadata": {}, "source": text.splitlines(keepends=True)}


def code_cell(source):
    return {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
            "source": source.rstrip("\n").splitlines(keepends=True)}


def write_new(path, text, suffixes):
    """Write text to path, a new file with one of suffixes; an existing file is never overwritten."""
    path = Path(path)
    if path.suffix not in suffixes:
        raise UserError(f"-o {path}: the name must end in {' or '.join(suffixes)}")
    if path.exists():
        raise UserError(f"{path} exists already: choose another name (handprop never overwrites your work)")
    if not path.parent.is_dir():
        raise UserError(f"no such folder for {path}: {path.parent} (create it first, or write the file elsewhere)")
    created = False
    try:
        with path.open("x", encoding="utf-8") as f:
            created = True
            f.write(text)
    except OSError as e:            # a folder handprop may not write to, a full disk
        if created:
            path.unlink()           # no half-written file left behind
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def write_starter(exercise, path):
    """The starter for exercise at path: a notebook for .ipynb, a script for .py."""
    path = Path(path)
    write_new(path, starter_notebook(exercise) if path.suffix == ".ipynb" else starter_script(exercise),
              (".py", ".ipynb"))


def write_solution(exercise, path):
    """The worked solution for exercise at path, a .py script."""
    write_new(path, solution_source(exercise), (".py",))
