"""Sampling speed: the batched sampler against a one-at-a-time loop, and the KV cache against recomputing, same run.

(a) The default model (`mlp`, trained `--mlp-steps` steps, or the window-model run in `--mlp-dir`):
`--num` names at once with sample.sample_windows (a chunk of the streamed sampler: the folded forward,
finished rows leaving the batch, inverse-CDF draws), against the lecture's loop that samples one
name at a time through model.forward with torch.multinomial (`--loop-num` names, the rate is what
is compared). The two take turns, `--repeats` times, each keeping its best turn.

(b) Each sequence model of `--model` (trained `--train-steps` steps with its recipe, or the run in
`-o DIR`): `--num` names at once with sample.sample_sequences, cached=True (each new character
costs one position: a transformer's keys and values, a recurrent layer's hidden state are kept)
against cached=False (the whole prefix goes through the model again for every character), taking
turns with generators seeded alike. Then the proof that the cache computes the same thing: the
cached names are fed back and at every position the logits of model.step are compared with the
full forward's; the largest difference must be at most 1e-5 (exit status 1 otherwise).

(c) With `--million`: `handprop sample -n 1000000` of the model of (a) as a subprocess, its wall
time and peak resident memory (the chunks are streamed, so memory stays flat).

Threads: torch.set_num_threads(`--threads`, default 1), deliberately: one core is the honest unit
on a shared machine, and the batched sampler's work is small matrices that gain little from more.

    python benchmarks/sample.py [--model transformer] [--num 10000] [--threads 1] [--million] [-o DIR]
"""

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from handprop.checkpoint import LATEST, load_checkpoint
from handprop.config import SEQUENCE_KINDS
from handprop.data import SEQUENCES, WINDOWS, load_corpus
from handprop.errors import UserError
from handprop.layers import eval_mode
from handprop.models import describe
from handprop.sample import as_list, decode_lines, sample_length, sample_sequences, sample_windows
from handprop.settings import preset, recipe
from handprop.train import train

LOGIT_TOLERANCE = 1e-5      # max |cached - recomputed| logit, float32


def trained(name, steps, work_dir):
    """A checkpoint of model name trained for steps steps with its recipe, saved in work_dir."""
    config = replace(recipe(name), max_steps=steps, save_every=steps, log_every=steps)
    if config.schedule == "cosine" and config.warmup >= steps:     # a short run keeps a tenth of it for warmup
        config = replace(config, warmup=steps // 10)
    train(load_corpus(), preset(name), config, work_dir, out=io.StringIO())
    return load_checkpoint(Path(work_dir) / LATEST)


def heading(checkpoint, what):
    spec = checkpoint.spec
    losses = f", val loss {checkpoint.losses['val']:.4f}" if checkpoint.losses else ""
    print(f"\n{what}: {describe(spec.model_config)}, step {checkpoint.step}{losses}")


@torch.inference_mode()
def one_at_a_time(model, vocab, block_size, num, generator, max_length):
    """The lecture's sampling loop: one name at a time, a Python list as context, model.forward and multinomial."""
    names = []
    with eval_mode(model):
        for _ in range(num):
            context, out = [0] * block_size, []
            while len(out) < max_length:
                probs = torch.softmax(model.forward(torch.tensor([context])), dim=1)     # (1, V)
                ix = torch.multinomial(probs, 1, generator=generator).item()
                if ix == 0:
                    break
                out.append(ix)
                context = context[1:] + [ix]
            names.append(vocab.decode(out))
    return names


def window_bench(checkpoint, num, loop_num, repeats):
    """(a): names/s batched and one at a time, taking turns; prints both, their ratio and the mean lengths."""
    spec, model = checkpoint.spec, checkpoint.model
    max_length, block_size = sample_length(spec, None, ""), spec.model_config.block_size
    heading(checkpoint, "(a) batched against one at a time")
    print(f"{num} names at once against a loop of {loop_num} names one by one, at most {max_length} characters, "
          f"best of {repeats} turns")
    rates, lengths = {"batched": [], "one at a time": []}, {}
    for turn in range(repeats):
        for name, count in (("batched", num), ("one at a time", loop_num)):
            generator = torch.Generator().manual_seed(turn)
            start = time.perf_counter()
            if name == "batched":
                names = as_list(decode_lines(spec.vocab, "", sample_windows(model, spec.vocab, block_size, count,
                                                                            generator, max_length)))
            else:
                names = one_at_a_time(model, spec.vocab, block_size, count, generator, max_length)
            rates[name].append(count / (time.perf_counter() - start))
            lengths[name] = sum(map(len, names)) / count
    batched, loop = max(rates["batched"]), max(rates["one at a time"])
    print(f"batched:        {batched:9.0f} names/s (mean length {lengths['batched']:.2f})")
    print(f"one at a time:  {loop:9.0f} names/s (mean length {lengths['one at a time']:.2f})")
    print(f"ratio batched/one at a time: {batched / loop:.1f}x")


def names_per_second(model, vocab, num, max_length, repeats):
    """{cached: (best names/s, the names of the last turn)} for cached True and False, taking turns."""
    rates, names = {True: [], False: []}, {}
    for _ in range(repeats):
        for cached in (True, False):
            generator = torch.Generator().manual_seed(42)       # the same draws for both
            start = time.perf_counter()
            sampled = sample_sequences(model, vocab, num, generator, max_length, cached=cached)
            names[cached] = as_list(decode_lines(vocab, "", sampled))
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


def cache_bench(checkpoint, num, repeats):
    """(b): names/s cached and recomputed and the cache's largest logit difference; returns whether it is within."""
    spec, model = checkpoint.spec, checkpoint.model
    max_length = sample_length(spec, None, "")
    heading(checkpoint, "(b) cached against recomputed")
    print(f"{num} names at once, at most {max_length} characters, best of {repeats} turns")
    results = names_per_second(model, spec.vocab, num, max_length, repeats)
    (cached, names), (recomputed, again) = results[True], results[False]
    print(f"cached (step):           {cached:8.0f} names/s")
    print(f"recomputed (forward):    {recomputed:8.0f} names/s")
    print(f"ratio cached/recomputed: {cached / recomputed:.1f}x; identical names: "
          f"{sum(a == b for a, b in zip(names, again, strict=True))} of {num}")
    worst = cache_differences(model, encode_rows(names, spec.vocab, 1 + max_length))
    largest = max(worst)
    print(f"cached vs full-forward logits over the {num} cached names, every position: max |diff| {largest:.1e} "
          f"(at position {worst.index(largest)}; per position " + " ".join(f"{w:.0e}" for w in worst) + ")")
    ok = largest <= LOGIT_TOLERANCE
    print(f"acceptance max |diff| <= {LOGIT_TOLERANCE:g}: {'ok' if ok else 'FAILED'}")
    return ok


# runs the command, then reports the process's own peak resident memory (VmHWM, which exec resets: a child's
# getrusage maxrss would start from the parent's size at the fork)
PEAK = ("import re, sys; from handprop.cli import main; status = main(sys.argv[1:]); sys.stdout.flush(); "
        "sys.stderr.write(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())[1]); sys.exit(status)")


def million(work_dir, threads):
    """(c): `handprop sample -n 1000000` in a subprocess: wall time and its peak resident memory."""
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PEAK, "sample", "-n", "1000000", "--seed", "1", "-o",
                             str(work_dir)], capture_output=True, env=env, check=True)
    seconds = time.perf_counter() - start
    print(f"\n(c) handprop sample -n 1000000: {len(result.stdout.splitlines())} lines in {seconds:.1f} s "
          f"(python and torch start-up included), peak resident memory {int(result.stderr) / 1024:.0f} MB")


