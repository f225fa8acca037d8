"""train --diagnostics and handprop diagnose: the figures a model has something for, and report.html."""

import base64
import contextlib
import io
import os
import re
import shutil
import struct
import subprocess

import numpy as np
import pytest
from matplotlib.image import imread

from handprop.cli import main
from handprop.diagnostics import FILENAME, load_history
from handprop.report import FIGURES as FIGURE_SPECS

FIGURES = ["loss.png", "activations.png", "gradients.png", "weight_gradients.png", "update_ratios.png"]


@pytest.fixture(scope="module")
def diagnosed_dir(tmp_path_factory):
    """The acceptance run: the default model, 2000 steps, --diagnostics; what it printed is in train.log."""
    work_dir = tmp_path_factory.mktemp("diagnosed")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["train", "-o", str(work_dir), "--max-steps", "2000", "--diagnostics", "--log-every", "1000"]) == 0
    (work_dir / "train.log").write_text(printed.getvalue())
    return work_dir


def png_size(data):
    """(width, height) from a PNG's signature and IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_train_with_diagnostics_writes_five_figures_and_the_report(diagnosed_dir):
    page = (diagnosed_dir / "report.html").read_text()
    for name in FIGURES:
        data = (diagnosed_dir / name).read_bytes()
        width, height = png_size(data)
        assert width >= 600 and height >= 300, name
        pixels = imread(diagnosed_dir / name)                   # decodes every chunk: a whole, valid image
        assert pixels.shape[:2] == (height, width) and pixels[..., :3].std() > 0.05, name   # not a blank canvas
        assert f'src="data:image/png;base64,{base64.b64encode(data).decode()}"' in page, name
    assert re.findall(r'(?:src|href)="(?!data:)', page) == [] and "<script" not in page   # nothing to fetch
    assert len(re.findall(r"<li>[a-z]*</li>", page)) == 20                                 # the 20 samples
    final = (diagnosed_dir / "train.log").read_text().splitlines()[-2]                     # then the 'wrote' line
    for name, value in re.findall(r"(\w+) loss (\d\.\d{4})", final):
        assert f"<th>{name} loss</th><td>{value}</td>" in page


def test_diagnose_redraws_the_same_figures_and_report(diagnosed_dir, capsys):
    before = {name: (diagnosed_dir / name).read_bytes() for name in FIGURES + ["report.html"]}
    assert main(["diagnose", "-o", str(diagnosed_dir)]) == 0
    assert capsys.readouterr().out.startswith("wrote ")
    for name, data in before.items():
        assert (diagnosed_dir / name).read_bytes() == data, name


RECURRENT_ROWS = {"activations.png": ["activations (hidden states)"],
                  "gradients.png": ["gradients (dL/d hidden state)", "gradients (dL/d logits)"]}
# per sequence model: tiny sizes, and the rows of the activations and gradients figures (a row per kind of layer)
SEQUENCE_RUNS = {
    "bigram": ([], {}),                 # a table of logits: no hidden layer, so no activations or gradients figure
    "rnn": (["--n-embd", "8", "--n-hidden", "12"], RECURRENT_ROWS),
    "gru": (["--n-embd", "8", "--n-hidden", "12"], RECURRENT_ROWS),
    "transformer": (["--n-embd", "8", "--n-layers", "1", "--n-head", "2"],
                    {"activations.png": ["activations (LayerNorm outputs)", "activations (attention outputs)",
                                         "activations (GELU outputs)"],
                     "gradients.png": ["gradients (dL/d LayerNorm output)", "gradients (dL/d attention output)",
                                       "gradients (dL/d GELU output)", "gradients (dL/d logits)"]}),
}


@pytest.mark.parametrize("model", SEQUENCE_RUNS)
def test_sequence_models_draw_the_figures_they_have_something_for(tmp_path, model, capsys):
    flags, rows = SEQUENCE_RUNS[model]
    argv = ["train", "-o", str(tmp_path), "--model", model, "--max-steps", "20", "--warmup", "2", "--diagnostics",
            *flags]
    assert main(argv) == 0
    expected = ["loss.png", *rows, "weight_gradients.png", "update_ratios.png"]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(expected)      # nothing left empty is written
    page = (tmp_path / "report.html").read_text()
    for name in expected:
        data = (tmp_path / name).read_bytes()
        width, height = png_size(data)
        pixels = imread(tmp_path / name)                        # decodes every chunk: a whole, valid image
        assert pixels.shape[:2] == (height, width) and pixels[..., :3].std() > 0.05, name
        assert f'src="data:image/png;base64,{base64.b64encode(data).decode()}"' in page, name
    assert page.count("<img ") == len(expected) and page.count("<figcaption>") == len(expected)
    # every panel of every figure has lines, and a row per kind of layer in the model
    history = load_history(tmp_path / FILENAME)
    for name in expected:
        fig = FIGURE_SPECS[name].draw(history)
        assert all(ax.lines for ax in fig.axes), name
        if name in rows:
            titles = [ax.get_title() for ax in fig.axes]        # row by row: the first and the last recorded step
            assert titles == [f"{row}, step {step}" for row in rows[name] for step in (0, 19)], name
    if model == "rnn":                                          # tanh hidden states: their saturation is recorded
        assert history.columns["act_saturation"] == ["1.Recurrent"]
    else:
        assert "act_saturation" not in history.columns
    capsys.readouterr()
    before = {name: (tmp_path / name).read_bytes() for name in expected + ["report.html"]}
    assert main(["diagnose", "-o", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("wrote ")
    for name, data in before.items():
        assert (tmp_path / name).read_bytes() == data, name


def test_diagnose_without_recorded_diagnostics_is_one_clear_error(trained_dir, capsys):
    assert main(["diagnose", "-o", str(trained_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train with --diagnostics" in err
    assert not (trained_dir / "report.html").exists() and not (trained_dir / "loss.png").exists()


def test_diagnose_refuses_diagnostics_of_another_model(trained_dir, diagnosed_dir, tmp_path, capsys):
    shutil.copytree(trained_dir, tmp_path, dirs_exist_ok=True)
    shutil.copy(diagnosed_dir / "diagnostics.safetensors", tmp_path)
    assert main(["diagnose", "-o", str(tmp_path)]) == 2
    assert "recorded for another model" in capsys.readouterr().err
    (tmp_path / "diagnostics.safetensors").write_bytes(b"not a safetensors file")
    assert main(["diagnose", "-o", str(tmp_path)]) == 2
    assert "not a readable handprop diagnostics file" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()


def chromium_screenshot(page, png, profile):
    """Render page with headless Chromium (no network, fresh profile) into png."""
    command = [
        shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
        f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1280,4400", page.as_uri(),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    return imread(png)[..., :3]                                 # (4400, 1280, 3) floats in [0, 1]


def coloured_pixels(pixels):
    """How many pixels are clearly coloured: the report's text is black and grey, only the plots have colour."""
    return int(((pixels.max(-1) - pixels.min(-1)) > 0.3).sum())


def test_report_renders_with_its_images_in_a_headless_browser(diagnosed_dir, tmp_path):
    if shutil.which("chromium") is None:
        message = "needs Debian's chromium (apt-get install chromium); .ci/run installs it"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)   # never skipped in CI
    shown = chromium_screenshot(diagnosed_dir / "report.html", tmp_path / "report.png", tmp_path / "profile-1")
    # the control: the same page with every image's data removed must show no plot at all
    page = (diagnosed_dir / "report.html").read_text()
    stripped = tmp_path / "stripped.html"
    stripped.write_text(re.sub(r"base64,[A-Za-z0-9+/=]+", "base64,", page))
    control = chromium_screenshot(stripped, tmp_path / "stripped.png", tmp_path / "profile-2")
    assert coloured_pixels(control) < 1_000                    # only the broken-image icons
    assert coloured_pixels(shown) > 10_000
    # and every figure is on screen: the coloured rows form five separate blocks
    rows = np.flatnonzero((shown.max(-1) - shown.min(-1) > 0.3).any(1))
    assert 1 + (np.diff(rows) > 40).sum() == len(FIGURES)
