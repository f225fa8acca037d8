"""The sequence layers (transformer, RNN, GRU, padded loss): the check catches their classic mistakes, forwards
equal their twins, incremental steps equal the full forward, and dropout replays from its generator."""

import copy

import pytest
import torch
import torch.nn.functional as F

from handprop import layers
from handprop.data import IGNORED
from handprop.errors import UserError
from handprop.gradcheck import CELL_TWINS, TWINS, LossLayer, compare, layer_cases, twin_forward
from handprop.layers import (
    GELU,
    BatchNorm1d,
    CausalSelfAttention,
    Dropout,
    Embedding,
    GRUCell,
    LayerNorm,
    Linear,
    Recurrent,
    Residual,
    RNNCell,
    Sequential,
    walk,
)
from handprop.losses import SequenceCrossEntropy
from handprop.models import build_model
from handprop.settings import preset

F64 = torch.float64


def find_case(label, seed=0):
    return next(c for c in layer_cases(seed) if c[0] == label)


def several_heads_case():
    return next(c for c in layer_cases(0) if c[0].startswith("CausalSelfAttention") and c[0].endswith(" heads"))


def as_mutant(obj, mutant_class, twins, monkeypatch):
    """A copy of obj whose class is mutant_class (a subclass with a wrong backward), checked against obj's twin."""
    monkeypatch.setitem(twins, mutant_class, twins[type(obj)])
    mutant = copy.deepcopy(obj)
    mutant.__class__ = mutant_class
    return mutant


def failing(rows):
    return {r.tensor for r in rows if not r.ok}


def randn(g, *shape, dtype=F64):
    return torch.randn(shape, generator=g, dtype=dtype)


# ---- the check catches the classic mistakes ----

class AttentionBackwardWithoutMask(CausalSelfAttention):
    def backward(self, dout):
        # the attention weights rebuilt for backward without the causal mask: every position sees the future
        self.probs = torch.softmax((self.q @ self.k.transpose(-2, -1)) * self.scale, dim=-1)
        return super().backward(dout)


def test_the_check_catches_an_attention_backward_without_the_causal_mask(monkeypatch):
    label, layer, x, dout = several_heads_case()
    assert all(r.ok for r in compare(label, layer, x, dout))
    rows = compare(label, as_mutant(layer, AttentionBackwardWithoutMask, TWINS, monkeypatch), x, dout)
    assert failing(rows) == {"dx", "dqkv.weight", "dqkv.bias"}     # backward reaches proj before the softmax


def test_the_check_catches_a_softmax_backward_without_its_row_sum_term(monkeypatch):
    label, layer, x, dout = several_heads_case()
    monkeypatch.setattr(layers, "softmax_backward", lambda probs, dprobs: probs * dprobs)   # the diagonal only
    rows = compare(label, layer, x, dout)
    assert failing(rows) == {"dx", "dqkv.weight", "dqkv.bias"}


class GRUCellDroppingDh(GRUCell):
    def next_hidden_backward(self, dh_next, cache):
        dx, dh, grads = super().next_hidden_backward(dh_next, cache)
        return dx, torch.zeros_like(dh), grads          # nothing carried back to the previous step


def test_the_check_catches_a_gru_backward_that_does_not_carry_dh_to_the_previous_step(monkeypatch):
    label, layer, x, dout = find_case("Recurrent(GRUCell)")
    mutant = copy.deepcopy(layer)
    mutant.cell = as_mutant(layer.cell, GRUCellDroppingDh, CELL_TWINS, monkeypatch)
    assert {"dx", "dh0", "dcell.weight_z", "dcell.weight_hbar"} <= failing(compare(label, mutant, x, dout))


class LayerNormMeanAsConstant(LayerNorm):
    def backward(self, dout):
        dims = tuple(range(dout.ndim - 1))
        self.grads = {"weight": (dout * self.xhat).sum(dims), "bias": dout.sum(dims)}
        dxhat = dout * self.weight
        return self.inv_std * (dxhat - self.xhat * (dxhat * self.xhat).mean(-1, keepdim=True))   # no -mean(dxhat)


