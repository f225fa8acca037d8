"""Mixed precision (--dtype bf16): each bf16 layer's hand-written backward against an autograd twin doing the same casts

The tolerance. Under multiply_in(bf16) a layer's product casts both operands to bfloat16 (8 significant bits: unit
roundoff u = 2^-8) and the result back to float32. The twin (gradcheck) writes the same casts, so autograd's backward
performs the very same bf16 products (the backward of a cast is the reverse cast, of a @ b the two products with the
other operand transposed), and each agrees bit for bit with the hand-written one when its operands do. The operands
differ only through the float32 work between products (LayerNorm, softmax, GELU, the loss), which the two sides order
differently: a few dozen roundings of float32's u32 = 2^-24, so at most about 2^6 * 2^-24 = 2^-18 (4e-6) of a
gradient's largest entry (measured: at most 1.8e-6, over seeds 0 to 5). A product run in the wrong precision (a cast
missing, or one too many) is off by bf16's rounding instead, u = 2^-8 of its entries, which a sum over rows averages
down by about sqrt(rows): measured at least 1.7e-3 (2^-9) in the layer's worst gradient or output. BF16_TOL = 2^-16
lies 4x above the float32 bound (8x above what was measured) and 100x below that; the tests assert that the float32
twin, and each product with its cast dropped in turn, miss it by more than 16x.
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from cli_runner import run_main
from safetensors import safe_open
from test_checkpoints import VERSION_2

import handprop.layers as layers
from handprop.checkpoint import load_checkpoint
from handprop.compiled import CompiledStep
from handprop.data import IGNORED, SEQUENCES, Corpus, Vocab, build_sequences, form_named, load_corpus, make_splits
from handprop.gradcheck import autograd_gradients, hand_gradients, layer_cases, relative_maxdiff, twin_forward
from handprop.layers import CausalSelfAttention, Dropout, Linear, walk
from handprop.models import build_model
from handprop.optim import SGD, make_optimizer
from handprop.settings import preset, recipe
from handprop.step import EagerStep, clip_and_update, forward_backward

BF16_TOL = 2.0**-16         # max |hand - twin| / max |twin| per gradient (derived above)
BF16 = torch.bfloat16


def bf16_cases(seed):
    """gradcheck's cases in float32 that hold a matrix product (a Linear or an attention), set to multiply in bf16."""
    cases = [(label, layer, x, dout) for label, layer, x, dout in layer_cases(seed, torch.float32)
             if any(isinstance(part, (Linear, CausalSelfAttention)) for part in walk(layer))]
    for _, layer, _, _ in cases:
        layer.multiply_in(BF16)
    return cases


CASES = [(seed, label) for seed in range(3) for label, *_ in bf16_cases(seed)]


def case(seed, label):
    return next(c for c in bf16_cases(seed) if c[0] == label)


def worst(hand, reference):
    """The largest |hand - reference| over each gradient, relative to that gradient's largest entry."""
    return max(relative_maxdiff((hand[k] - g).abs().max().item(), g.abs().max().item()) for k, g in reference.items())


@pytest.mark.parametrize(("seed", "label"), CASES)
def test_each_bf16_backward_equals_its_bf16_autograd_twin(seed, label):
    _, layer, x, dout = case(seed, label)
    hand, twin = hand_gradients(layer, x, dout), autograd_gradients(layer, x, dout)
    assert hand.keys() == twin.keys()
    assert worst(hand, twin) <= BF16_TOL
    float32 = copy.deepcopy(layer)
    float32.multiply_in(None)               # the twin in float32: the gap bf16 really makes, far beyond the tolerance
    assert worst(hand, autograd_gradients(float32, x, dout)) > 16 * BF16_TOL


@pytest.mark.parametrize("label", ["Linear (B, C)", "Linear no bias (B, T, C)", "CausalSelfAttention 1 head",
                                   "CausalSelfAttention 3 heads"])
