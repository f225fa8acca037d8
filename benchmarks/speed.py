"""Training speed: handprop's hand-written step against the lecture's autograd step, same run.

Both train the same model (the default mlp, batch 32) on the same batches; the baseline
computes gradients with loss.backward() as the lecture notebooks do before exercise 4.
Prints steps/s of each and their ratio (>1 means handprop is faster).

    python benchmarks/speed.py [--steps 3000] [--model mlp] [--repeats 5]
"""

import argparse
import time

import torch
import torch.nn.functional as F

from handprop.data import load_corpus, make_splits
from handprop.gradcheck import twin_forward
from handprop.losses import CrossEntropy
from handprop.models import build_model, preset
from handprop.optim import SGD


def hand_steps(model, X, Y, batches):
    optimizer, criterion = SGD(model.parameters()), CrossEntropy()
    with torch.inference_mode():
        for ix in batches:
            criterion.forward(model.forward(X[ix]), Y[ix])
            model.backward(criterion.backward())
            optimizer.step(model.grads, 0.1)


def autograd_steps(model, X, Y, batches):
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.parameters().items()}
    for ix in batches:
        loss = F.cross_entropy(twin_forward(model, X[ix], params), Y[ix])
        for p in params.values():
            p.grad = None
        loss.backward()
        with torch.no_grad():
            for p in params.values():
                p -= 0.1 * p.grad


def best_rates(contenders, model_factory, X, Y, batches, repeats):
    """Steps/s of each contender, best of repeats, taking turns so a noisy spell hits both alike."""
    rates = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            model = model_factory()
            start = time.perf_counter()
            fn(model, X, Y, batches)
            rates[name].append(len(batches) / (time.perf_counter() - start))
    return {name: max(r) for name, r in rates.items()}  # the least disturbed run of each


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--model", default="mlp")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = preset(args.model)
    X, Y = make_splits(load_corpus(), config.block_size).tensors["train"]
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, X.shape[0], (32,), generator=g) for _ in range(args.steps)]  # the same for both
    factory = lambda: build_model(config, torch.Generator().manual_seed(1))
    rates = best_rates({"hand": hand_steps, "autograd": autograd_steps}, factory, X, Y, batches, args.repeats)
    hand, auto = rates["hand"], rates["autograd"]
    print(f"model {args.model}, batch 32, {args.steps} steps x {args.repeats}, {torch.get_num_threads()} threads")
    print(f"hand-written: {hand:8.0f} steps/s")
    print(f"autograd:     {auto:8.0f} steps/s")
    print(f"ratio hand/autograd: {hand / auto:.2f}")


if __name__ == "__main__":
    main()
