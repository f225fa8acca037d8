"""The grader on a learner's correct solution and on copies broken by one known pitfall each."""

import io
import sys
from pathlib import Path

import pytest
import torch

from handprop.cli import main
from handprop.errors import UserError
from handprop.grade import grade, run_script, shape_problem
from handprop.lecture import GRADIENT_NAMES, lecture_setup

SOLUTION = Path(__file__).parent / "fixtures" / "ninja" / "solution.py"

# pitfall: (the right line(s) of solution.py, the broken version, the row to flag, words its hint must contain,
#           the rows that are right for the broken one and so "follow" from it)
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
        "dbnvar", "sign error", {"dbndiff2", "dbndiff", "dembcat", "dW1", "demb", "dC"},
    ),
    "n instead of n-1 in exercise 1": (
        "dbndiff2 = 1 / (n - 1) * torch.ones_like(bndiff2) * dbnvar",
        "dbndiff2 = 1 / n * torch.ones_like(bndiff2) * dbnvar",
        "dbndiff2", "factor (n-1)/n", {"dbndiff", "dembcat", "dW1", "demb", "dC"},
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


def broken_solution(tmp_path, pitfall):
    right, broken = PITFALLS[pitfall][:2]
    source = SOLUTION.read_text()
    assert source.count(right) == 1
    path = tmp_path / "solution.py"
    path.write_text(source.replace(right, broken))
    return path


def quiet_grade(namespace):
    return grade(namespace, io.StringIO())


@pytest.fixture(scope="module")
def solution_names():
    return run_script(SOLUTION)


def test_a_correct_solution_passes_every_row(solution_names):
    result = quiet_grade(solution_names)
    assert result.ok and result.wrong == []
    assert [r.name for r in result.rows if r.section == "gradient"] == ["d" + name for name in GRADIENT_NAMES]
    assert all(r.status == "ok" for r in result.rows)
    assert len(result.rows) == 20 + 26


@pytest.mark.parametrize("pitfall", PITFALLS)
def test_each_pitfall_is_flagged_on_exactly_its_row_with_its_hint(tmp_path, pitfall):
    row_name, hint, follows = PITFALLS[pitfall][2:]
    result = quiet_grade(run_script(broken_solution(tmp_path, pitfall)))
    assert not result.ok
    assert result.wrong == [row_name]
    assert hint in result[row_name].message
    assert {r.name for r in result.rows if r.status == "follows"} == follows
    assert all(r.status == "ok" for r in result.rows if r.name != row_name and r.name not in follows)
    assert not any(hint in r.message for r in result.rows if r.name != row_name)


def test_keepdim_advice_follows_the_direction_of_the_shape_error():
    right = torch.arange(1.0, 28.0)                                     # (27,)
    assert shape_problem(right.view(1, 27), right).endswith(": the values are right; drop keepdim=True (or squeeze)")
    assert shape_problem(right, right.view(1, 27)).endswith(": the values are right; reduce with keepdim=True")
    assert shape_problem(right.view(27, 1), right.view(1, 27)).endswith(": the values are right; view them as (1, 27)")
    wrong = shape_problem(-right.view(1, 27), right)
    assert wrong.endswith("; dropping keepdim=True (or a squeeze) would fix the shape, and the values are wrong too")


def test_a_gradient_left_all_zeros_is_not_called_off_by_a_factor(tmp_path):
    result = quiet_grade(run_script(broken_solution(tmp_path, "embedding gradient added to a copy")))
    assert "constant factor" not in result["dC"].message
    assert "yours is all zeros" in result["dC"].message


def test_the_missing_eps_is_told_apart_by_which_formula_it_matches(tmp_path):
    message = quiet_grade(run_script(broken_solution(tmp_path, "no eps in the derivative of bnvar_inv")))["dbnvar"].message
    # within RTOL of the right gradient, but much closer to the formula without eps
    assert message.startswith("matches -0.5 * bnvar**-1.5 * dbnvar_inv (no eps) ")


def test_follows_rows_name_what_to_fix_first(tmp_path):
    result = quiet_grade(run_script(broken_solution(tmp_path, "sign error")))
    assert result["dbndiff2"].message.startswith("right for your dbnvar, which is off")
    # dembcat came from exercise 1's dhprebn, which exercise 3 then replaced with a right one
    assert "dhprebn computed from your dbndiff" in result["dembcat"].message


def test_a_wrong_value_says_where_the_largest_error_is(tmp_path):
    result = quiet_grade(run_script(broken_solution(tmp_path, "sign error")))
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
    no_gradients = {k: v for k, v in lecture_setup().items()}
    with pytest.raises(UserError, match="no gradients to grade"):
        quiet_grade(no_gradients)


def test_the_learners_tensors_are_left_untouched(solution_names):
    before = {k: solution_names[k].clone() for k in ("dC", "bnraw", "W1")}
    quiet_grade(solution_names)
    assert all(torch.equal(before[k], solution_names[k]) for k in before)


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


def test_a_script_runs_as_if_started_by_python(tmp_path, capsys):
    """Its own folder is on sys.path (a sibling module imports) and sys.argv is [its path]; both restored after."""
    (tmp_path / "ninja_sibling_helper.py").write_text("from handprop.lecture import lecture_setup\n")
    source = SOLUTION.read_text().replace("from handprop.lecture import", "from ninja_sibling_helper import")
    script = tmp_path / "solution.py"
    script.write_text("import sys\nseen_argv = list(sys.argv)\n" + source)
    path_before, argv_before = list(sys.path), list(sys.argv)
    assert run_script(script)["seen_argv"] == [str(script)]
    assert main(["grade", str(script)]) == 0
    assert "all right" in capsys.readouterr().out
    assert sys.path == path_before and sys.argv == argv_before
