"""examples/backprop_ninja.ipynb runs top to bottom and its grade cells say what they should."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

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
