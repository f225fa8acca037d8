"""Training quality: the hand-written run against the same run trained by autograd, same run of this script.

Both runs are set up as `handprop train --model NAME` sets one up (train.prepare): the same
initialisation, and one generator, seeded alike, that draws the batches and the dropout masks.
They train with the model's recipe (models.RECIPES): the same learning rate at every step
(the lectures' step decay, or warmup then cosine), the same clipping of the global gradient
norm and AdamW's weight decay on matrices only. The hand-written run is train.run_steps
without its saving and logging: the package's step (step.EagerStep), forward, backward and
optimiser by hand. The baseline
gets its gradients from loss.backward() through the autograd twins (gradcheck.twin_forward)
and steps with torch.optim (SGD or AdamW, parameter groups as nanoGPT makes them) after
torch.nn.utils.clip_grad_norm_. Afterwards both get the same BatchNorm recalibration (when
the model has BatchNorm) and are evaluated on the full splits.

Dropout masks: the twin's Dropout calls the layer's own draw_mask on the layer's generator,
which is the baseline run's batch generator, as in the hand-written run (both through the
form's noise source, so a batch padded to its own longest item draws what a full one draws). Both runs therefore
draw batch, masks, batch, masks, ... from identical generators in the same order and the
same shapes, so every mask is the same; the script checks that both generators end in the
same state. (Precomputed masks would need a second code path through the model.)

Prints each loss, the differences hand - autograd and their ratios; float32 rounding makes
the two runs drift apart slowly, not systematically. Exit status 1 when the final val losses
differ by more than 0.005.

    python benchmarks/quality.py [--model mlp] [--steps N (default: the recipe's)] [--seed N] [--float64]
                                 [--threads 1]

--float64 trains both runs in float64 (init drawn in float64 from the same seed): rounding then
no longer tells the two apart, so what remains is any difference in the gradients themselves.
"""

import argparse
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from handprop.data import IGNORED, load_corpus
from handprop.evaluation import evaluate, recalibrate_batchnorm
from handprop.gradcheck import twin_forward
from handprop.layers import BatchNorm1d
from handprop.models import build_model, count_parameters, describe
from handprop.optim import SGD, make_optimizer
from handprop.settings import PRESETS, preset, recipe
from handprop.step import EagerStep, schedule_for
from handprop.train import Run, new_run, prepare

VAL_TOLERANCE = 0.005       # acceptance: |final val loss by hand - by autograd|


def train_by_hand(run, splits, config):
    """train.run_steps without saving and logging: the package's eager step, with train.run_steps' schedule."""
    examples, schedule = splits.tensors["train"], schedule_for(config)
    step = EagerStep(run.model, run.optimizer, examples.form.criterion(), examples, config.grad_clip)
    with torch.inference_mode():
        for n in range(config.max_steps):
            step(examples.draw(config.batch_size, run.generator), schedule(n))


