"""The grader on a learner's correct solution and on copies broken by one known pitfall each.

`handprop grade` (grade_script) runs the script and grades every version of each gradient;
grade(namespace), the notebook's entry point, grades the final values it is given.
"""

import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from exercise_checks import lines_in

from handprop.cli import main
from handprop.errors import UserError
from handprop.ninja.exercise import run_setup
from handprop.ninja.exercises.mlp import EXERCISE as MLP
from handprop.ninja.grade import grade, grade_script, shape_problem
from handprop.ninja.learner import run_learner

GRADIENT_NAMES = MLP.gradients

SOLUTION = Path(__file__).parent / "fixtures" / "ninja" / "solution.py"

# pitfall: (the right line(s) of solution.py, the broken version, the row to flag, words its hint must contain,
#           the rows that are right for the broken one and so "follow" from it); solution.py writes dlogits and
#           dhprebn twice (exercise 1, then exercises 2 and 3), so the sign error's rows include exercise 1's dhprebn
PITFALLS = {
    "plain += embedding gradient": (
        "for k in range(Xb.shape[0]):\n    for j in range(Xb.shape[1]):\n        dC[Xb[k, j]] += demb[k, j]",
        "for k in range(Xb.shape[0]):\n    dC[Xb[k]] += demb[k]",
        "dC", "index_add_", set(),
    ),
    "missing keepdim": (
        "dbnmeani = (-dbndiff).sum(0, keepdim=True)",
        "dbnmeani = (-dbndiff).sum(0)",
        "dbnmeani", "reduce with keepdim=True", set(),
    ),
    "biased-variance fused BatchNorm": (
        "- n / (n - 1) * bnraw * (dhpreact * bnraw).sum(0)",
        "- bnraw * (dhpreact * bnraw).sum(0)",
        "dhprebn", "biased (1/n) variance", set(),
    ),
    "precedence slip in the forward": (
        "bnraw = bndiff * bnvar_inv",
        "bnraw = hprebn - bnmeani * bnvar_inv",
        "bnraw", "operator precedence", {"dhprebn"},
    ),
    "sign error": (
        "dbnvar = -0.5 * (bnvar + 1e-5) ** -1.5 * dbnvar_inv",
        "dbnvar = 0.5 * (bnvar + 1e-5) ** -1.5 * dbnvar_inv",
        "dbnvar", "sign error", {"dbndiff2", "dbndiff", "dhprebn", "dembcat", "dW1", "demb", "dC"},
    ),
    "n instead of n-1 in exercise 1": (
        "dbndiff2 = 1 / (n - 1) * torch.ones_like(bndiff2) * dbnvar",
        "dbndiff2 = 1 / n * torch.ones_like(bndiff2) * dbnvar",
        "dbndiff2", "factor (n-1)/n", {"dbndiff", "dhprebn", "dembcat", "dW1", "demb", "dC"},
    ),
    "keepdim where none belongs": (
        "db2 = dlogits.sum(0)",
        "db2 = dlogits.sum(0, keepdim=True)",
        "db2", "drop keepdim=True", set(),
    ),
    "a loss of shape (1,)": (
        "loss = -logprobs[range(n), Yb].mean()",
        "loss = -logprobs[range(n), Yb].mean(0, keepdim=True)",
        "loss", "drop keepdim=True", set(),
    ),
    "no eps in the derivative of bnvar_inv": (
        "dbnvar = -0.5 * (bnvar + 1e-5) ** -1.5 * dbnvar_inv",
        "dbnvar = -0.5 * bnvar**-1.5 * dbnvar_inv",
        "dbnvar", "the eps of bnvar_inv = (bnvar + eps)**-0.5 belongs in the derivative too", set(),
    ),
    "embedding gradient added to a copy": (
        "        dC[Xb[k, j]] += demb[k, j]",
        "        dC[Xb[k]][j] += demb[k, j]",
        "dC", "all zeros", set(),
    ),
    "transposed matrix product": (
        "dW2 = h.T @ dlogits",
        "dW2 = dlogits.T @ h",
        "dW2", "it is transposed", set(),
    ),
    "biased variance in the forward": (
        "bnvar = 1 / (n - 1) * bndiff2.sum(0, keepdim=True)",
        "bnvar = bndiff2.mean(0, keepdim=True)",
        "bnvar", "Bessel", set(),
    ),
}


