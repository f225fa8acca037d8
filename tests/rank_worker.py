"""What one rank does in test_distributed.py: launched as `python rank_worker.py OUT` with torchrun's variables set.

It joins the ranks as `handprop train` does (distributed.launched), runs the sync BatchNorm cases,
the training runs of RUNS and a start-state check that differs by rank, and saves what it saw to
OUT/rank<r>.pt. The test runs the same functions
in one process (ALONE) for the reference.
"""

import hashlib
import io
import sys
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from handprop import train as train_module
from handprop.config import TrainConfig
from handprop.data import load_corpus
from handprop.distributed import launched, shard_rows
from handprop.errors import UserError
from handprop.layers import BatchNorm1d
from handprop.models import build_model
from handprop.settings import preset, recipe

# name -> (preset, model overrides, train overrides, dtype): the library-level runs both sides compare
RUNS = {
    "mlp-float32": ("mlp", {}, {"max_steps": 200}, torch.float32),
    "mlp-float64": ("mlp", {}, {"max_steps": 200}, torch.float64),
    "wavenet-float32": ("wavenet", {"n_hidden": 32}, {"max_steps": 40}, torch.float32),
    "transformer-float32": ("transformer", {"n_embd": 16, "n_layers": 1, "n_head": 2, "dropout": 0.2},
                            {"max_steps": 30, "warmup": 5}, torch.float32),
    "transformer-float64": ("transformer", {"n_embd": 16, "n_layers": 1, "n_head": 2, "dropout": 0.2},
                            {"max_steps": 30, "warmup": 5}, torch.float64),
    "gru-float32": ("gru", {"n_embd": 16, "n_hidden": 32}, {"max_steps": 30, "warmup": 5}, torch.float32),
}
BN_CASES = {"bessel (B, C)": (True, (8, 5)), "biased (B, C)": (False, (8, 5)), "bessel (B, T, C)": (True, (4, 6, 3))}


def bn_inputs(bessel, shape):
    """The global batch's input and upstream gradient, and a BatchNorm with non-trivial gamma and beta (float64)."""
    g = torch.Generator().manual_seed(7)
    C = shape[-1]
    layer = BatchNorm1d(1 + 0.5 * torch.randn(C, generator=g, dtype=torch.float64),
                        torch.randn(C, generator=g, dtype=torch.float64), momentum=0.1, bessel=bessel)
    layer.running_mean.copy_(torch.randn(C, generator=g, dtype=torch.float64))
    x = 2 + 3 * torch.randn(shape, generator=g, dtype=torch.float64)       # off-centre, wide: a real normalisation
    return layer, x, torch.randn(shape, generator=g, dtype=torch.float64)


def batchnorm_cases(world):
    """Each case on this rank's rows of the global batch: its output, dx, (partial) grads and running statistics."""
    results = {}
    for name, (bessel, shape) in BN_CASES.items():
        layer, x, dout = bn_inputs(bessel, shape)
        world.attach(layer, shape[0])
        start, stop = shard_rows(world.rank, world.size, shape[0])
        out = layer.forward(x[start:stop])
        dx = layer.backward(dout[start:stop])
        results[name] = {"out": out, "dx": dx, **layer.grads, **layer.buffers()}
    return results


@contextmanager
def built_in(dtype):
    """While active, train builds its models in dtype."""
    real = train_module.build_model
    train_module.build_model = partial(build_model, dtype=dtype)
    try:
        yield
    finally:
        train_module.build_model = real


@contextmanager
def recorded(world, record):
    """While active, record the first batch each rank saw and the BatchNorm buffers before the final recalibration."""
    real_shard, real_recalibrate = world.shard, train_module.recalibrate_batchnorm

    def shard(X, Y):
        mine = real_shard(X, Y)
        record.setdefault("first_batch", (X, mine[0]))
        return mine

    def recalibrate(model, X):
        record["buffers_trained"] = {k: v.clone() for k, v in model.buffers().items()}
        real_recalibrate(model, X)

    world.shard, train_module.recalibrate_batchnorm = shard, recalibrate
    try:
        yield
    finally:
        world.shard, train_module.recalibrate_batchnorm = real_shard, real_recalibrate


def training_run(world, name, corpus_path, out_dir):
    """One run of RUNS on world's ranks: the final parameters and buffers, the trained buffers and the first batch."""
    kind, model_overrides, train_overrides, dtype = RUNS[name]
    model_config = preset(kind, **model_overrides)
    config = replace(recipe(kind), batch_size=32, save_every=10**6, log_every=10**6, **train_overrides)
    assert isinstance(config, TrainConfig)
    record = {}
    with built_in(dtype), recorded(world, record):
        model, losses = train_module.train(load_corpus(corpus_path), model_config, config, Path(out_dir) / name,
                                           world=world, out=io.StringIO())
    return record | {"params": model.parameters(), "buffers": model.buffers(), "losses": losses}


def main(out_dir, corpus_path):
    world = launched("cpu")
    with world.joined():
        results = {"rank": world.rank, "size": world.size, "batchnorm": batchnorm_cases(world)}
        results["runs"] = {name: training_run(world, name, corpus_path, Path(out_dir) / f"rank{world.rank}")
                           for name in RUNS}
        try:                                # ranks that would start apart: each says which differ from rank 0
            world.check_same(lambda: hashlib.sha256(bytes([world.rank])).hexdigest())
        except UserError as e:
            results["differing"] = str(e)
    torch.save(results, Path(out_dir) / f"rank{world.rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