def test_every_product_that_skips_its_cast_is_caught(label, monkeypatch):
    # each of the layer's products in turn (forward and backward) multiplied in float32: the comparison must fail
    _, layer, x, dout = case(0, label)
    twin = {"out": twin_forward(layer, x, layer.parameters())} | autograd_gradients(layer, x, dout)
    calls, dropped, exact = [], [], layers.product

    def product(a, b, dtype=None, bias=None):
        calls.append(dtype)
        return exact(a, b, None if len(calls) - 1 in dropped else dtype, bias)

    def by_hand():                          # the output, then the gradients (a forward again, and the backward)
        calls.clear()
        out = copy.deepcopy(layer).forward(x)
        forward_products = len(calls)
        calls.clear()
        return {"out": out} | hand_gradients(layer, x, dout), forward_products

    monkeypatch.setattr(layers, "product", product)
    hand, forward_products = by_hand()
    assert worst(hand, twin) <= BF16_TOL and all(dtype is BF16 for dtype in calls)
    assert (forward_products, len(calls)) == ((1, 3) if label.startswith("Linear") else (4, 12))
    for i in range(len(calls)):             # i < forward_products: a forward product, dropped in both forwards
        dropped[:] = [i]
        assert worst(by_hand()[0], twin) > 16 * BF16_TOL, f"product {i} multiplied in float32"


def test_evaluation_mode_multiplies_in_float32():
    # multiply_in acts in training only: evaluation and sampling use the master weights in their own dtype
    _, layer, x, _ = case(0, "Sequential (GPT block)")
    float32 = copy.deepcopy(layer)
    float32.multiply_in(None)
    with layers.eval_mode(layer), layers.eval_mode(float32):
        assert torch.equal(layer.forward(x), float32.forward(x))
    assert not torch.equal(layer.forward(x), float32.forward(x))


# ---- a whole transformer: steps by hand in bf16 against its bf16 twin; the compiled bf16 step against the eager ----
#
# In a whole model hand and twin agree to bf16's precision only, not float32's: the float32 work both sides do in
# their own order (LayerNorm, GELU, the loss; Inductor's fused loops) differs by a few u32 ahead of a cast, which
# then rounds a few entries of the tens of thousands to the neighbouring bf16 value (2u apart), and every later cast
# spreads that. Measured on a 2-block transformer: up to 6.3e-3 (1.6u) of a gradient's largest entry (this test's
# three steps; 5.2e-3 over seeds 0 to 3, with and without dropout). STEP_TOL = 4u = 2^-6 proves the bf16 step's
# composition (a wrong formula or a missing piece is off by O(1)); each cast is proven by the layer tests above.
STEP_TOL = 2.0**-6


def transformer(seed=0, **overrides):
    """A float32 transformer multiplying in bf16, every parameter moved off its init; (model, its mask generator)."""
    g = torch.Generator().manual_seed(seed)
    model = build_model(preset("transformer", **({"vocab_size": 27, "block_size": 16} | overrides)), g)
    for p in model.parameters().values():   # no zero bias, no unit LayerNorm gain: a wrong step cannot hide
        p += 0.2 * torch.randn(p.shape, generator=g)
    model.multiply_in(BF16)
    return model, g