# a slip in exercise 1's version of a gradient that exercise 2 or 3 later overwrites:
# (the right line, the broken one, the gradients computed from exercise 1's version)
OVERWRITTEN = {
    "dlogits": ("dlogits = dnorm_logits.clone()", "dlogits = dcounts.clone()", ("dh", "dW2", "db2")),
    "dhprebn": (
        "dhprebn += 1.0 / n * (torch.ones_like(hprebn) * dbnmeani)",
        "dhprebn += torch.ones_like(hprebn) * dbnmeani",
        ("dembcat", "dW1", "db1"),
    ),
}


def broken_copy(tmp_path, right, broken):
    source = SOLUTION.read_text()
    assert source.count(right) == 1
    path = tmp_path / "solution.py"
    path.write_text(source.replace(right, broken))
    return path


def broken_solution(tmp_path, pitfall):
    return broken_copy(tmp_path, *PITFALLS[pitfall][:2])


def line_of(text, path=SOLUTION):
    """The number of the one line of path that contains text."""
    (number,) = [i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line]
    return number



def quiet_grade(namespace):
    return grade(namespace, io.StringIO())


def quiet_grade_script(path):
    return grade_script(path, io.StringIO())


@pytest.fixture(scope="module")
def solution_names():
    return run_learner(SOLUTION)[0]


def test_a_correct_solution_passes_every_version_of_every_row():
    result = quiet_grade_script(SOLUTION)
    assert result.ok and result.wrong == []
    assert all(r.status == "ok" for r in result.rows)
    twice = {"logits", "hprebn"}                # exercise 1's, then exercise 2's or 3's
    gradients = [r for r in result.rows if r.section == "gradient"]
    assert [r.name for r in gradients] == [d for name in GRADIENT_NAMES for d in ["d" + name] * (1 + (name in twice))]
    assert len(result.rows) == 20 + 26 + 2
    labels = [r.label for r in gradients]
    assert labels[7:9] == [
        f"dlogits (lines {line_of('dlogits = dnorm_logits.clone()')}-{line_of('dlogits += F.one_hot')})",
        f"dlogits (lines {line_of('dlogits = F.softmax(logits, 1)')}-{line_of('dlogits /= n')})",
    ]
    assert labels[21:23] == [
        f"dhprebn (lines {line_of('dhprebn = dbndiff.clone()')}-{line_of('dhprebn += 1.0 / n')})",
        f"dhprebn (line {line_of('dhprebn = bngain * bnvar_inv / n')})",
    ]
    assert "dW2" in labels and "dC" in labels    # a gradient written once keeps its plain name


def test_the_final_values_of_a_correct_solution_pass_every_row(solution_names):
    result = quiet_grade(solution_names)
    assert result.ok and result.wrong == []
    assert [r.label for r in result.rows if r.section == "gradient"] == ["d" + name for name in GRADIENT_NAMES]
    assert all(r.status == "ok" for r in result.rows)
    assert len(result.rows) == 20 + 26


@pytest.mark.parametrize("pitfall", PITFALLS)
def test_each_pitfall_is_flagged_on_exactly_its_row_with_its_hint(tmp_path, pitfall):
    row_name, hint, follows = PITFALLS[pitfall][2:]
    path = broken_solution(tmp_path, pitfall)
    result = quiet_grade_script(path)
    assert not result.ok
    (wrong,) = [r for r in result.rows if r.status == "wrong"]
    assert wrong.name == row_name and hint in wrong.message
    if wrong.several:                           # the version flagged is the one the broken line wrote
        assert line_of(PITFALLS[pitfall][1].splitlines()[0], path) in lines_in(wrong.where)
    assert {r.name for r in result.rows if r.status == "follows"} == follows
    assert all(r.status == "ok" for r in result.rows if r is not wrong and r.status != "follows")
    assert not any(hint in r.message for r in result.rows if r is not wrong)


