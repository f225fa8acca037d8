"""What a learner's own code gets wrong, and how the grader answers (issue 18 items 1-4, issue 20 item 5).

A gradient assigned where it should be added, a crash half-way, a notebook that reads its own files, a
script that never ends, a file of one exercise graded as another, and `from handprop import grade`.
"""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import handprop
from handprop.cli import main
from handprop.ninja.exercise import Exercise, Pitfall
from handprop.ninja.exercises import EXERCISES
from handprop.ninja.grade import grade, grade_script
from handprop.ninja.learner import run_learner

SOLUTION = Path(__file__).parent / "fixtures" / "ninja" / "solution.py"

# a second, tiny exercise: a linear layer under a fixed random upstream gradient
TOY = Exercise(
    name="toy",
    summary="a linear layer",
    setup_code=(
        "g = torch.Generator().manual_seed(1)\n"
        "x = torch.randn((4, 3), generator=g)\n"
        "w = torch.randn((3, 2), generator=g)\n"
        "upstream = torch.randn((4, 2), generator=g)\n"
    ),
    forward_code="y = x @ w  # (4, 2)\nloss = (y * upstream).sum()  # ()\n",
    parameters=("w",),
    gradients=("y", "w"),
    solution_code="dy = upstream.clone()\ndw = x.T @ dy\n",
    page="exercises/toy.md",
    pitfalls=(Pitfall("w", "dw = dy.T @ x\n", "transposed: dw has w's shape, x.T @ dy"),),
    constants=(),
)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(EXERCISES, "toy", TOY)
    return TOY


def broken(tmp_path, right, wrong, name="solution.py"):
    source = SOLUTION.read_text()
    assert source.count(right) == 1
    path = tmp_path / name
    path.write_text(source.replace(right, wrong))
    return path


def line_of(text, path):
    (number,) = [i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line]
    return number


ASSIGNED = {   # the right += line, the same branch assigned with =, the tensor, its steps, the branch it holds
    "counts": ("dcounts += torch.ones_like(counts) * dcounts_sum", "dcounts = torch.ones_like(counts) * dcounts_sum",
               "counts feeds 2 steps (counts_sum, probs): this holds only the gradient through counts_sum; add the "
               "branches with +=", "the gradient through probs, one of the 2 steps counts feeds"),
    "bndiff": ("dbndiff += 2 * bndiff * dbndiff2", "dbndiff = (2 * bndiff) * dbndiff2",
               "bndiff feeds 2 steps (bndiff2, bnraw): this holds only the gradient through bndiff2; add the "
               "branches with +=", "the gradient through bnraw, one of the 2 steps bndiff feeds"),
}


@pytest.mark.parametrize("name", ASSIGNED)
def test_an_assignment_that_should_add_is_wrong_and_the_first_branch_is_not(name, tmp_path, capsys):
    right, wrong, hint, first = ASSIGNED[name]
    path = broken(tmp_path, right, wrong)
    assert main(["grade", str(path)]) == 1
    capsys.readouterr()
    result = grade_script(path, io.StringIO())
    assert result.wrong == [f"d{name} (line {line_of(wrong, path)})"]
    (earlier,) = [r for r in result.rows if r.name == "d" + name and r.status == "ok"]
    assert earlier.message == first and earlier.maxdiff < 1e-6
    assert result.rows[result.rows.index(earlier) + 1].message.endswith("; " + hint)
    # grade(globals()) sees only the final value, and says the same
    final = grade(run_learner(path)[0], io.StringIO())
    assert final["d" + name].status == "wrong" and final["d" + name].message.endswith("; " + hint)


def test_a_branch_assigned_with_its_own_shape_is_named_too(tmp_path):
    path = broken(tmp_path, "dcounts += torch.ones_like(counts) * dcounts_sum", "dcounts = dcounts_sum")
    result = grade_script(path, io.StringIO())
    assert result.wrong == [f"dcounts (line {line_of('dcounts = dcounts_sum', path)})"]
    wrong = result[result.wrong[0]]
    assert wrong.message.startswith("shape (32, 1), expected (32, 27)")
    assert result["dnorm_logits"].message.startswith(f"right for your {wrong.label}, which is off")
    assert "this holds only the gradient through counts_sum; add the branches with +=" in wrong.message
    assert [r.status for r in result.rows if r.name == "dcounts"] == ["ok", "wrong"]


