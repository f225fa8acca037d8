"""A whole training step by hand equals the same step through autograd (float64)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import sample_batch

from handprop.data import IGNORED, SEQUENCES, Vocab, build_sequences, load_corpus
from handprop.gradcheck import twin_forward
from handprop.layers import Dropout, walk
from handprop.losses import CrossEntropy
from handprop.models import build_model
from handprop.optim import SGD, AdamW, make_optimizer
from handprop.settings import preset, recipe
from handprop.step import clip_and_update, forward_backward


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
    """The training step's body (step.py) on the batch X, Y: forward, backward by hand, the update."""
    forward_backward(model, CrossEntropy(), X, Y)
    clip_and_update(model, optimizer, 0.0, optimizer.next_numbers(lr))
    return model.parameters()


@pytest.mark.parametrize("name", ["mlp", "deep", "wavenet", "mlp-fast"])
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


@pytest.mark.parametrize("name", ["mlp", "mlp-fast"])
def test_adamw_steps_by_hand_equal_torch_adamw(name):
    model, X, Y = model_and_batch(name, seed=1)
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


# ---- the sequence models: a few AdamW steps of the training loop, by hand and through autograd ----

SEQUENCE_MODELS = ["bigram", "rnn", "gru", "transformer"]


@pytest.fixture(scope="module")
def padded_items():
    """The first 1000 names as whole-item sequences, padded to 16 positions: X (N, 16), Y (N, 16) with -1 padding."""
    items = load_corpus().items[:1000]
    return build_sequences(items, Vocab.from_items(load_corpus().items), 16)


def sequence_model(name, seed=0):
    """The preset in float64 with every parameter moved off its init (no zero table or bias, no unit LayerNorm gain)."""
    g = torch.Generator().manual_seed(seed)             # the init's generator, and the model's dropout masks' too
    model = build_model(preset(name, vocab_size=27, block_size=16), g, dtype=torch.float64)
    for p in model.parameters().values():
        p += 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype)
    return model, g


def padded_batches(padded_items, steps, seed=1):
    """steps minibatches of 16 rows, drawn as training draws them; each has padding and scored positions."""
    X, Y = padded_items
    g = torch.Generator().manual_seed(seed)
    batches = [sample_batch(X, Y, 16, g) for _ in range(steps)]
    assert all((Yb == IGNORED).any() and (Yb != IGNORED).any() for _, Yb in batches)
    return batches


def torch_adamw(params, settings):
    """torch.optim.AdamW with handprop's betas and eps, decaying only the matrices (nanoGPT's two groups)."""
    groups = [{"params": [p for p in params.values() if p.ndim >= 2], "weight_decay": settings.weight_decay},
              {"params": [p for p in params.values() if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.99), eps=1e-8)


def sequence_steps(model, masks, batches, settings, replay_masks=True):
    """Both runs of the recipe's AdamW steps; returns (hand params, twin params, max grad diff / scale, grad norms).

    Before each step the twin runs first from the mask generator's state, which is then restored, so the
    hand-written forward draws the very same dropout masks.
    """
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.parameters().items()}
    reference = torch_adamw(params, settings)
    optimizer = make_optimizer("adamw", model.parameters(), settings.weight_decay)
    criterion, worst, norms = SEQUENCES.criterion(), 0.0, []
    for Xb, Yb in batches:
        state = masks.get_state()
        reference.zero_grad()
        with torch.enable_grad():
            logits = twin_forward(model, Xb, params)                            # (B, T, V)
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), Yb.reshape(-1), ignore_index=IGNORED).backward()
        if settings.grad_clip:
            norms.append(torch.nn.utils.clip_grad_norm_(params.values(), settings.grad_clip).item())
        reference.step()
        if replay_masks:
            masks.set_state(state)
        # the training step's body (step.py), every gradient by hand; the update leaves the clipped gradients
        forward_backward(model, criterion, Xb, Yb)
        clip_and_update(model, optimizer, settings.grad_clip, optimizer.next_numbers(settings.lr))
        for k, g in model.grads.items():
            worst = max(worst, ((g - params[k].grad).abs().max() / params[k].grad.abs().max()).item())
    return model.parameters(), {k: v.detach() for k, v in params.items()}, worst, norms


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_adamw_steps_of_a_sequence_model_by_hand_equal_autograd_and_torch_adamw(name, padded_items):
    # three steps on different batches: one Adam step moves each weight by about lr * sign(grad), blind to its size
    settings = recipe(name)                             # lr (the schedule's peak), weight decay, clipping
    model, masks = sequence_model(name)
    before = {k: v.clone() for k, v in model.parameters().items()}
    hand, twin, grad_diff, norms = sequence_steps(model, masks, padded_batches(padded_items, 3), settings)
    assert grad_diff <= 1e-12                           # every gradient, relative to its largest entry
    if settings.grad_clip:
        assert max(norms) > settings.grad_clip          # the clipping really scaled the gradients
    for k in twin:
        assert not torch.equal(before[k], hand[k]), k   # every parameter moved
        assert (hand[k] - twin[k]).abs().max() <= 1e-10, k
    dropouts = [layer for layer in walk(model) if isinstance(layer, Dropout)]
    assert (name == "transformer") == bool(dropouts)
    assert all(layer.p > 0 and (layer.mask == 0).any() for layer in dropouts)    # masks really dropped entries


def test_the_transformer_step_comparison_sees_the_dropout_masks(padded_items):
    # the twin drawing other masks than the hand-written forward must fail the comparison above by far
    model, masks = sequence_model("transformer")
    hand, twin, _, _ = sequence_steps(model, masks, padded_batches(padded_items, 1), recipe("transformer"),
                                      replay_masks=False)
    assert max((hand[k] - twin[k]).abs().max().item() for k in twin) > 1e-6
