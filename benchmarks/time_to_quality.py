"""Time to quality: seconds of training until the fast recipe reaches val 2.10 and 2.00, by hand and by autograd.

The recipe is `handprop train --model mlp-fast` (settings.PRESETS and RECIPES): a wider MLP
over 8 characters of context with AdamW, batch 512, warmup and cosine decay. Every run starts
from the same init and draws the same batches. The hand-written runs are train.run_steps' step
(forward, backward, update, all by hand, autograd off): eager as `--compile off` trains ("hand"),
compiled as `--compile on` trains ("compiled"), and whichever of the two `--compile auto` trains
with ("auto": train.chosen_step's race at these threads where the run is long enough to compile,
10,000 steps or more, else op by op); compiling and the race are not on the clock, and are printed.
The baseline computes the same model's gradients with loss.backward() through the autograd twins
(gradcheck.twin_forward) and updates with torch.optim.AdamW, as a plain PyTorch script would.
The clock runs only while training: every `--eval-every` steps it stops, the full val split is
scored, and the first time each target is reached is recorded. They take turns (`--repeats` turns each, the best time to
each target counts), so a noisy spell hits all alike. Prints, per target, seconds and steps
for each, how many times sooner each hand-written run gets there than autograd, and auto's time as a
ratio to the eager step's (the acceptance: at least 1 within noise, never slower than op by op).

    python benchmarks/time_to_quality.py [--threads 2] [--repeats 2] [--eval-every 100]
    python benchmarks/time_to_quality.py --threads 2 --max-steps 10000 --only auto hand    # auto compiles and races
"""

import argparse
import time
from dataclasses import replace

import torch

from handprop.compiled import compile_obstacle, compile_wanted
from handprop.data import load_corpus
from handprop.evaluation import split_loss
from handprop.gradcheck import twin_forward
from handprop.models import count_parameters, describe
from handprop.settings import PRESETS, preset, recipe
from handprop.step import EagerStep, schedule_for
from handprop.train import chosen_step, new_compiled_step, new_run, prepare

TARGETS = (2.10, 2.00)      # val losses; acceptance: within 5 s and 30 s of training by hand


def trainer(run, examples, step):
    """lr -> None: the run's step (step.py's call) on a batch drawn as train.run_steps draws it."""
    batch_size = run.spec.train_config.batch_size

    def take(lr):
        with torch.inference_mode():
            step(examples.draw(batch_size, run.generator), lr)
    return take


def hand_trainer(run, examples):
    """train.run_steps' step by hand, op by op (step.EagerStep, as --compile off trains)."""
    config = run.spec.train_config
    return trainer(run, examples, EagerStep(run.model, run.optimizer, examples.form.criterion(), examples,
                                            config.grad_clip))


def compiled_trainer(run, examples):
    """The same step compiled (compiled.CompiledStep, as --compile on trains); compiling is not clocked."""
    with torch.inference_mode():
        compiled = new_compiled_step(run, examples)
    print(f"  (compiled in {compiled.seconds:.1f} s, not counted)", flush=True)
    return trainer(run, examples, compiled)


def auto_trainer(run, examples):
    """The step --compile auto trains with (train.chosen_step's race, on these threads), compiled and raced unclocked;
    op by op where the run is too short to compile."""
    config = run.spec.train_config
    if not compile_wanted(config, compile_obstacle(config, 1, False)):
        print(f"  (auto: {config.max_steps} steps are too few to compile: op by op)", flush=True)
        return hand_trainer(run, examples)
    with torch.inference_mode():
        compiled = new_compiled_step(run, examples)
        step = chosen_step(run, examples, compiled, lambda line: print(f"  ({line}; not counted)", flush=True))
    return trainer(run, examples, step)


