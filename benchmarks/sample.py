"""Sampling speed: the key/value cache (or carried hidden state) against recomputing the whole prefix, same run.

A model trained for `--train-steps` steps with its recipe (or the run in `-o DIR`) samples
`--num` names at once with sample.generate_sequences, once with cached=True (each new
character costs one position: a transformer's keys and values, a recurrent layer's hidden
state are kept) and once with cached=False (the whole prefix goes through the model again
for every character). The two take turns with generators seeded alike, `--repeats` times,
each keeping its best turn; prints names/s of each and their ratio, and how many of the
names came out identical.

Then the proof that the cache computes the same thing: the cached names are fed back, and
at every position the logits of model.step (one position at a time, from the cache) are
compared with the full forward's; the largest difference must be at most 1e-5 (exit status
1 otherwise).

    python benchmarks/sample.py [--model transformer gru] [--num 10000] [--threads 1] [-o DIR]
"""

import argparse
import io
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from handprop.checkpoint import LATEST, load_checkpoint
from handprop.config import SEQUENCE_KINDS
from handprop.data import load_corpus
from handprop.errors import UserError
from handprop.layers import eval_mode
from handprop.models import describe, preset, recipe
from handprop.sample import generate_sequences, positions_left
from handprop.train import train

LOGIT_TOLERANCE = 1e-5      # max |cached - recomputed| logit, float32


def trained(name, steps):
    """A checkpoint of model name trained for steps steps with its recipe, in a temporary directory."""
    config = replace(recipe(name), max_steps=steps, save_every=steps, log_every=steps)
    if config.schedule == "cosine" and config.warmup >= steps:     # a short run keeps a tenth of it for warmup
        config = replace(config, warmup=steps // 10)
    with tempfile.TemporaryDirectory() as work_dir:
        train(load_corpus(), preset(name), config, work_dir, out=io.StringIO())
        return load_checkpoint(Path(work_dir) / LATEST)


def names_per_second(model, vocab, num, max_length, repeats):
    """{cached: (best names/s, the names of the last turn)} for cached True and False, taking turns."""
    rates, names = {True: [], False: []}, {}
    for _ in range(repeats):
        for cached in (True, False):
            generator = torch.Generator().manual_seed(42)       # the same draws for both
            start = time.perf_counter()
            names[cached] = generate_sequences(model, vocab, num, generator, max_length, cached=cached)
            rates[cached].append(num / (time.perf_counter() - start))
    return {cached: (max(r), names[cached]) for cached, r in rates.items()}


def encode_rows(names, vocab, width):
    """The names as model inputs: (N, width) rows [0, c1..cn, 0, ...], the start token first."""
    X = torch.zeros(len(names), width, dtype=torch.long)
    for row, name in enumerate(names):
        ix = vocab.encode(name)
        X[row, 1 : 1 + len(ix)] = torch.tensor(ix, dtype=torch.long)
    return X


@torch.inference_mode()
def cache_differences(model, X):
    """max |step logits - forward logits| at each position of X (N, T), the step's from the cache."""
    with eval_mode(model):
        full = model.forward(X)                                 # (N, T, V)
        cache, worst = model.new_cache(), []
        for t in range(X.shape[1]):
            logits = model.step(X[:, t : t + 1], cache)         # (N, 1, V)
            worst.append((logits[:, 0] - full[:, t]).abs().max().item())
    return worst


def bench(checkpoint, num, repeats):
    """Prints names/s cached and recomputed and the cache's largest logit difference; returns whether it is within."""
    spec, model = checkpoint.spec, checkpoint.model
    limit = positions_left(spec, "")
    max_length = 2 * spec.longest_item if limit is None else min(2 * spec.longest_item, limit)  # sample's default
    print(f"model {describe(spec.model_config)}, step {checkpoint.step}"
          + (f", val loss {checkpoint.losses['val']:.4f}" if checkpoint.losses else "")
          + f"; {num} names at once, at most {max_length} characters, best of {repeats} turns")
    results = names_per_second(model, spec.vocab, num, max_length, repeats)
    (cached, names), (recomputed, again) = results[True], results[False]
    print(f"cached (step):           {cached:8.0f} names/s")
    print(f"recomputed (forward):    {recomputed:8.0f} names/s")
    print(f"ratio cached/recomputed: {cached / recomputed:.2f}; identical names: "
          f"{sum(a == b for a, b in zip(names, again, strict=True))} of {num}")
    worst = cache_differences(model, encode_rows(names, spec.vocab, 1 + max_length))
    largest = max(worst)
    print(f"cached vs full-forward logits over the {num} cached names, every position: max |diff| {largest:.1e} "
          f"(at position {worst.index(largest)}; per position " + " ".join(f"{w:.0e}" for w in worst) + ")")
    ok = largest <= LOGIT_TOLERANCE
    print(f"acceptance max |diff| <= {LOGIT_TOLERANCE:g}: {'ok' if ok else 'FAILED'}")
    return ok


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", default=["transformer", "gru"], choices=SEQUENCE_KINDS,
                   help="models to train and sample (ignored with -o)")
    p.add_argument("-o", "--work-dir", default=None, help="sample the run saved here instead of training one")
    p.add_argument("--train-steps", type=int, default=300, help="steps to train each model first (default 300)")
    p.add_argument("--num", type=int, default=10_000, help="names sampled at once (default 10000)")
    p.add_argument("--repeats", type=int, default=3, help="turns each; the best one counts")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads")
    if args.work_dir:
        try:
            checkpoints = [load_checkpoint(Path(args.work_dir) / LATEST)]
        except UserError as e:
            sys.exit(f"sample.py: error: {e}")
        if checkpoints[0].spec.model_config.form != "sequences":
            sys.exit(f"sample.py: error: {args.work_dir} holds a window model "
                     f"({checkpoints[0].spec.model_config.kind}): it has no cache to compare")
    else:
        checkpoints = (trained(name, args.train_steps) for name in args.model)   # each trained when its turn comes
    ok = [bench(checkpoint, args.num, args.repeats) for checkpoint in checkpoints]
    sys.exit(0 if all(ok) else 1)


if __name__ == "__main__":
    main()
