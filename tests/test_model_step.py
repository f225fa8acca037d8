"""A whole training step by hand equals the same step through autograd (float64)."""

import pytest
import torch
import torch.nn.functional as F

from handprop.gradcheck import twin_forward
from handprop.losses import CrossEntropy
from handprop.models import build_model, preset
from handprop.optim import SGD, AdamW


def model_and_batch(name, seed=0):
    config = preset(name, vocab_size=27)
    g = torch.Generator().manual_seed(seed)
    model = build_model(config, g, dtype=torch.float64)
    X = torch.randint(0, 27, (32, config.block_size), generator=g)
    Y = torch.randint(0, 27, (32,), generator=g)
    return model, X, Y


def autograd_step(model, X, Y, update):
    """Parameters after one step of the autograd twin: loss.backward(), then update(params)."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.parameters().items()}
    with torch.enable_grad():
        F.cross_entropy(twin_forward(model, X, params), Y).backward()
    with torch.no_grad():
        update(params)
    return {k: v.detach() for k, v in params.items()}


def hand_step(model, X, Y, optimizer, lr):
    criterion = CrossEntropy()
    criterion.forward(model.forward(X), Y)
    model.backward(criterion.backward())
    optimizer.step(model.grads, lr)
    return model.parameters()


@pytest.mark.parametrize("name", ["mlp", "deep", "wavenet"])
def test_one_sgd_step_by_hand_equals_one_autograd_step(name):
    model, X, Y = model_and_batch(name)

    def sgd(params):
        for p in params.values():
            p -= 0.1 * p.grad

    expected = autograd_step(model, X, Y, sgd)
    before = {k: v.clone() for k, v in model.parameters().items()}
    after = hand_step(model, X, Y, SGD(model.parameters()), lr=0.1)
    for k in expected:
        assert k.endswith("bias") or not torch.equal(before[k], after[k]), k   # every weight moved
        assert (after[k] - expected[k]).abs().max() <= 1e-10, k


def test_adamw_steps_by_hand_equal_torch_adamw():
    model, X, Y = model_and_batch("mlp", seed=1)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.parameters().items()}
    reference = torch.optim.AdamW(params.values(), lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    optimizer = AdamW(model.parameters(), weight_decay=0.1)
    for _ in range(3):
        reference.zero_grad()
        with torch.enable_grad():
            F.cross_entropy(twin_forward(model, X, params), Y).backward()
        reference.step()
        hand_step(model, X, Y, optimizer, lr=0.01)
    for k, p in model.parameters().items():
        assert (p - params[k].detach()).abs().max() <= 1e-10, k
