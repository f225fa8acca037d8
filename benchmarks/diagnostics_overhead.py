"""What diagnostics cost: train()'s loop with them off and on, against a hook-free baseline, same run.

The baseline is train()'s loop written out without the diagnostics hooks, over a Sequential
without the recording switch. train()'s own speed is the steps/s its progress line reports
for the whole loop (setup, evaluation and saving are outside it). Rounds are interleaved
(in rotating order) and the best of each is kept; two baseline rounds compared give the noise. Both loops are
timed by the same meter (train.Progress).

    python benchmarks/diagnostics_overhead.py [--steps 5000] [--repeats 5] [--model mlp] [--threads 1]
"""

import argparse
import io
import re
import tempfile

import torch

from handprop.data import load_corpus, make_splits, sample_batch
from handprop.layers import Sequential
from handprop.losses import CrossEntropy
from handprop.models import build_model, preset
from handprop.optim import lecture_lr, make_optimizer
from handprop.train import Progress, TrainConfig, train


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


def baseline_rate(corpus, model_config, config):
    """Steps/s of train()'s loop with no diagnostics code at all."""
    Xtr, Ytr = make_splits(corpus, model_config.block_size).tensors["train"]
    generator = torch.Generator().manual_seed(config.seed)
    with torch.inference_mode():
        model = PlainSequential(build_model(model_config, generator).layers)
        optimizer, criterion = make_optimizer(config.optimizer, model.parameters()), CrossEntropy()
        printed = io.StringIO()
        progress = Progress(config.max_steps, config.log_every, printed)
        for step in range(config.max_steps):
            Xb, Yb = sample_batch(Xtr, Ytr, config.batch_size, generator)
            loss = criterion.forward(model.forward(Xb), Yb)
            model.backward(criterion.backward())
            lr = lecture_lr(step, config.max_steps, config.lr, config.lr_decay_at)
            optimizer.step(model.grads, lr)
            if progress.due(step + 1):
                progress.update(step + 1, loss.item(), lr)
    return reported_rate(printed.getvalue())


def train_rate(corpus, model_config, config):
    """Steps/s of train()'s loop, as its own progress line reports it."""
    printed = io.StringIO()
    with tempfile.TemporaryDirectory() as work_dir:
        train(corpus, model_config, config, work_dir, out=printed)
    return reported_rate(printed.getvalue())


def reported_rate(printed):
    """The steps/s of the last progress line: with log_every = max_steps, the whole loop's speed."""
    return float(re.findall(r"([\d,]+) steps/s", printed)[-1].replace(",", ""))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model", default="mlp")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus, model_config = load_corpus(), preset(args.model)
    off = TrainConfig(max_steps=args.steps, log_every=args.steps)          # one progress line: the whole loop
    on = TrainConfig(max_steps=args.steps, log_every=args.steps, diagnostics_every=max(1, args.steps // 100))
    runs = {                                                    # name -> a measurement of steps/s
        "baseline": lambda: baseline_rate(corpus, model_config, off),
        "off": lambda: train_rate(corpus, model_config, off),
        "baseline again": lambda: baseline_rate(corpus, model_config, off),
        "on": lambda: train_rate(corpus, model_config, on),
    }
    rates = {name: [] for name in runs}
    names = list(runs)
    for r in range(args.repeats):
        for name in names[r % 4 :] + names[: r % 4]:  # rotate the order: no run always goes first
            rates[name].append(runs[name]())
    best = {name: max(r) for name, r in rates.items()}          # the least disturbed round: these machines are noisy
    print(f"model {args.model}, batch 32, {args.steps} steps x {args.repeats}, {torch.get_num_threads()} threads")
    print(f"baseline loop (no hooks):           {best['baseline']:8.0f} steps/s")
    print(f"train(), diagnostics off:           {best['off']:8.0f} steps/s")
    print(f"train(), diagnostics every {on.diagnostics_every:<6}   {best['on']:8.0f} steps/s")
    print(f"noise, baseline again / baseline:   {best['baseline again'] / best['baseline']:.3f}")
    print(f"ratio off / baseline:               {best['off'] / best['baseline']:.3f}")
    print(f"ratio on / baseline:                {best['on'] / best['baseline']:.3f}")


if __name__ == "__main__":
    main()
