"""The exercises tried as a new user would (issue 20 item 3, issue 18): each rough edge found, reproduced here.

The mlp exercise's derivation page, the starter's pointer to its page from wherever it is written, a
mistyped exercise name, a file that is no exercise, a gradient not summed back over a broadcast, a folder
that does not exist, Ctrl-C while a learner's file runs, and grade(globals()) on every exercise in a kernel.
"""

import io
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import yaml
from nbclient import NotebookClient

from handprop.cli import main
from handprop.errors import UserError
from handprop.ninja.exercises import EXERCISES
from handprop.ninja.grade import grade, grade_script
from handprop.ninja.starter import DOCS_SECTION, DOCS_TITLE, solution_source, starter_notebook, starter_script

ROOT = Path(__file__).resolve().parents[1]


def test_the_mlp_page_derives_each_gradient_and_the_three_exercises():
    """(That its code is exactly the exercise's is test_exercises' check, over every page.)"""
    exercise = EXERCISES["mlp"]
    page = (ROOT / "docs" / exercise.page).read_text()
    for title in ("Exercise 1", "Exercise 2", "Exercise 3", "Pitfalls"):
        assert f"\n## {title}" in page
    for gradient in exercise.gradients:                        # each gradient has its paragraph
        assert f"**d{gradient}" in page or f", d{gradient}" in page, gradient


def test_every_page_is_in_the_docs_site_where_the_starter_says_it_is():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    section = next(entry[DOCS_SECTION] for entry in nav if DOCS_SECTION in entry)
    titled = [{DOCS_TITLE.format(name): exercise.page} for name, exercise in EXERCISES.items()]
    assert [entry for entry in section if entry in titled] == titled        # every page, in the list's order
    for exercise in EXERCISES.values():
        assert (ROOT / "docs" / exercise.page).is_file()
        notebook = nbformat.reads(starter_notebook(exercise), as_version=4)
        for text in (starter_script(exercise), notebook.cells[0].source):
            words = " ".join(text.split())
            assert f'"{DOCS_SECTION} > {DOCS_TITLE.format(exercise.name)}" of handprop\'s docs site' in words
            assert f"`docs/{exercise.page}` in handprop's repository" in words
            assert "](" not in text        # no link relative to the learner's folder, where it cannot resolve


@pytest.mark.parametrize(("typed", "meant"), [("mlpp", "mlp"), ("transformer", "transformer-block"),
                                              ("transformer_block", "transformer-block"), ("GRU", "gru"),
                                              ("wavnet", "wavenet")])
def test_a_mistyped_exercise_name_suggests_the_close_one(typed, meant, tmp_path, capsys):
    names = ", ".join(EXERCISES)
    for argv in (["exercise", "start", typed, "-o", str(tmp_path / "x.py")],
                 ["exercise", "solution", typed, "-o", str(tmp_path / "x.py")],
                 ["grade", str(tmp_path / "x.py"), "--exercise", typed]):
        with pytest.raises(SystemExit, match="2"):
            main(argv)
        argument = "--exercise" if "grade" in argv else "NAME"
        assert capsys.readouterr().err == (f"handprop: error: argument {argument}: invalid choice: {typed!r} (choose "
                                           f"from {names}); did you mean {meant!r}?\n")
    assert not (tmp_path / "x.py").exists()
    with pytest.raises(UserError, match=rf"no exercise named {typed!r}: handprop has {names}; did you mean "
                                        rf"{meant!r}\?$"):
        grade({}, io.StringIO(), typed)
    path = tmp_path / "marked.py"
    path.write_text(f"# handprop exercise: {typed}\n")
    assert main(["grade", str(path)]) == 2
    assert capsys.readouterr().err.endswith(f"see handprop exercise list); did you mean {meant!r}?\n")


def test_a_name_close_to_none_gets_no_suggestion(capsys):
    with pytest.raises(SystemExit, match="2"):
        main(["exercise", "start", "lstm", "-o", "x.py"])
    assert capsys.readouterr().err.endswith(f"invalid choice: 'lstm' (choose from {', '.join(EXERCISES)})\n")


