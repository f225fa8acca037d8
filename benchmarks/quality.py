"""Training quality: the hand-written run against the same run trained by autograd, same run of this script.

Both start from the same initialisation and see the same batches and learning rates; the
baseline gets its gradients from loss.backward() through the autograd twins. Afterwards both
get the same BatchNorm recalibration and are evaluated on the full splits. Prints each
loss and the ratio hand/autograd (1.0000 means the hand-written gradients train exactly as
well; float32 rounding makes the two runs drift apart slowly, not systematically).

    python benchmarks/quality.py [--steps 200000] [--model mlp]
"""

import argparse
import time

import torch
import torch.nn.functional as F

from handprop.data import load_corpus, make_splits, sample_batch
from handprop.gradcheck import twin_forward
from handprop.losses import CrossEntropy
from handprop.models import build_model, preset
from handprop.optim import SGD, lecture_lr
from handprop.train import evaluate, recalibrate_batchnorm


def train_by_hand(model, X, Y, steps, seed):
    g, optimizer, criterion = torch.Generator().manual_seed(seed), SGD(model.parameters()), CrossEntropy()
    with torch.inference_mode():
        for step in range(steps):
            Xb, Yb = sample_batch(X, Y, 32, g)
            criterion.forward(model.forward(Xb), Yb)
            model.backward(criterion.backward())
            optimizer.step(model.grads, lecture_lr(step, steps, 0.1))


def train_by_autograd(model, X, Y, steps, seed):
    g = torch.Generator().manual_seed(seed)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.parameters().items()}
    for step in range(steps):
        Xb, Yb = sample_batch(X, Y, 32, g)
        loss = F.cross_entropy(twin_forward(model, Xb, params), Yb)
        for p in params.values():
            p.grad = None
        loss.backward()
        with torch.no_grad():
            for p in params.values():
                p -= lecture_lr(step, steps, 0.1) * p.grad
    with torch.no_grad():                   # hand the trained values back to the model for evaluation
        for k, p in model.parameters().items():
            p.copy_(params[k])
    # the twins never update running statistics; recalibration below sets them for both runs alike


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200_000)
    p.add_argument("--model", default="mlp")
    args = p.parse_args()
    splits = make_splits(load_corpus(), preset(args.model).block_size)
    config = preset(args.model, vocab_size=splits.vocab.size)
    X, Y = splits.tensors["train"]
    results = {}
    for name, fn in (("hand-written", train_by_hand), ("autograd", train_by_autograd)):
        model = build_model(config, torch.Generator().manual_seed(2147483647))
        start = time.perf_counter()
        fn(model, X, Y, args.steps, seed=1)
        with torch.inference_mode():
            recalibrate_batchnorm(model, X)
            results[name] = evaluate(model, splits)
        print(f"{name:12s} " + "  ".join(f"{k} {v:.4f}" for k, v in results[name].items())
              + f"  ({time.perf_counter() - start:.0f} s)")
    hand, auto = results["hand-written"], results["autograd"]
    print(f"model {args.model}, {args.steps} steps; ratio hand/autograd: "
          + "  ".join(f"{k} {hand[k] / auto[k]:.4f}" for k in hand))


if __name__ == "__main__":
    main()