def load_run(path, form):
    """The checkpoint saved in path, which must hold a model of form; a problem exits with one line."""
    try:
        checkpoint = load_checkpoint(Path(path) / LATEST)
    except UserError as e:
        sys.exit(f"sample.py: error: {e}")
    if checkpoint.spec.form is not form:
        sys.exit(f"sample.py: error: {path} holds a {checkpoint.spec.model_config.kind} model, not one of {form.name}")
    return checkpoint


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs="*", default=["transformer"], choices=SEQUENCE_KINDS,
                   help="sequence models for (b), each trained first (ignored with -o; none: skip (b))")
    p.add_argument("-o", "--work-dir", default=None, help="(b) samples the sequence-model run saved here")
    p.add_argument("--mlp-dir", default=None, help="(a) samples the window-model run saved here")
    p.add_argument("--mlp-steps", type=int, default=3000, help="steps to train the default mlp for (a)")
    p.add_argument("--train-steps", type=int, default=300, help="steps to train each model of (b) (default 300)")
    p.add_argument("--num", type=int, default=10_000, help="names sampled at once (default 10000)")
    p.add_argument("--loop-num", type=int, default=500, help="names the one-at-a-time loop samples per turn")
    p.add_argument("--repeats", type=int, default=3, help="turns each; the best one counts")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--million", action="store_true", help="(c) also time `handprop sample -n 1000000`")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch.set_num_threads({args.threads})")
    with tempfile.TemporaryDirectory() as scratch:
        mlp_dir = args.mlp_dir or Path(scratch) / "mlp"
        mlp = load_run(args.mlp_dir, WINDOWS) if args.mlp_dir else trained("mlp", args.mlp_steps, mlp_dir)
        window_bench(mlp, args.num, args.loop_num, args.repeats)
        if args.work_dir:
            checkpoints = [load_run(args.work_dir, SEQUENCES)]
        else:       # each trained when its turn comes
            checkpoints = (trained(name, args.train_steps, Path(scratch) / name) for name in args.model)
        ok = [cache_bench(checkpoint, args.num, args.repeats) for checkpoint in checkpoints]
        if args.million:
            million(mlp_dir, args.threads)
    sys.exit(0 if all(ok) else 1)


if __name__ == "__main__":
    main()
