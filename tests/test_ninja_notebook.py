"""examples/backprop_ninja.ipynb runs top to bottom, its grade cells say what they should; handprop grade grades it."""

import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from handprop.cli import main

NOTEBOOK = Path(__file__).parents[1] / "examples" / "backprop_ninja.ipynb"


def test_the_notebook_runs_and_grades():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, kernel_name="python3", timeout=120).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "forward: 0 wrong; gradients: 13 ok, 13 missing -- all right" in printed
    assert "biased (1/n) variance" in printed
    assert "gradients: 12 ok, 1 wrong, 13 missing -- fix the WRONG rows first" in printed


def test_handprop_grade_runs_the_notebooks_code_cells_and_grades_every_version(capsys):
    assert main(["grade", str(NOTEBOOK)]) == 0
    out = capsys.readouterr().out
    # the notebook's own grade cells stay quiet under handprop grade, which prints one table: exercise 1's dlogits
    # (in the notebook's sixth cell) and exercise 2's (tenth) are graded apart
    assert out.count("forward pass: ") == 1
    last = out[out.rindex("forward pass: "):]
    assert re.search(r"\n  dlogits \(cell 6, lines \d+-\d+\) +ok ", last)
    assert re.search(r"\n  dlogits \(cell 10, line 1\) +ok ", last)
    assert last.rstrip().endswith("forward: 0 wrong; gradients: 14 ok, 13 missing -- all right")
