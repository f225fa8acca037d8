"""The README's two pictures: tanh activations of part 3's deep net at its first step, naive init vs the lecture's.

Both runs leave out BatchNorm so the init alone decides. Writes docs/init-naive.png and
docs/init-lecture.png (about 50 kB each).

    python scripts/init_pictures.py [--out docs]
"""

import argparse
import io
import tempfile
from pathlib import Path

from handprop.checkpoint import atomic_write
from handprop.config import TrainConfig
from handprop.data import load_corpus
from handprop.diagnostics import FILENAME, load_history
from handprop.report import plot_activations, png_bytes
from handprop.settings import preset
from handprop.train import train

TITLES = {
    "naive": "--init naive --no-batchnorm: unit-variance weights",
    "lecture": "--init lecture --no-batchnorm: Kaiming 5/3 gain",
}


def first_step_picture(corpus, init):
    """PNG bytes of the activation histograms at step 0 of the deep net with this init."""
    with tempfile.TemporaryDirectory() as work_dir:
        config = TrainConfig(max_steps=1, diagnostics_every=1)
        train(corpus, preset("deep", init=init, batchnorm=False), config, work_dir, out=io.StringIO())
        history = load_history(Path(work_dir) / FILENAME)
    fig = plot_activations(history, which=("first",))
    fig.suptitle(TITLES[init])
    return png_bytes(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs", help="folder for the two PNGs (default docs)")
    args = p.parse_args()
    out, corpus = Path(args.out), load_corpus()
    out.mkdir(parents=True, exist_ok=True)
    for init in TITLES:
        atomic_write(out / f"init-{init}.png", first_step_picture(corpus, init))
        print(out / f"init-{init}.png")


if __name__ == "__main__":
    main()