@pytest.mark.parametrize("label", ["LayerNorm (B, C)", "LayerNorm (B, T, C)"])
def test_the_check_catches_a_layernorm_backward_that_treats_the_mean_as_a_constant(label, monkeypatch):
    label, layer, x, dout = find_case(label)
    rows = compare(label, as_mutant(layer, LayerNormMeanAsConstant, TWINS, monkeypatch), x, dout)
    assert failing(rows) == {"dx"}                      # the parameter gradients do not go through the mean


# ---- forwards, names and modes ----

@pytest.mark.parametrize("seed", range(2))
def test_every_forward_equals_its_twin_and_grads_are_named_like_parameters(seed):
    # gradients cannot see an output that is off by a constant; this can
    for label, layer, x, dout in layer_cases(seed):
        hand, twin = copy.deepcopy(layer), copy.deepcopy(layer)    # the same dropout draws in both
        out = hand.forward(x)
        torch.testing.assert_close(out, twin_forward(twin, x, twin.parameters()), rtol=0, atol=1e-12, msg=label)
        hand.backward(dout)
        assert list(hand.grads) == list(hand.parameters()), label


def transformer_block(g, width=8, n_head=2, p=0.1, masks=None):
    def linear(fan_in, fan_out):
        return Linear(randn(g, fan_in, fan_out) / fan_in**0.5, 0.1 * randn(g, fan_out))

    def layernorm():
        return LayerNorm(1 + 0.1 * randn(g, width), 0.1 * randn(g, width))

    masks = masks or torch.Generator().manual_seed(0)
    attend = Sequential([layernorm(), CausalSelfAttention(linear(width, 3 * width), linear(width, width), n_head),
                         Dropout(p, masks)])
    mlp = Sequential([layernorm(), linear(width, 4 * width), GELU(), linear(4 * width, width), Dropout(p, masks)])
    return Sequential([Residual(attend), Residual(mlp)])


def test_a_transformer_blocks_parameter_names_nest_flat_and_stable():
    block = transformer_block(torch.Generator().manual_seed(0))
    assert list(block.parameters()) == [
        "0.inner.0.weight", "0.inner.0.bias", "0.inner.1.qkv.weight", "0.inner.1.qkv.bias",
        "0.inner.1.proj.weight", "0.inner.1.proj.bias",
        "1.inner.0.weight", "1.inner.0.bias", "1.inner.1.weight", "1.inner.1.bias",
        "1.inner.3.weight", "1.inner.3.bias",
    ]
    assert block.parameters()["0.inner.1.qkv.weight"] is block.layers[0].inner.layers[1].qkv.weight
    gru = Recurrent(GRUCell(*[torch.zeros(5, 2), torch.zeros(2)] * 3), torch.zeros(2))
    assert list(gru.parameters()) == ["h0", "cell.weight_z", "cell.bias_z", "cell.weight_r", "cell.bias_r",
                                      "cell.weight_hbar", "cell.bias_hbar"]
    assert "CausalSelfAttention(8, 2 heads)" in repr(block) and "Dropout(p=0.1)" in repr(block)


def test_eval_reaches_the_dropout_inside_residual_blocks():
    g = torch.Generator().manual_seed(1)
    block, x = transformer_block(g, p=0.5), randn(g, 2, 5, 8)
    assert not torch.equal(block.forward(x), block.forward(x))         # fresh masks each training forward
    with layers.eval_mode(block):
        assert torch.equal(block.forward(x), block.forward(x))
    assert block.layers[1].inner.layers[-1].training


def test_attention_rejects_a_width_that_heads_do_not_divide():
    with pytest.raises(UserError, match="multiple of n_head"):
        CausalSelfAttention(Linear(torch.zeros(6, 18)), Linear(torch.zeros(6, 6)), 4)


