"""Training speed: handprop's hand-written step, compiled and eager, against the autograd step; same model, same run.

All train the same model (as `handprop train --model NAME` builds it, in training mode, so a
transformer's dropout is on) on the same batches with the model's recipe (models.RECIPES):
batch size, learning rate per step, clipping and optimiser.
- compiled: the step `handprop train` takes for a long run (compiled.CompiledStep: the batch's
  gather, forward, backward, clipping and update traced into one graph and compiled by Inductor);
  compiled once per turn, outside the timing.
- eager: the same hand-written step op by op (`handprop train --compile off`: step.EagerStep).
- autograd, the baseline: the lectures' loop, Xb, Yb = X[ix], Y[ix] from the whole split's
  example tensors, loss.backward() through the autograd twins (gradcheck.twin_forward), then the
  same clipping and update code as handprop; always in float32, as in the lectures.
With --dtype bf16 (the transformer only) the two hand-written steps multiply in bf16, as
`handprop train --dtype bf16` does (Layer.multiply_in); the autograd baseline stays float32.
The three take turns, `--repeats` times, so a noisy spell on a shared machine hits all alike, and
each keeps its best turn. Prints steps/s of each and the ratios to autograd (>1: handprop is faster).

    python benchmarks/speed.py [--model mlp] [--steps N] [--repeats 5] [--threads 2]
    python benchmarks/speed.py --all [--threads 2]      # one Markdown table row per model
    python benchmarks/speed.py --model transformer --dtype bf16 [--threads 2]   # mixed precision by hand
"""

import argparse
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from handprop.compiled import CompiledStep
from handprop.data import IGNORED, load_corpus
from handprop.gradcheck import twin_forward
from handprop.models import count_parameters, describe
from handprop.optim import clip_grad_norm, make_optimizer
from handprop.settings import PRESETS, preset, recipe
from handprop.step import EagerStep, schedule_for
from handprop.train import PRODUCTS_IN, new_run, prepare

TABLE = ("mlp", "wavenet", "mlp-fast", "bigram", "rnn", "gru", "transformer")  # the README's table of models
DEFAULT_STEPS = {"mlp": 3000, "mlp-part3": 3000, "deep": 1000, "wavenet": 1000, "mlp-fast": 200, "bigram": 3000,
                 "rnn": 500, "gru": 200, "transformer": 100}  # a few seconds a turn on one core, either contender


def turn(step):
    """steps(batches, schedule): the run's step (step.py's call) on each batch of rows, the loss read every step."""

    def steps(batches, schedule):
        with torch.inference_mode():
            for i, ix in enumerate(batches):
                step(ix, schedule(i))
    return steps


def compiled(run, examples, config):
    """The compiled step's turn: compiling first (untimed), then steps(batches, schedule)."""
    run.model.multiply_in(PRODUCTS_IN[config.dtype])
    with torch.inference_mode():
        return turn(CompiledStep(run.model, run.optimizer, examples.form.criterion(), examples, config.batch_size,
                                 config.grad_clip))


def eager(run, examples, config):
    """The same step op by op (step.EagerStep, what train.run_steps takes with --compile off)."""
    run.model.multiply_in(PRODUCTS_IN[config.dtype])
    return turn(EagerStep(run.model, run.optimizer, examples.form.criterion(), examples, config.grad_clip))


def autograd(run, examples, config):
    """The lectures' loop: X[ix] from the whole split, loss.backward() through the twins; handprop's update."""
    X, Y = examples                         # every row at once, gathered before the timing
    params = {k: v.detach().clone().requires_grad_(True) for k, v in run.model.parameters().items()}
    optimizer = make_optimizer(config.optimizer, params, config.weight_decay)

    def steps(batches, schedule):
        for i, ix in enumerate(batches):
            logits = twin_forward(run.model, X[ix], params)     # the twin's Dropout draws from the run's generator
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y[ix].reshape(-1), ignore_index=IGNORED)
            for p in params.values():
                p.grad = None
            loss.backward()
            loss.item()
            with torch.no_grad():
                grads = {k: p.grad for k, p in params.items()}
                if config.grad_clip:
                    clip_grad_norm(grads, config.grad_clip)
                optimizer.step(grads, schedule(i))
    return steps


