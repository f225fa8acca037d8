import contextlib
import io

import pytest

from handprop.cli import main


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory):
    """A work directory with a briefly trained default model; what training printed is in train.log."""
    work_dir = tmp_path_factory.mktemp("trained")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["train", "-o", str(work_dir), "--max-steps", "3000", "--log-every", "1000"]) == 0
    (work_dir / "train.log").write_text(printed.getvalue())
    return work_dir
