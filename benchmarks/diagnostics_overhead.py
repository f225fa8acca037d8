"""What diagnostics cost: train.run_steps with them off and on, against a bare loop, same run.

The baseline is the package's step (step.EagerStep, with nothing to record) in a bare loop,
without run_steps' diagnostics calls, checks and progress, over a Sequential without the
recording switch. Four runs start from
the same init and advance in turns, a chunk of steps at a time, in rotating order, so a
burst of load on a shared machine hits them alike; each speed is chunk / median chunk time.
A second baseline run gives the noise. "on" records every `--every` steps (the CLI's default
for a run of 100 x that many steps); a chunk is two intervals, so each holds two records.

    python benchmarks/diagnostics_overhead.py [--every 50] [--rounds 60] [--model mlp] [--threads 1]
"""

import argparse
import io
import statistics
import tempfile
import time
from dataclasses import replace

import torch

from handprop.config import TrainConfig
from handprop.data import load_corpus, make_splits
from handprop.diagnostics import Diagnostics, NoDiagnostics
from handprop.evaluation import split_loss
from handprop.layers import Sequential
from handprop.progress import Log
from handprop.settings import preset
from handprop.step import EagerStep, schedule_for
from handprop.train import prepare, run_steps


class PlainSequential(Sequential):
    """Sequential as it was before the recording switch."""

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dout):
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        return dout


def baseline_steps(run, splits, work_dir, out, diagnostics, val_loss):
    """The package's step in a bare loop: no diagnostics calls, checks or progress (no checkpoint falls due)."""
    config = run.spec.train_config
    examples, schedule = splits.tensors["train"], schedule_for(config)
    step = EagerStep(run.model, run.optimizer, examples.form.criterion(), examples, config.grad_clip)
    while run.step < config.max_steps:
        step(examples.draw(config.batch_size, run.generator), schedule(run.step))
        run.step += 1


def start(kind, corpus, model_config, config, every):
    """(run, loop, diagnostics, val_loss) for 'baseline', 'off' (run_steps, nothing recorded) or 'on' (recording)."""
    splits, run = prepare(corpus, model_config, config, None)

    def val_loss():
        return split_loss(run.model, splits.tensors["val"])

    if kind == "baseline":
        run.model = PlainSequential(run.model.layers)
        return run, baseline_steps, NoDiagnostics(), val_loss
    diagnostics = Diagnostics(run.model, every, config.max_steps, val_loss) if kind == "on" else NoDiagnostics()
    return run, run_steps, diagnostics, val_loss


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--every", type=int, default=50, help="steps between records when on (default 50)")
    p.add_argument("--rounds", type=int, default=60, help="chunks of 2 x every steps per run (default 60)")
    p.add_argument("--model", default="mlp")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_config, chunk = preset(args.model), 2 * args.every
    corpus = load_corpus()
    splits = make_splits(corpus, model_config.block_size)
    config = TrainConfig(max_steps=chunk * args.rounds, log_every=10**9, save_every=10**9)   # no checkpoint falls due
    kinds = ["baseline", "off", "baseline again", "on"]
    times = {kind: [] for kind in kinds}
    with torch.inference_mode(), tempfile.TemporaryDirectory() as work_dir:
        runs = {kind: start(kind.removesuffix(" again"), corpus, model_config, config, args.every) for kind in kinds}
        out = Log(io.StringIO())
        for r in range(args.rounds):
            for kind in kinds[r % 4 :] + kinds[: r % 4]:    # rotate the order: no run always goes first
                run, loop, diagnostics, val_loss = runs[kind]
                run.spec = replace(run.spec, train_config=replace(config, max_steps=run.step + chunk))
                begin = time.perf_counter()
                loop(run, splits, work_dir, out, diagnostics, val_loss)
                times[kind].append(time.perf_counter() - begin)
    speed = {kind: chunk / statistics.median(t) for kind, t in times.items()}
    print(f"model {args.model}, batch 32, {args.rounds} chunks of {chunk} steps per run, "
          f"{torch.get_num_threads()} threads")
    print(f"baseline, the step in a bare loop: {speed['baseline']:8.0f} steps/s")
    print(f"run_steps, diagnostics off:           {speed['off']:8.0f} steps/s")
    print(f"run_steps, recording every {args.every:<6}     {speed['on']:8.0f} steps/s")
    print(f"noise, baseline again / baseline:     {speed['baseline again'] / speed['baseline']:.3f}")
    print(f"ratio off / baseline:                 {speed['off'] / speed['baseline']:.3f}")
    print(f"ratio on / baseline:                  {speed['on'] / speed['baseline']:.3f}")


if __name__ == "__main__":
    main()