def best_rates(contenders, run_factory, batches, schedule, repeats):
    """Steps/s of each contender, best of repeats, taking turns so a noisy spell hits all alike."""
    rates = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, setup in contenders.items():
            steps = setup(run_factory())    # a fresh model, optimiser and generator, built (and compiled) untimed
            start = time.perf_counter()
            steps(batches, schedule)
            rates[name].append(len(batches) / (time.perf_counter() - start))
    return {name: max(r) for name, r in rates.items()}  # the least disturbed turn of each


def measure(corpus, name, steps, repeats, dtype="float32"):
    """({contender: steps/s}, the run) for one model; dtype: the hand-written steps' matrix products."""
    config = replace(recipe(name), max_steps=steps, dtype=dtype)
    if config.schedule == "cosine" and config.warmup >= steps:     # a short run keeps a tenth of it for warmup
        config = replace(config, warmup=steps // 10)
    splits, run = prepare(corpus, preset(name), config, None)
    examples = splits.tensors["train"]
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(examples), (config.batch_size,), generator=g) for _ in range(steps)]
    schedule = schedule_for(config)
    contenders = {"compiled": compiled, "eager": eager, "autograd": autograd}
    rows = {"compiled": examples, "eager": examples, "autograd": tuple(examples)}
    setups = {k: (lambda run, k=k, fn=fn: fn(run, rows[k], config)) for k, fn in contenders.items()}
    return best_rates(setups, lambda: new_run(run.spec), batches, schedule, repeats), run


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp", choices=list(PRESETS))
    p.add_argument("--all", action="store_true", help=f"every model of the README's table: {', '.join(TABLE)}")
    p.add_argument("--steps", type=int, default=None, help="steps per turn (default: a few seconds' worth per model)")
    p.add_argument("--repeats", type=int, default=5, help="turns each; the best one counts")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads: the 2 cores of the acceptance")
    p.add_argument("--dtype", default="float32", choices=list(PRODUCTS_IN),
                   help="the hand-written steps' matrix products (bf16: the transformer only); autograd stays float32")
    args = p.parse_args()
    if args.dtype != "float32" and (args.all or args.model != "transformer"):
        p.error("--dtype bf16 is for --model transformer only, as in handprop train")
    torch.set_num_threads(args.threads)
    corpus = load_corpus()
    if args.all:
        print(f"{torch.get_num_threads()} threads, best of {args.repeats} turns each, the recipe's batch and optimiser")
        print("| model | steps per turn | compiled steps/s | eager steps/s | autograd steps/s | compiled / autograd "
              "| eager / autograd |")
        print("|---|---|---|---|---|---|---|")
    for name in TABLE if args.all else [args.model]:
        steps = args.steps or DEFAULT_STEPS[name]
        rates, run = measure(corpus, name, steps, args.repeats, args.dtype)
        compiled_rate, auto = rates["compiled"], rates["autograd"]
        if args.all:
            print(f"| `{name}` | {steps} | {compiled_rate:.0f} | {rates['eager']:.0f} | {auto:.0f} | "
                  f"**{compiled_rate / auto:.2f}x** | {rates['eager'] / auto:.2f}x |")
            continue
        config = run.spec.train_config
        print(f"model {name}: {describe(run.spec.model_config)}, {count_parameters(run.model)} parameters")
        print(f"batch {config.batch_size}, {config.optimizer}" + (f", clip {config.grad_clip:g}" if config.grad_clip
              else "") + f"; {steps} steps x {args.repeats} turns, {torch.get_num_threads()} threads; hand-written "
              f"steps' products in {args.dtype}, autograd's in float32")
        for contender, rate in rates.items():
            print(f"{contender + ':':10s}{rate:8.0f} steps/s" + (f"   {rate / auto:.2f}x autograd"
                                                                  if contender != "autograd" else ""))


if __name__ == "__main__":
    main()