@pytest.mark.parametrize("text", ["", "import torch\nweights = torch.ones(3)\nx = 2\n"])
def test_a_file_of_no_exercise_says_how_to_name_one_not_mlps_names(text, tmp_path, capsys):
    path = tmp_path / "mine.py"
    path.write_text(text)
    assert main(["grade", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"handprop: error: {path} has no marker line (# handprop exercise: NAME, the first line of every starter) "
        "and defines the tensors of no exercise: name the exercise with --exercise NAME (see handprop exercise "
        "list)\n")
    with pytest.raises(UserError, match=r"^these names define the tensors of no exercise: name the exercise with "
                                        r"grade\(globals\(\), exercise='NAME'\)"):
        grade({"x": 1}, io.StringIO())


def test_a_crash_before_any_tensor_is_the_crash_alone(tmp_path, capsys):
    path = tmp_path / "mine.py"
    path.write_text("import torch\nraise ValueError('the data file is not where I thought')\n")
    assert main(["grade", str(path)]) == 2
    assert capsys.readouterr().err == (f"handprop: error: {path} line 2 raised ValueError: the data file is not "
                                       "where I thought\n")


def graded(tmp_path, exercise, old, new):
    """The rows of exercise's worked solution with its line old replaced by new, graded as handprop grade does."""
    source = solution_source(EXERCISES[exercise])
    assert source.count(old) == 1, old
    path = tmp_path / f"{exercise}.py"
    path.write_text(source.replace(old, new))
    return grade_script(path, io.StringIO())


@pytest.mark.parametrize(("exercise", "old", "new", "message"), [
    ("mlp", "db2 = dlogits.sum(0)", "db2 = dlogits",
     "shape (32, 27), expected (27,): summed over dim 0 it is right; the forward broadcast it over dim 0, so its "
     "gradient sums back: .sum(0)"),
    ("mlp", "dbngain = (bnraw * dhpreact).sum(0, keepdim=True)", "dbngain = bnraw * dhpreact",
     "shape (32, 64), expected (1, 64): summed over dim 0 it is right; the forward broadcast it over dim 0, so its "
     "gradient sums back: .sum(0, keepdim=True)"),
    ("layernorm", "dgamma = (xhat * dout).sum((0, 1))", "dgamma = xhat * dout",
     "shape (4, 5, 8), expected (8,): summed over dim (0, 1) it is right; the forward broadcast it over dim (0, 1), "
     "so its gradient sums back: .sum((0, 1))"),
    # summed, this one is still wrong: no claim about the broadcast, only the shape
    ("mlp", "dbngain = (bnraw * dhpreact).sum(0, keepdim=True)", "dbngain = dhpreact",
     "shape (32, 64), expected (1, 64)"),
])
def test_a_gradient_not_summed_back_over_a_broadcast_says_which_dims(exercise, old, new, message, tmp_path):
    result = graded(tmp_path, exercise, old, new)
    name = new.split(" = ")[0]
    assert [r.label for r in result.rows if r.status == "wrong"] == [name]
    assert result[name].message == message


def test_start_into_a_missing_folder_or_an_existing_file_is_one_line(tmp_path, capsys):
    missing = tmp_path / "ninja" / "mlp.ipynb"
    assert main(["exercise", "start", "mlp", "-o", str(missing)]) == 2
    assert capsys.readouterr().err == (f"handprop: error: no such folder for {missing}: {missing.parent} (create it "
                                       "first, or write the file elsewhere)\n")
    assert not missing.parent.exists()
    mine = tmp_path / "mine.py"
    mine.write_text("my work\n")
    assert main(["exercise", "solution", "mlp", "-o", str(mine)]) == 2
    assert "exists already" in capsys.readouterr().err and mine.read_text() == "my work\n"


def test_ctrl_c_while_a_learners_file_runs_is_one_line_and_exit_130(tmp_path):
    looping = tmp_path / "looping.py"
    started = tmp_path / "started"
    looping.write_text(f"# handprop exercise: mlp\nopen({str(started)!r}, 'w').close()\nwhile True:\n    pass\n")
    process = subprocess.Popen([sys.executable, "-m", "handprop", "grade", str(looping)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert (process.returncode, out, err) == (130, "", "handprop: interrupted\n")


def test_grade_globals_in_a_notebook_grades_every_exercise_worked_solution_all_ok(tmp_path):
    """Each starter notebook with its blanks filled in by the worked solution, in one kernel: every row ok. Then a
    mistake in the grading call, which the notebook shows as one line, not a traceback through handprop."""
    cells = []
    for exercise in EXERCISES.values():
        notebook = nbformat.reads(starter_notebook(exercise), as_version=4)
        for i, cell in enumerate(notebook.cells):
            cell.id = f"{exercise.name}-{i}"       # unique across the notebooks put together
            if cell.cell_type == "code" and "= None  # TODO" in cell.source:
                cell.source = exercise.solution_code
        cells += [nbformat.v4.new_code_cell("%reset -f")] + notebook.cells
    mistaken = nbformat.v4.new_code_cell("result = grade(globals(), exercise='mlpp')")
    too_soon = nbformat.v4.new_code_cell("%reset -f\nfrom handprop import grade\nresult = grade(globals(), "
                                         "exercise='layernorm')")
    combined = nbformat.v4.new_notebook(cells=[*cells, mistaken, too_soon])
    NotebookClient(combined, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}},
                   allow_errors=True).execute()
    outputs = [o for cell in combined.cells if cell.cell_type == "code" for o in cell.outputs]
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    verdicts = re.findall(r"^forward: .*$", printed, re.MULTILINE)
    assert verdicts == [f"forward: 0 wrong; gradients: {len(e.gradients)} ok -- all right" for e in EXERCISES.values()]
    assert [o for o in outputs if o.output_type == "error"] == mistaken.outputs + too_soon.outputs
    assert mistaken.outputs[0].traceback == [f"handprop: error: no exercise named 'mlpp': handprop has "
                                             f"{', '.join(EXERCISES)}; did you mean 'mlp'?"]
    inputs = ", ".join(EXERCISES["layernorm"].inputs())
    assert too_soon.outputs[0].traceback == [f"handprop: error: cannot grade without {inputs} (the layernorm "
                                             "exercise's names for its parameters and data); run the cells that "
                                             "define them first"]


@pytest.mark.parametrize(("exercise", "old", "new"), [
    ("mlp", "dlogit_maxes = -dnorm_logits.sum(1, keepdim=True)", "dlogit_maxes = -dnorm_logits.sum(1)"),
    ("attention", "dscore_maxes = -dnorm_scores.sum(-1, keepdim=True)", "dscore_maxes = -dnorm_scores.sum(-1)"),
])
def test_a_missing_keepdim_on_a_gradient_that_is_zero_up_to_rounding_is_called_right_in_value(exercise, old, new,
                                                                                              tmp_path):
    """The max-subtraction's gradient is rounding noise: its values are judged at the scale of its readers' gradients
    (as every value is), not at its own, or its row blamed right values."""
    result = graded(tmp_path, exercise, old, new)
    name = new.split(" = ")[0]
    assert result[name].status == "wrong"
    assert result[name].message.endswith(": the values are right; reduce with keepdim=True")


def test_a_weight_summed_over_three_of_four_steps_lists_them_as_a_reader_would(tmp_path):
    result = graded(tmp_path, "rnn", "dWxh += xh3.T @ dhpre3", "dWxh = xh3.T @ dhpre3")
    wrong = [r for r in result.rows if r.status == "wrong"]
    assert [r.label.split()[0] for r in wrong] == ["dWxh"]
    assert wrong[0].message.endswith("Wxh feeds 4 steps (hpre1, hpre2, hpre3, hpre4): this holds only the gradient "
                                     "through hpre1, hpre2 and hpre3; add the branches with +=")


def test_start_into_a_folder_that_cannot_be_written_is_one_line(capsys):
    target = Path("/proc/handprop-starter.py")     # /proc takes no new files, even from root
    assert main(["exercise", "start", "mlp", "-o", str(target)]) == 2
    assert capsys.readouterr().err.startswith(f"handprop: error: cannot write {target}: ")


def test_a_full_disk_leaves_no_half_written_starter(tmp_path, monkeypatch, capsys):
    real_open = Path.open

    class FillsUp:
        """A file that takes the first 100 characters, then the disk is full."""

        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[:100])
            self.f.flush()
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "open", lambda self, *args, **kwargs: FillsUp(real_open(self, *args, **kwargs)))
    target = tmp_path / "mlp.py"
    assert main(["exercise", "start", "mlp", "-o", str(target)]) == 2
    assert capsys.readouterr().err == f"handprop: error: cannot write {target}: No space left on device\n"
    assert not target.exists()