@pytest.mark.parametrize("name", OVERWRITTEN)
def test_a_slip_in_a_version_later_overwritten_is_wrong_where_it_was_made(tmp_path, name):
    right, broken, computed_from_it = OVERWRITTEN[name]
    path = broken_copy(tmp_path, right, broken)
    result = quiet_grade_script(path)
    (wrong,) = [r for r in result.rows if r.status == "wrong"]
    assert wrong.name == name and line_of(broken, path) in lines_in(wrong.where)
    (later,) = [r for r in result.rows if r.name == name and r is not wrong]
    assert later.status == "ok" and min(lines_in(later.where)) > max(lines_in(wrong.where))
    for downstream in computed_from_it:
        assert result[downstream].status == "follows"
        assert result[downstream].message.startswith(f"right for your {wrong.label}, which is off")


def test_keepdim_advice_follows_the_direction_of_the_shape_error():
    right = torch.arange(1.0, 28.0)                                     # (27,)
    assert shape_problem(right.view(1, 27), right).endswith(": the values are right; drop keepdim=True (or squeeze)")
    assert shape_problem(right, right.view(1, 27)).endswith(": the values are right; reduce with keepdim=True")
    assert shape_problem(right.view(27, 1), right.view(1, 27)).endswith(": the values are right; view them as (1, 27)")
    wrong = shape_problem(-right.view(1, 27), right)
    assert wrong.endswith("; dropping keepdim=True (or a squeeze) would fix the shape, and the values are wrong too")


def test_a_gradient_left_all_zeros_is_not_called_off_by_a_factor(tmp_path):
    result = quiet_grade_script(broken_solution(tmp_path, "embedding gradient added to a copy"))
    assert "constant factor" not in result["dC"].message
    assert "yours is all zeros" in result["dC"].message


@pytest.mark.parametrize("factor, words", [("n / (n - 1)", "n/(n-1)"), ("(n - 1) / n", "(n-1)/n")])
def test_a_gradient_off_by_bessels_factor_is_told_so_on_its_row(tmp_path, factor, words):
    right = "dbnvar_inv = (bndiff * dbnraw).sum(0, keepdim=True)"
    result = quiet_grade_script(broken_copy(tmp_path, right, f"{right} * {factor}"))
    assert result.wrong == ["dbnvar_inv"]
    message = result["dbnvar_inv"].message
    assert f"off by the factor {words}: check whether each variance divides by n or by n-1" in message


def test_the_missing_eps_is_told_apart_by_which_formula_it_matches(tmp_path):
    message = quiet_grade_script(broken_solution(tmp_path, "no eps in the derivative of bnvar_inv"))["dbnvar"].message
    # within RTOL of the right gradient, but much closer to the formula without eps
    assert message.startswith("matches -0.5 * bnvar**-1.5 * dbnvar_inv (no eps) ")


def test_follows_rows_name_what_to_fix_first(tmp_path):
    path = broken_solution(tmp_path, "sign error")
    result = quiet_grade_script(path)
    assert result["dbndiff2"].message.startswith("right for your dbnvar, which is off")
    ex1 = f"dhprebn (lines {line_of('dhprebn = dbndiff.clone()', path)}-{line_of('dhprebn += 1.0 / n', path)})"
    assert result[ex1].message.startswith("right for your dbndiff, which is off")
    assert result["dembcat"].message.startswith(f"right for your {ex1}, which is off")


def test_final_values_only_still_say_what_to_fix_first(tmp_path):
    """grade(globals()) sees only exercise 3's dhprebn; dembcat came from exercise 1's, which it works out."""
    result = quiet_grade(run_learner(broken_solution(tmp_path, "sign error"))[0])
    assert result["dbndiff2"].message.startswith("right for your dbnvar, which is off")
    assert "dhprebn computed from your dbndiff" in result["dembcat"].message