def autograd_trainer(run, examples):
    """The same step with loss.backward() through the twins and torch.optim.AdamW (nanoGPT's two groups)."""
    config = run.spec.train_config
    params = {k: v.detach().clone().requires_grad_(True) for k, v in run.model.parameters().items()}
    groups = [{"params": [p for p in params.values() if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params.values() if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=run.optimizer.betas, eps=run.optimizer.eps)

    def step(lr):
        for group in optimizer.param_groups:
            group["lr"] = lr
        Xb, Yb = examples.sample(config.batch_size, run.generator)
        loss = torch.nn.functional.cross_entropy(twin_forward(run.model, Xb, params), Yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync():                             # hand the trained values to the model, to be evaluated
        with torch.no_grad():
            for k, p in run.model.parameters().items():
                p.copy_(params[k])
    step.sync = sync
    return step


def time_to_targets(make_step, run, splits, eval_every):
    """{target: (seconds of training, steps)} for each target reached, and the last val loss."""
    config = run.spec.train_config
    schedule = schedule_for(config)
    step = make_step(run, splits.tensors["train"])
    reached, clock, val = {}, 0.0, float("nan")
    for n in range(config.max_steps):
        start = time.perf_counter()
        step(schedule(n))
        clock += time.perf_counter() - start
        if (n + 1) % eval_every == 0 or n + 1 == config.max_steps:     # the clock is stopped while scoring
            getattr(step, "sync", lambda: None)()
            with torch.inference_mode():
                val = split_loss(run.model, splits.tensors["val"])
            reached |= {t: (clock, n + 1) for t in TARGETS if val <= t and t not in reached}
            if len(reached) == len(TARGETS):
                break
    return reached, val


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp-fast", choices=list(PRESETS), help="the recipe (default mlp-fast)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2: the 2 cores)")
    p.add_argument("--repeats", type=int, default=2, help="turns each; the best time to each target counts")
    p.add_argument("--eval-every", type=int, default=100, help="steps between scorings of the val split")
    p.add_argument("--max-steps", type=int, default=None, help="override the recipe's steps")
    p.add_argument("--only", nargs="+", choices=("compiled", "auto", "hand", "autograd"), default=None,
                   help="run only these contenders")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = recipe(args.model)
    config = replace(config, max_steps=args.max_steps or config.max_steps)
    splits, first = prepare(load_corpus(), preset(args.model), config, None)
    print(f"model {args.model}: {describe(first.spec.model_config)}, {count_parameters(first.model)} parameters")
    print(f"batch {config.batch_size}, {config.optimizer} lr {config.lr:g}, warmup {config.warmup}, cosine over "
          f"{config.max_steps} steps; {torch.get_num_threads()} threads, best of {args.repeats} turns")
    contenders = {"compiled": compiled_trainer, "auto": auto_trainer, "hand": hand_trainer,
                  "autograd": autograd_trainer}
    if args.only:
        contenders = {name: make for name, make in contenders.items() if name in args.only}
    best = {name: {} for name in contenders}
    for turn in range(args.repeats):
        for name, make_step in contenders.items():
            reached, val = time_to_targets(make_step, new_run(first.spec), splits, args.eval_every)
            shown = ", ".join(f"val {t:.2f} at {s:.1f} s (step {n})" for t, (s, n) in reached.items())
            print(f"turn {turn + 1} {name:8}: {shown or 'no target reached'}; last val {val:.4f}", flush=True)
            for t, (s, n) in reached.items():
                if t not in best[name] or s < best[name][t][0]:
                    best[name][t] = (s, n)
    for t in TARGETS:
        cells = {name: (f"{best[name][t][0]:6.1f} s (step {best[name][t][1]})" if t in best[name] else "not reached")
                 for name in contenders}
        line = f"val <= {t:.2f}: " + " | ".join(f"{name} {cell}" for name, cell in cells.items())
        if "autograd" in contenders and t in best["autograd"]:
            line += "".join(f" | {name} {best['autograd'][t][0] / best[name][t][0]:.2f}x sooner"
                            for name in contenders if name != "autograd" and t in best[name])
        if {"auto", "hand"} <= contenders.keys() and t in best["auto"] and t in best["hand"]:
            line += f" | auto: **{best['hand'][t][0] / best['auto'][t][0]:.2f}x** op by op's speed (at least 1)"
        print(line)


if __name__ == "__main__":
    main()