@pytest.mark.parametrize(("exercise", "old", "new", "hint"), [
    ("mlp", "dhprebn += 1.0 / n * dbnmeani", "dhprebn += dbnmeani",
     "hprebn feeds 2 steps (bnmeani, bndiff): the branch through bnmeani is off by a factor n = 32: check the 1/n "
     "of the mean"),
    ("layernorm", "dx += 1 / C * dxmean", "dx += dxmean",
     "x feeds 2 steps (xmean, xdiff): the branch through xmean is off by a factor C = 8: check the 1/C of the mean"),
    ("mlp", "dbndiff += 2 * bndiff * dbndiff2", "dbndiff -= 2 * bndiff * dbndiff2",
     "bndiff feeds 2 steps (bndiff2, bnraw): the branch through bndiff2 is minus what it should be"),
    ("mlp", "dbndiff2 = 1.0 / (n - 1) * torch.ones_like(bndiff2) * dbnvar",
     "dbndiff2 = torch.ones_like(bndiff2) * dbnvar",
     "off by a factor n - 1 = 31: check the 1/(n - 1)"),
])
def test_a_factor_forgotten_in_one_branch_names_the_branch_and_the_factor(exercise, old, new, hint, tmp_path):
    result = graded(tmp_path, exercise, old, new)
    (wrong,) = [r for r in result.rows if r.status == "wrong"]
    assert wrong.label.split()[0] == new.split()[0]
    assert wrong.message.endswith(f"; {hint}")