def autograd_loss(logits, targets):
    """Mean cross-entropy over every scored position: windows (B, V) with (B,), sequences (B, T, V) with (B, T)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORED)


def torch_optimizer(params, run, config):
    """torch.optim's twin of the run's optimiser: SGD, or AdamW decaying only matrices (nanoGPT's two groups)."""
    if isinstance(run.optimizer, SGD):
        return torch.optim.SGD(params.values(), lr=config.lr)
    groups = [{"params": [p for p in params.values() if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params.values() if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=run.optimizer.betas, eps=run.optimizer.eps)


def train_by_autograd(run, splits, config):
    """The same steps with loss.backward() through the twins, torch's clipping and torch.optim."""
    examples, schedule = splits.tensors["train"], schedule_for(config)
    run.model.take_noise_from(examples.form.noise_source(examples))    # the masks the hand-written run draws
    params = {k: v.detach().clone().requires_grad_(True) for k, v in run.model.parameters().items()}
    optimizer = torch_optimizer(params, run, config)
    for step in range(config.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = schedule(step)
        Xb, Yb = examples.sample(config.batch_size, run.generator)
        loss = autograd_loss(twin_forward(run.model, Xb, params), Yb)   # the twin's Dropout draws from run.generator
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params.values(), config.grad_clip)
        optimizer.step()
    with torch.no_grad():                   # hand the trained values back to the model for evaluation
        for k, p in run.model.parameters().items():
            p.copy_(params[k])
    # the twins never update running statistics; recalibration sets them for both runs alike


def run_config(name, steps, seed=None):
    """The model's recipe for steps steps; a warmup longer than a short run shrinks to a tenth of it."""
    config = recipe(name)
    config = replace(config, max_steps=steps or config.max_steps, seed=config.seed if seed is None else seed)
    if config.schedule == "cosine" and config.warmup >= config.max_steps:
        config = replace(config, warmup=config.max_steps // 10)
    return config


def float64_run(spec):
    """new_run(spec) with the model built in float64: its init drawn from the same seeded generator."""
    generator = torch.Generator().manual_seed(spec.train_config.seed)
    model = build_model(spec.model_config, generator, dtype=torch.float64)
    return Run(spec, model, make_optimizer(spec.train_config.optimizer, model.parameters(),
                                          spec.train_config.weight_decay), generator)


def describe_schedule(config):
    """One line: optimiser, learning rate and schedule, clipping, weight decay."""
    if config.schedule == "step":
        lr = f"lr {config.lr:g}, then {config.lr / 10:g} from step {max(1, int(config.lr_decay_at * config.max_steps))}"
    else:
        lr = f"lr {config.lr:g}, warmup {config.warmup}, cosine to {config.min_lr:g}"
    clip = f", clip {config.grad_clip:g}" if config.grad_clip else ""
    decay = f", weight decay {config.weight_decay:g} on matrices" if config.weight_decay else ""
    return f"{config.optimizer}, {lr}{clip}{decay}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp", choices=list(PRESETS))
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (default: the recipe's max_steps)")
    p.add_argument("--seed", type=int, default=None, help="the run's seed (default: the recipe's)")
    p.add_argument("--float64", action="store_true", help="both runs in float64 instead of float32")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = run_config(args.model, args.steps, args.seed)
    splits, hand_run = prepare(load_corpus(), preset(args.model), config, None)
    if args.float64:
        hand_run = float64_run(hand_run.spec)
    auto_run = (float64_run if args.float64 else new_run)(hand_run.spec)    # a second, identical start
    print(f"model {args.model}: {describe(hand_run.spec.model_config)}, {count_parameters(hand_run.model)} parameters")
    print(f"{config.max_steps} steps of batch {config.batch_size}, {describe_schedule(config)}, seed {config.seed}; "
          f"{'float64' if args.float64 else 'float32'}, {torch.get_num_threads()} threads")
    results = {}
    for name, run, fn in (("hand-written", hand_run, train_by_hand), ("autograd", auto_run, train_by_autograd)):
        start = time.perf_counter()
        fn(run, splits, config)
        trained = time.perf_counter()
        with torch.inference_mode():
            if any(isinstance(layer, BatchNorm1d) for layer in run.model.layers):   # as train.finish
                recalibrate_batchnorm(run.model, splits.tensors["train"])
            results[name] = evaluate(run.model, splits)
        print(f"{name:12s} " + "  ".join(f"{k} {v:.4f}" for k, v in results[name].items())
              + f"  (training {trained - start:.0f} s, evaluation {time.perf_counter() - trained:.0f} s)")
    same_draws = torch.equal(hand_run.generator.get_state(), auto_run.generator.get_state())
    print("batches and dropout masks: " + ("the same draws (both generators end in the same state)" if same_draws
                                             else "DIFFERENT draws (the generators end in different states)"))
    hand, auto = results["hand-written"], results["autograd"]
    print("difference hand - autograd: " + "  ".join(f"{k} {hand[k] - auto[k]:+.1e}" for k in hand))
    print("ratio hand/autograd:        " + "  ".join(f"{k} {hand[k] / auto[k]:.4f}" for k in hand))
    ok = abs(hand["val"] - auto["val"]) <= VAL_TOLERANCE and same_draws
    print(f"acceptance |val difference| <= {VAL_TOLERANCE}: {'ok' if ok else 'FAILED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
