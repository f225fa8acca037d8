"""Training speed: handprop's hand-written step against the autograd step, same model, same run.

Both train the same model (as `handprop train --model NAME` builds it, in training mode, so a
transformer's dropout is on) on the same batches with the model's recipe (models.RECIPES):
batch size, learning rate per step, clipping and optimiser. The baseline computes the
gradients with loss.backward() through the autograd twins (gradcheck.twin_forward); both
then clip and update with the same handprop code (optim.clip_grad_norm and the recipe's
optimiser), so the ratio measures forward + backward, the part that differs. The two take
turns, `--repeats` times, so a noisy spell on a shared machine hits both alike, and each
keeps its best turn. Prints steps/s of each and their ratio (>1 means handprop is faster).

    python benchmarks/speed.py [--model mlp] [--steps N] [--repeats 5] [--threads 1]
    python benchmarks/speed.py --all [--threads 1]      # one Markdown table row per model
"""

import argparse
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from handprop.data import IGNORED, load_corpus
from handprop.gradcheck import twin_forward
from handprop.models import PRESETS, count_parameters, describe, preset, recipe
from handprop.optim import clip_grad_norm, make_optimizer, make_schedule
from handprop.train import loss_for, new_run, prepare

TABLE = ("mlp", "wavenet", "mlp-fast", "bigram", "rnn", "gru", "transformer")  # the README's table of models
DEFAULT_STEPS = {"mlp": 3000, "mlp-part3": 3000, "deep": 1000, "wavenet": 1000, "mlp-fast": 200, "bigram": 3000,
                 "rnn": 500, "gru": 200, "transformer": 100}  # a few seconds a turn on one core, either contender


def hand_steps(run, X, Y, batches, schedule):
    """train.run_steps' step: hand-written forward and backward, clipping, the recipe's optimiser."""
    config = run.spec.train_config
    criterion = loss_for(run.spec.model_config.form)
    with torch.inference_mode():
        for step, ix in enumerate(batches):
            criterion.forward(run.model.forward(X[ix]), Y[ix])
            run.model.backward(criterion.backward())
            if config.grad_clip:
                clip_grad_norm(run.model.grads, config.grad_clip)
            run.optimizer.step(run.model.grads, schedule(step))


def autograd_steps(run, X, Y, batches, schedule):
    """The same step with loss.backward() through the twins; the same clipping and optimiser code."""
    config = run.spec.train_config
    params = {k: v.detach().clone().requires_grad_(True) for k, v in run.model.parameters().items()}
    optimizer = make_optimizer(config.optimizer, params, config.weight_decay)
    for step, ix in enumerate(batches):
        logits = twin_forward(run.model, X[ix], params)     # the twin's Dropout draws from the run's generator
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y[ix].reshape(-1), ignore_index=IGNORED)
        for p in params.values():
            p.grad = None
        loss.backward()
        with torch.no_grad():
            grads = {k: p.grad for k, p in params.items()}
            if config.grad_clip:
                clip_grad_norm(grads, config.grad_clip)
            optimizer.step(grads, schedule(step))


def best_rates(contenders, run_factory, X, Y, batches, schedule, repeats):
    """Steps/s of each contender, best of repeats, taking turns so a noisy spell hits both alike."""
    rates = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            run = run_factory()             # a fresh model, optimiser and generator, built outside the timing
            start = time.perf_counter()
            fn(run, X, Y, batches, schedule)
            rates[name].append(len(batches) / (time.perf_counter() - start))
    return {name: max(r) for name, r in rates.items()}  # the least disturbed turn of each


def measure(corpus, name, steps, repeats):
    """(hand steps/s, autograd steps/s, the run's spec) for one model."""
    config = replace(recipe(name), max_steps=steps)
    if config.schedule == "cosine" and config.warmup >= steps:     # a short run keeps a tenth of it for warmup
        config = replace(config, warmup=steps // 10)
    splits, run = prepare(corpus, preset(name), config, None)
    X, Y = splits.tensors["train"]
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, X.shape[0], (config.batch_size,), generator=g) for _ in range(steps)]  # for both
    schedule = make_schedule(config.schedule, steps, config.lr, config.lr_decay_at, config.warmup, config.min_lr)
    rates = best_rates({"hand": hand_steps, "autograd": autograd_steps}, lambda: new_run(run.spec), X, Y, batches,
                       schedule, repeats)
    return rates["hand"], rates["autograd"], run


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp", choices=list(PRESETS))
    p.add_argument("--all", action="store_true", help=f"every model of the README's table: {', '.join(TABLE)}")
    p.add_argument("--steps", type=int, default=None, help="steps per turn (default: a few seconds' worth per model)")
    p.add_argument("--repeats", type=int, default=5, help="turns each; the best one counts")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = load_corpus()
    if args.all:
        print(f"{torch.get_num_threads()} threads, best of {args.repeats} turns each, the recipe's batch and optimiser")
        print("| model | steps per turn | hand-written steps/s | autograd steps/s | ratio |")
        print("|---|---|---|---|---|")
    for name in TABLE if args.all else [args.model]:
        steps = args.steps or DEFAULT_STEPS[name]
        hand, auto, run = measure(corpus, name, steps, args.repeats)
        if args.all:
            print(f"| `{name}` | {steps} | {hand:.0f} | {auto:.0f} | **{hand / auto:.2f}x** |")
            continue
        config = run.spec.train_config
        print(f"model {name}: {describe(run.spec.model_config)}, {count_parameters(run.model)} parameters")
        print(f"batch {config.batch_size}, {config.optimizer}" + (f", clip {config.grad_clip:g}" if config.grad_clip
              else "") + f"; {steps} steps x {args.repeats} turns, {torch.get_num_threads()} threads")
        print(f"hand-written: {hand:8.0f} steps/s")
        print(f"autograd:     {auto:8.0f} steps/s")
        print(f"ratio hand/autograd: {hand / auto:.2f}")


if __name__ == "__main__":
    main()