def test_the_hint_is_never_shown_for_a_right_solution():
    result = grade_script(SOLUTION, io.StringIO())
    assert result.ok and not [r for r in result.rows if "add the branches" in r.message or "one of the" in r.message]


def test_a_crash_grades_every_row_before_it_and_points_at_the_first_wrong_shape(tmp_path, capsys):
    slip = "dcounts_sum_inv = (counts * dprobs).sum(1)"
    path = broken(tmp_path, "dcounts_sum_inv = (counts * dprobs).sum(1, keepdim=True)", slip)
    crash = line_of("dcounts += torch.ones_like(counts) * dcounts_sum", path)
    assert main(["grade", str(path)]) == 1
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0].startswith(f"{path} line {crash} raised RuntimeError: The size of tensor a (27) must match")
    assert lines[1:3] == [f'  File "{path}", line {crash}, in <module>',
                          "    dcounts += torch.ones_like(counts) * dcounts_sum"]
    assert lines[3].startswith("RuntimeError: ") and lines[4] == "graded up to there:"
    assert "\n  dlogprobs        ok " in out and "\n  dprobs           ok " in out
    assert ("\n  dcounts_sum_inv  WRONG                     shape (32,), expected (32, 1): the values are right; "
            "reduce with keepdim=True") in out
    assert out.rstrip().endswith(f"-- your code stopped at the error above; the first wrong shape is dcounts_sum_inv "
                                 f"(line {line_of(slip, path)}), which likely caused it: fix that first")


def test_a_crash_does_not_blame_the_gradient_it_stopped_adding_to(tmp_path):
    path = broken(tmp_path, "dcounts_sum = -(counts_sum**-2) * dcounts_sum_inv",
                  "dcounts_sum = -(counts_sum**-2) * dcounts_sum_iv")
    result = grade_script(path, io.StringIO())
    assert result.crash.startswith(f"{path} line {line_of('dcounts_sum_iv', path)} raised NameError")
    assert result["dcounts"].status == "ok"
    assert result["dcounts"].message == ("the gradient through probs, one of the 2 steps counts feeds, so far: your "
                                         "code stopped before the rest")
    assert not result.wrong