def test_bf16_transformer_steps_by_hand_equal_its_bf16_twin():
    settings = recipe("transformer")        # lr, weight decay, clipping
    model, masks = transformer(n_layers=2)
    X, Y = build_sequences(load_corpus().items[:200], Vocab.from_items(load_corpus().items), 16)
    optimizer = make_optimizer("adamw", model.parameters(), settings.weight_decay)
    for rows in torch.arange(48).view(3, 16):       # three steps on batches of 16 names, padding in each
        params = {k: v.detach().clone().requires_grad_(True) for k, v in model.parameters().items()}
        state = masks.get_state()
        with torch.enable_grad():
            logits = twin_forward(model, X[rows], params)                        # (B, T, V)
            loss = F.cross_entropy(logits.reshape(-1, 27), Y[rows].reshape(-1), ignore_index=IGNORED)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), settings.grad_clip)
        masks.set_state(state)              # the hand-written forward draws the twin's dropout masks
        before = {k: v.clone() for k, v in model.parameters().items()}
        hand_loss = forward_backward(model, SEQUENCES.criterion(), X[rows], Y[rows])
        clip_and_update(model, optimizer, settings.grad_clip, optimizer.next_numbers(settings.lr))
        assert hand_loss.item() == pytest.approx(loss.item(), rel=STEP_TOL)
        assert worst(model.grads, {k: p.grad for k, p in params.items()}) <= STEP_TOL     # clipped, both
        assert all(not torch.equal(before[k], p) for k, p in model.parameters().items())
    assert any((layer.mask == 0).any() for layer in walk(model) if isinstance(layer, Dropout))


def test_the_compiled_bf16_step_equals_the_eager_bf16_step():
    # SGD moves each parameter by lr * its gradient, so the two runs' parameters differ by lr * their gradients'
    # difference: within STEP_TOL of how far the steps moved them
    names = ["ava", "emma", "mia", "zoe", "liam", "noah", "ella", "leo", "ivy", "max", "eva", "kai", "amy", "ben"]
    splits = make_splits(Corpus(names * 20, 0, "0" * 64, "<test names>"), None, form=form_named("sequences"))
    examples, settings = splits.tensors["train"], recipe("transformer")
    runs = [transformer(n_layers=1, vocab_size=splits.vocab.size, block_size=examples.width)[0] for _ in range(2)]
    before = {k: v.clone() for k, v in runs[0].parameters().items()}
    criterion, g, lr = examples.form.criterion(), torch.Generator().manual_seed(1), 0.5
    eager = EagerStep(runs[0], SGD(runs[0].parameters()), criterion, examples, settings.grad_clip)
    compiled = CompiledStep(runs[1], SGD(runs[1].parameters()), criterion, examples, settings.batch_size,
                            settings.grad_clip)
    for _ in range(3):
        rows = examples.draw(settings.batch_size, g)
        assert compiled(rows, lr)[0] == pytest.approx(eager(rows, lr)[0], rel=STEP_TOL)
    for k, p in runs[1].parameters().items():
        moved = (runs[0].parameters()[k] - before[k]).abs().max()
        assert moved > 0 and (p - runs[0].parameters()[k]).abs().max() <= STEP_TOL * moved, k


# ---- the command line ----

def test_bf16_trains_the_transformer_resumes_and_is_refused_elsewhere(tmp_path, capsys):
    flags = ["--model", "transformer", "--n-layers", "1", "--dtype", "bf16", "--compile", "off", "--max-steps", "4"]
    code, out, _ = run_main(["train", "-o", tmp_path / "run", *flags], capsys)
    assert code == 0 and "matrix products in bf16" in out
    assert '"dtype": "bf16"' in (tmp_path / "run" / "config.json").read_text()
    code, out, _ = run_main(["train", "-o", tmp_path / "run", "--resume", "--max-steps", "6"], capsys)
    assert code == 0 and "resuming at step 4" in out and "matrix products in bf16" in out
    code, _, err = run_main(["train", "-o", tmp_path / "run", "--resume", "--max-steps", "8", "--dtype", "float32"],
                            capsys)
    assert code == 2 and err.count("\n") == 1 and "dtype" in err
    code, _, err = run_main(["train", "-o", tmp_path / "mlp", "--dtype", "bf16", "--max-steps", "4"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--dtype is for the transformer only" in err
    assert not (tmp_path / "mlp").exists()


def test_a_checkpoint_from_before_the_setting_loads_as_float32():
    with safe_open(str(VERSION_2), framework="pt") as f:                 # written before --dtype existed
        assert "dtype" not in json.loads(f.metadata()["handprop"])["train_config"]
    assert load_checkpoint(VERSION_2).spec.train_config.dtype == "float32"
