import contextlib
import io
import os

import pytest
import torch

from handprop.cli import main
from handprop.data import load_corpus

# One thread per test process, the python -m handprop processes the tests start included: the suite runs as
# two workers on two cores (pytest -n 2), and two torch processes with default threads slow each other badly.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory):
    """A work directory with a briefly trained default model; what training printed is in train.log."""
    work_dir = tmp_path_factory.mktemp("trained")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["train", "-o", str(work_dir), "--max-steps", "3000", "--log-every", "1000"]) == 0
    (work_dir / "train.log").write_text(printed.getvalue())
    return work_dir


@pytest.fixture(scope="session")
def names(tmp_path_factory):
    """The first 400 names of names.txt: short runs whose final evaluation takes no time (and, being the same file
    in every test, one compiled graph per model that Inductor's cache keeps)."""
    path = tmp_path_factory.mktemp("names") / "names.txt"
    path.write_text("\n".join(load_corpus().items[:400]) + "\n")
    return path