def test_a_name_error_grades_what_ran_before_it(tmp_path, capsys):
    path = broken(tmp_path, "dh = dlogits @ W2.T", "dh = dlogits @ W3.T")
    assert main(["grade", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{path} line {line_of('W3', path)} raised NameError: name 'W3' is not defined\n")
    assert "gradients: 8 ok, 18 missing -- your code stopped at the error above: fix it and grade again" in out


def test_a_notebook_cell_that_raises_is_named_and_the_cells_before_it_graded(tmp_path, capsys):
    source = SOLUTION.read_text()
    head, tail = source.split("dh = dlogits @ W2.T\n")
    cells = [{"cell_type": "code", "metadata": {}, "source": head},
             {"cell_type": "code", "metadata": {}, "source": "x = 1\ndh = dlogits @ W3.T\n" + tail}]
    path = tmp_path / "crash.ipynb"
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    assert main(["grade", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{path} cell 2 line 2 raised NameError: name 'W3' is not defined\n"
                          f'  File "{path}", cell 2, line 2, in <module>\n    dh = dlogits @ W3.T\n')
    assert "gradients: 8 ok, 18 missing" in out


def test_from_handprop_import_grade_is_the_callable_and_import_handprop_stays_light(tmp_path):
    namespace = run_learner(SOLUTION)[0]
    printed = io.StringIO()
    assert handprop.grade(namespace, printed).ok and printed.getvalue().rstrip().endswith("-- all right")
    light = subprocess.run([sys.executable, "-c", "import handprop, sys; print('torch' in sys.modules)"],
                           capture_output=True, text=True, check=True)
    assert light.stdout == "False\n"


def test_a_notebook_runs_in_its_own_folder(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "ninja"
    folder.mkdir()
    (folder / "batch.txt").write_text("32\n")
    code = "n_from_file = int(open('batch.txt').read())\n" + SOLUTION.read_text()
    (folder / "x.ipynb").write_text(json.dumps({"cells": [{"cell_type": "code", "metadata": {}, "source": code}],
                                                "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    monkeypatch.chdir(tmp_path)
    assert main(["grade", "ninja/x.ipynb"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("-- all right")
    assert Path.cwd() == tmp_path


def test_a_script_that_never_ends_is_stopped_after_its_timeout(tmp_path, capsys):
    path = tmp_path / "forever.py"
    path.write_text("x = 1\nwhile True:\n    try:\n        x += 1\n    except Exception:\n        pass\n")
    assert main(["grade", str(path), "--timeout", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"handprop: error: {path} did not finish within 1 s at line ") and err.count("\n") == 1
    assert err.endswith(" (--timeout sets the limit)\n")
    with pytest.raises(SystemExit, match="2"):
        main(["grade", str(path), "--timeout", "0"])
    assert "--timeout: must be between 1 and " in capsys.readouterr().err


def test_the_exercise_comes_from_the_marker_line_and_a_wrong_one_is_one_line(toy, tmp_path, capsys):
    from handprop.ninja.starter import solution_source

    path = tmp_path / "toy.py"
    path.write_text(solution_source(toy))
    assert main(["grade", str(path)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("gradients: 2 ok -- all right")
    assert main(["grade", str(path), "--exercise", "mlp"]) == 2
    assert capsys.readouterr().err == (
        f"handprop: error: cannot grade without C, Xb, b1, W1, bnbias, bngain, b2, W2, Yb in {path} (the mlp "
        "exercise's names for its parameters and data); this looks like the toy exercise: --exercise toy\n")
    path.write_text(path.read_text().replace("# handprop exercise: toy", "# handprop exercise: nosuch"))
    assert main(["grade", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"handprop: error: {path}'s marker line names the exercise 'nosuch', "
                                              f"which handprop does not have ({', '.join(EXERCISES)}; see handprop "
                                              "exercise list)")
    with pytest.raises(SystemExit, match="2"):
        main(["grade", str(path), "--exercise", "nosuch"])
    assert "invalid choice: 'nosuch'" in capsys.readouterr().err


def test_grade_globals_finds_the_exercise_by_its_names_and_grades_any_exercise(toy, tmp_path):
    path = tmp_path / "toy.py"
    path.write_text("import torch\n" + toy.setup_code + toy.forward_code + "dy = upstream.clone()\ndw = dy.T @ x\n")
    namespace = run_learner(path)[0]
    result = grade(namespace, io.StringIO())
    assert result["dy"].status == "ok"
    assert result["dw"].status == "wrong" and result["dw"].message.startswith("shape (2, 3), expected (3, 2): it is "
                                                                              "transposed")
    namespace["dw"] = namespace["dw"].T.contiguous() * 1.5
    assert grade(namespace, io.StringIO(), "toy")["dw"].message.endswith("off by a constant factor 1.5")
    with pytest.raises(handprop.errors.UserError, match=r"this looks like the toy exercise: grade\(globals\(\), "
                                                        r"exercise='toy'\)"):
        grade(namespace, io.StringIO(), "mlp")
    with pytest.raises(handprop.errors.UserError, match=r"no exercise named 'toys': handprop has mlp, .*toy"):
        grade(namespace, io.StringIO(), "toys")


def test_exercise_list_has_a_line_per_exercise(capsys):
    assert main(["exercise", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(EXERCISES)
    assert all(EXERCISES[line.split()[0]].summary in line for line in lines)


def test_the_float32_setup_of_a_file_is_not_changed_by_grading(toy, tmp_path):
    path = tmp_path / "toy.py"
    path.write_text("import torch\n" + toy.setup_code + toy.forward_code + "dy = upstream.clone()\n")
    namespace = run_learner(path)[0]
    before = namespace["x"].clone()
    grade(namespace, io.StringIO())
    assert namespace["x"].dtype == torch.float32 and torch.equal(namespace["x"], before)