def test_a_wrong_value_says_where_the_largest_error_is(tmp_path):
    result = quiet_grade_script(broken_solution(tmp_path, "sign error"))
    message, maxdiff = result["dbnvar"].message, result["dbnvar"].maxdiff
    assert message.startswith("largest error at [0, ")
    assert maxdiff > 1e-3


def test_grade_prints_a_table_and_returns_the_result(solution_names):
    printed = io.StringIO()
    result = grade(solution_names, printed)
    text = printed.getvalue()
    assert "dbnmeani" in text and "forward pass: 20 of the 20" in text
    assert text.rstrip().endswith("gradients: 26 ok -- all right")
    assert repr(result) == "GradeResult(ok=True, wrong=[])"


def test_missing_gradients_are_listed_but_do_not_fail(solution_names):
    partial = {k: v for k, v in solution_names.items() if k not in ("dW1", "dC")}
    result = quiet_grade(partial)
    assert result.ok
    assert result["dC"].status == "missing" and result["dW1"].status == "missing"


def test_the_grader_needs_the_parameters_and_some_gradients(solution_names):
    without_W2 = {k: v for k, v in solution_names.items() if k != "W2"}
    with pytest.raises(UserError, match="W2"):
        quiet_grade(without_W2)
    no_gradients = {k: v for k, v in run_setup(MLP, torch.float32)[0].items()}
    with pytest.raises(UserError, match="no gradients to grade"):
        quiet_grade(no_gradients)


def test_the_learners_tensors_are_left_untouched(solution_names):
    before = {k: solution_names[k].clone() for k in ("dC", "bnraw", "W1")}
    quiet_grade(solution_names)
    assert all(torch.equal(before[k], solution_names[k]) for k in before)


def test_every_version_of_a_gradient_is_recorded_with_what_it_was_computed_from(tmp_path):
    script = tmp_path / "versions.py"
    script.write_text(
        "import torch\n"
        "dlogits = torch.ones(2)\n"          # line 2: a version starts
        "dlogits += 1\n"                     # 3: augmenting continues it
        "dlogits = dlogits * 2\n"            # 4: so does an assignment that reads it
        "dh = dlogits * 3\n"                 # 5: computed from the version of lines 2-4
        "dC = torch.zeros(3)\n"              # 6
        "for i in range(3):\n"
        "    dC[i] += i\n"                   # 8: in place, in a loop
        "unrelated = 1\n"
        "dlogits = torch.zeros(2)\n"         # 10: assigned afresh: a new version
        "def fused():\n"
        "    global dlogits\n"
        "    dlogits = torch.full((2,), 7.0)\n"
        "fused()\n"                          # 14: a new object, from a statement that does not read dlogits
    )
    namespace, versions = run_learner(script)
    assert [(v.name, v.where) for v in versions] == [
        ("logits", "lines 2-4"), ("h", "line 5"), ("C", "lines 6-8"), ("logits", "line 10"), ("logits", "line 14"),
    ]
    assert versions[0].value.tolist() == [4.0, 4.0] and versions[2].value.tolist() == [0.0, 1.0, 2.0]
    assert versions[1].context["logits"] == 0 and versions[3].context["h"] == 1
    assert versions[3].value.tolist() == [0.0, 0.0] and versions[4].value.tolist() == [7.0, 7.0]
    assert namespace["dlogits"] is not versions[4].value            # a clone: the learner's tensor stays theirs
    assert "__handprop_record__" not in namespace and namespace["unrelated"] == 1


def test_cli_grade_exit_status(tmp_path, capsys):
    assert main(["grade", str(SOLUTION)]) == 0
    assert "all right" in capsys.readouterr().out
    assert main(["grade", str(broken_solution(tmp_path, "missing keepdim"))]) == 1
    assert "WRONG" in capsys.readouterr().out