def test_attention_is_causal_a_later_position_changes_no_earlier_output():
    g = torch.Generator().manual_seed(2)
    attn = transformer_block(g).layers[0].inner.layers[1]
    x = randn(g, 2, 6, 8)
    changed = x.clone()
    changed[:, 4] += 1.0
    before, after = attn.forward(x), attn.forward(changed)
    assert torch.equal(before[:, :4], after[:, :4]) and not torch.allclose(before[:, 4:], after[:, 4:])


# ---- incremental steps for sampling ----

@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (F64, 1e-12)])
@pytest.mark.parametrize("n_head", [1, 4])
def test_attention_step_with_a_kv_cache_equals_the_full_forward_at_every_prefix(dtype, tol, n_head):
    g = torch.Generator().manual_seed(n_head)
    C, T, B = 8, 9, 3
    attn = CausalSelfAttention(Linear(randn(g, C, 3 * C, dtype=dtype) / C**0.5, randn(g, 3 * C, dtype=dtype)),
                               Linear(randn(g, C, C, dtype=dtype) / C**0.5, randn(g, C, dtype=dtype)), n_head)
    x = randn(g, B, T, C, dtype=dtype)
    cache = attn.new_cache()
    for t in range(T):
        y_t = attn.step(x[:, t : t + 1], cache)                          # (B, 1, C)
        torch.testing.assert_close(y_t, attn.forward(x[:, : t + 1])[:, -1:], rtol=0, atol=tol)
        assert cache.t == t + 1 and cache.keys.shape == cache.values.shape     # t positions held, in buffers
        assert cache.keys.shape[:2] == (B, n_head) and cache.keys.shape[3] == C // n_head


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (F64, 1e-12)])
@pytest.mark.parametrize("kind", ["rnn", "gru"])
def test_recurrent_step_carries_the_hidden_state_like_the_full_forward(dtype, tol, kind):
    g = torch.Generator().manual_seed(3)
    C, H, T, B = 3, 5, 8, 4

    def gate():
        return randn(g, C + H, H, dtype=dtype) / (C + H) ** 0.5, randn(g, H, dtype=dtype)

    cell = RNNCell(*gate()) if kind == "rnn" else GRUCell(*gate(), *gate(), *gate())
    rnn, x = Recurrent(cell, randn(g, H, dtype=dtype)), randn(g, B, T, C, dtype=dtype)
    full, state = rnn.forward(x), rnn.new_cache()
    for t in range(T):
        torch.testing.assert_close(rnn.step(x[:, t : t + 1], state), full[:, t : t + 1], rtol=0, atol=tol)


# ---- dropout draws from its own generator ----

def test_dropout_zeroes_about_p_and_scales_the_rest_by_one_over_one_minus_p():
    x = randn(torch.Generator().manual_seed(8), 200, 500).abs() + 1.0   # no zeros of its own
    y = Dropout(0.25, torch.Generator().manual_seed(0)).forward(x)
    dropped = y == 0
    assert abs(dropped.double().mean().item() - 0.25) < 0.01           # 100000 draws: 7 standard deviations
    assert torch.equal(y[~dropped], x[~dropped] * (1 / 0.75))


def test_dropout_masks_replay_from_a_saved_generator_state_and_eval_draws_nothing():
    generator, x = torch.Generator().manual_seed(7), randn(torch.Generator().manual_seed(9), 4, 6, 8)
    layer = Dropout(0.5, generator)
    layer.forward(x)
    saved = generator.get_state()
    first = layer.forward(x)
    resumed = Dropout(0.5, torch.Generator())
    resumed.generator.set_state(saved)                                  # what resuming from a checkpoint does
    assert torch.equal(resumed.forward(x), first)
    layer.eval()
    before = generator.get_state()
    assert layer.forward(x) is x and layer.backward(x) is x
    assert torch.equal(generator.get_state(), before)
    assert Dropout(0.0, generator).forward(x) is x
    with pytest.raises(UserError, match="dropout"):
        Dropout(1.0, generator)