def test_cli_grade_missing_or_crashing_script_is_one_line(tmp_path, capsys):
    assert main(["grade", str(tmp_path / "nowhere.py")]) == 2
    assert capsys.readouterr().err == f"handprop: error: no such file: {tmp_path / 'nowhere.py'}\n"
    assert main(["grade", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"handprop: error: {tmp_path} is a directory, not a script\n"
    crashing = tmp_path / "crash.py"
    crashing.write_text("x = 1\ny = x / 0\n")
    assert main(["grade", str(crashing)]) == 2
    err = capsys.readouterr().err
    assert err == f"handprop: error: {crashing} line 2 raised ZeroDivisionError: division by zero\n"
    crashing.write_text("x = 1\ny = (x\n")
    assert main(["grade", str(crashing)]) == 2
    assert capsys.readouterr().err.startswith(f"handprop: error: {crashing} line 2 is not valid Python: ")


def test_a_script_runs_as_if_started_by_python(tmp_path, capsys):
    """Its own folder is on sys.path (a sibling module imports) and sys.argv is [its path]; both restored after."""
    (tmp_path / "ninja_sibling_helper.py").write_text("from handprop.ninja.exercises.mlp import EXERCISE\n")
    source = SOLUTION.read_text().replace("from handprop.ninja.exercises.mlp", "from ninja_sibling_helper")
    script = tmp_path / "solution.py"
    script.write_text("import sys\nseen_argv = list(sys.argv)\n" + source)
    path_before, argv_before, main_before = list(sys.path), list(sys.argv), sys.modules["__main__"]
    assert run_learner(script)[0]["seen_argv"] == [str(script)]
    assert main(["grade", str(script)]) == 0
    assert "all right" in capsys.readouterr().out
    assert sys.path == path_before and sys.argv == argv_before and sys.modules["__main__"] is main_before


def solution_notebook(path):
    """solution.py as a notebook: one code cell per section, after a markdown cell, with IPython-only lines added."""
    sections = re.split(r"\n(?=# )", SOLUTION.read_text())
    magics = "%matplotlib inline\n!echo this line is for the shell\n"
    cells = [{"cell_type": "markdown", "metadata": {}, "source": ["# my solution\n"]}]
    cells += [{"cell_type": "code", "metadata": {}, "source": (magics + s).splitlines(keepends=True)} for s in sections]
    cells.append({"cell_type": "code", "metadata": {}, "source": "%%bash\necho a cell magic: not Python\n"})
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return path


def test_a_notebook_is_graded_by_running_its_code_cells_in_order(tmp_path, capsys):
    notebook = solution_notebook(tmp_path / "solution.ipynb")
    assert main(["grade", str(notebook)]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("gradients: 28 ok -- all right")
    # exercise 1's dlogits is in the third code cell (the notebook's fourth cell), exercise 2's in the fourth
    assert re.search(r"\n  dlogits \(cell 4, lines \d+-\d+\) +ok", out)
    assert re.search(r"\n  dlogits \(cell 5, lines 4-6\) +ok", out)


def test_a_notebook_that_crashes_names_the_cell_and_line(tmp_path, capsys):
    notebook = tmp_path / "crash.ipynb"
    code = {"cell_type": "code", "source": ["x = 1\n", "y = x / 0\n"]}
    notebook.write_text(json.dumps({"cells": [{"cell_type": "markdown", "source": "# notes"}, code], "nbformat": 4}))
    assert main(["grade", str(notebook)]) == 2
    err = capsys.readouterr().err
    assert err == f"handprop: error: {notebook} cell 2 line 2 raised ZeroDivisionError: division by zero\n"


def test_a_file_that_is_not_a_notebook_is_one_line(tmp_path, capsys):
    for text in ('{"cells": 3}', "print('hello')"):
        (tmp_path / "x.ipynb").write_text(text)
        assert main(["grade", str(tmp_path / "x.ipynb")]) == 2
        assert capsys.readouterr().err.startswith(f"handprop: error: {tmp_path / 'x.ipynb'} is not a Jupyter notebook")