# ---- the sequence loss ignores padding ----

def padded_batch(g, B=4, T=6, V=7):
    logits, targets = 2 * randn(g, B, T, V), torch.randint(0, V, (B, T), generator=g)
    targets[0, 2:], targets[1, 5:] = IGNORED, IGNORED
    return logits, targets


def test_sequence_cross_entropy_equals_pytorch_and_padding_has_no_effect_and_no_gradient():
    logits, targets = padded_batch(torch.Generator().manual_seed(4))
    criterion = SequenceCrossEntropy()
    loss = criterion.forward(logits, targets)
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORED)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-15)
    dlogits = criterion.backward(0.7)
    padded = targets == IGNORED
    assert torch.equal(dlogits[padded], torch.zeros_like(dlogits[padded]))
    assert dlogits[~padded].abs().sum(-1).min() > 0
    torch.testing.assert_close(dlogits[~padded].sum(-1), torch.zeros((~padded).sum().item(), dtype=F64), atol=1e-16,
                               rtol=0)                                  # each counted row: softmax - onehot sums to 0
    moved = logits.clone()
    moved[padded] += 5.0
    assert torch.equal(SequenceCrossEntropy().forward(moved, targets), loss)


def test_a_bigram_table_read_as_logits_over_padded_sequences_gradchecks():
    # makemore's bigram: Embedding(V, V) gives each previous character's row of next-character logits
    g = torch.Generator().manual_seed(5)
    V, B, T = 27, 5, 6
    ix, targets = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    ix[:, 0] = 0                                                        # every item starts at the boundary: repeats
    targets[0, 1:], targets[3, 4:] = IGNORED, IGNORED
    bigram = Sequential([Embedding(randn(g, V, V)), LossLayer(targets, SequenceCrossEntropy())])
    rows = compare("bigram", bigram, ix, randn(g))
    assert [r.tensor for r in rows] == ["d0.weight"] and rows[0].ok, rows


def test_the_declared_seams_reach_every_nested_layer_and_change_nothing_until_used():
    model = build_model(preset("transformer", vocab_size=27, block_size=8, n_layers=2, dropout=0.5),
                        torch.Generator().manual_seed(0))
    dropouts = [layer for layer in walk(model) if isinstance(layer, Dropout)]
    assert len(dropouts) == 5 and all(d.rows is None and d.noise_source is None for d in dropouts)    # the defaults
    generator = torch.Generator().manual_seed(1)
    model.use_generator(generator)
    model.share_batch(slice(2, 4), 8, None)
    assert all(d.generator is generator and d.rows == (slice(2, 4), 8) for d in dropouts)
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2))
    drawn = []

    def keep_everything(layer, shape, dtype, device):
        drawn.append((layer, shape))
        return torch.ones(shape, dtype=dtype, device=device)

    model.take_noise_from(keep_everything)
    state = generator.get_state()
    assert torch.equal(dropouts[0].forward(x), x / 0.5)                     # nothing dropped: the source's noise
    assert drawn == [(dropouts[0], (8, 3, 4))] and torch.equal(generator.get_state(), state)    # the whole batch
    model.take_noise_from(None)
    dropouts[0].forward(x)                                                  # back to the layer's generator
    assert not torch.equal(generator.get_state(), state) and len(drawn) == 1
    mlp = build_model(preset("mlp", vocab_size=27), torch.Generator().manual_seed(0))
    norms = [layer for layer in walk(mlp) if isinstance(layer, BatchNorm1d)]
    assert norms and all(n.reduce is None for n in norms)
    mlp.share_batch(slice(0, 16), 32, torch.Tensor.neg_)
    assert all(n.reduce is torch.Tensor.neg_ for n in norms)
