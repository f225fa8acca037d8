"""Proof of the hand-written gradients: autograd twins and float64 finite differences.

Every layer's twin computes the same forward with ordinary PyTorch ops (torch.nn.functional
where PyTorch has the op) so autograd can differentiate it. This module, and the tests and
the `check` command built on it, are the only places handprop uses autograd.
"""

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import IGNORED
from .layers import (
    GELU,
    BatchNorm1d,
    CausalSelfAttention,
    Dropout,
    Embedding,
    FlattenConsecutive,
    GRUCell,
    Layer,
    LayerNorm,
    Linear,
    LookupLinear,
    Recurrent,
    Residual,
    RNNCell,
    Sequential,
    Tanh,
    TokenPositionEmbedding,
)
from .losses import CrossEntropy, SequenceCrossEntropy

AUTOGRAD_TOL = 1e-12        # max |hand - autograd| relative to max |autograd|, in float64
FD_TOL = 1e-7               # ||hand - numerical|| / (||hand|| + ||numerical||), in float64
FD_STEP = 1e-6              # centred difference step


def relative_maxdiff(maxdiff, scale):
    """maxdiff as a fraction of scale, the reference's largest |entry| (0/0 counts as 0, x/0 as inf)."""
    if scale:
        return maxdiff / scale
    return 0.0 if maxdiff == 0 else math.inf


# ---- autograd twins: the same forward as each layer, written with differentiable ops ----

def embedding_twin(layer, ix, p):
    return F.embedding(ix, p["weight"])                         # (B, T, E)


def mixed_product(a, b, dtype):
    """a @ b as a layer multiplies under multiply_in(dtype): operands cast to dtype, the product cast back."""
    return (a.to(dtype) @ b.to(dtype)).to(a.dtype)


def linear_twin(layer, x, p):
    dtype = layer.products_in()
    if dtype is None:
        return F.linear(x, p["weight"].T, p.get("bias"))        # (..., fan_out)
    out = mixed_product(x, p["weight"], dtype)                  # (..., fan_out), the bias added in x's dtype
    return out if p.get("bias") is None else out + p["bias"]


def lookup_linear_twin(layer, ix, p):
    x = F.embedding(ix, p["embedding"]).flatten(1)             # (B, T * C): the plain layers' way
    return F.linear(x, p["weight"].T, p.get("bias"))            # (B, H)


def batchnorm_twin(layer, x, p):
    channels_first = x.transpose(1, -1) if x.ndim == 3 else x   # F.batch_norm wants (B, C) or (B, C, T)
    if not layer.training:
        out = F.batch_norm(channels_first, layer.running_mean, layer.running_var, p["weight"], p["bias"], False, 0.0,
                           layer.eps)
    elif not layer.bessel:
        out = F.batch_norm(channels_first, None, None, p["weight"], p["bias"], True, 0.0, layer.eps)
    else:  # PyTorch has no Bessel-normalising batch norm; write it from torch.var
        dims = tuple(range(x.ndim - 1))
        mean, var = x.mean(dims, keepdim=True), x.var(dims, keepdim=True, correction=1)
        return p["weight"] * (x - mean) / torch.sqrt(var + layer.eps) + p["bias"]
    return out.transpose(1, -1) if x.ndim == 3 else out


def tanh_twin(layer, x, p):
    return torch.tanh(x)


def flatten_consecutive_twin(layer, x, p):
    # position j of the output concatenates input positions j*n .. j*n+n-1 along channels
    out = torch.cat([x[:, k :: layer.n, :] for k in range(layer.n)], dim=2)  # (B, T/n, C*n)
    return out[:, 0, :] if out.shape[1] == 1 else out


def layernorm_twin(layer, x, p):
    return F.layer_norm(x, x.shape[-1:], p["weight"], p["bias"], layer.eps)


def gelu_twin(layer, x, p):
    return F.gelu(x, approximate="tanh")


def dropout_twin(layer, x, p):
    # F.dropout cannot be given a generator: multiply by the mask the layer draws, from the same generator state
    return x * layer.draw_mask(x) if layer.training and layer.p > 0 else x


def part_params(p, prefix, part):
    """A composite's twin parameters for one of its parts, under the part's own names."""
    return {name: p[f"{prefix}.{name}"] for name in part.parameters()}


def residual_twin(layer, x, p):
    return x + twin_forward(layer.inner, x, part_params(p, "inner", layer.inner))


def token_position_twin(layer, ix, p):
    layer.layout.packed = None      # as the layer's forward on a (B, T) batch: its dropout draws the grid's masks
    positions = torch.arange(ix.shape[1], device=ix.device)              # (T,)
    return F.embedding(ix, p["wte"]) + F.embedding(positions, p["wpe"])  # (B, T, C)


def attention_twin(layer, x, p):
    B, T, C = x.shape
    qkv = linear_twin(layer.qkv, x, part_params(p, "qkv", layer.qkv))   # (B, T, 3C)
    q, k, v = (t.reshape(B, T, layer.n_head, C // layer.n_head).transpose(1, 2) for t in qkv.split(C, dim=2))
    dtype = layer.products_in()
    if dtype is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)     # (B, nh, T, hs), scaled by 1/sqrt(hs)
    else:   # both products cast as the layer casts them (SDPA would multiply in a fused kernel of its own)
        scores = mixed_product(q, k.transpose(-2, -1), dtype) * q.shape[-1] ** -0.5    # (B, nh, T, T)
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        y = mixed_product(torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1), v, dtype)
    return linear_twin(layer.proj, y.transpose(1, 2).reshape(B, T, C), part_params(p, "proj", layer.proj))


def rnn_cell_twin(cell, x, h, p):
    # PyTorch's own RNN cell, tanh(x W_ih^T + b_ih + h W_hh^T), with makemore's W split into its x and h rows
    C = x.shape[1]
    return torch.rnn_tanh_cell(x, h, p["weight"][:C].T, p["weight"][C:].T, p["bias"])


def gru_cell_twin(cell, x, h, p):
    # makemore's GRUCell.forward (PyTorch's GRU cell resets h after its matmul, so its op is a different cell)
    xh = torch.cat([x, h], dim=1)
    r = torch.sigmoid(F.linear(xh, p["weight_r"].T, p["bias_r"]))
    hbar = torch.tanh(F.linear(torch.cat([x, r * h], dim=1), p["weight_hbar"].T, p["bias_hbar"]))
    z = torch.sigmoid(F.linear(xh, p["weight_z"].T, p["bias_z"]))
    return (1 - z) * h + z * hbar


CELL_TWINS = {RNNCell: rnn_cell_twin, GRUCell: gru_cell_twin}


def recurrent_twin(layer, x, p):
    h, cell_params, hiddens = p["h0"].expand(x.shape[0], -1), part_params(p, "cell", layer.cell), []
    for t in range(x.shape[1]):
        h = CELL_TWINS[type(layer.cell)](layer.cell, x[:, t], h, cell_params)   # (B, H)
        hiddens.append(h)
    return torch.stack(hiddens, dim=1)                                  # (B, T, H)


class LossLayer(Layer):
    """A criterion with fixed targets, seen through the layer contract (logits in, loss out)."""

    def __init__(self, targets, criterion=None):
        self.targets, self.criterion = targets, criterion or CrossEntropy()

    def forward(self, logits):
        return self.criterion.forward(logits, self.targets)

    def backward(self, dloss):
        return self.criterion.backward(dloss)

    def describe(self):
        return type(self.criterion).__name__


def loss_twin(layer, logits, p):
    if isinstance(layer.criterion, SequenceCrossEntropy):
        flat_logits, flat_targets = logits.reshape(-1, logits.shape[-1]), layer.targets.reshape(-1)
        return F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORED)    # scalar
    return F.cross_entropy(logits, layer.targets)                       # scalar


def sequential_twin(layer, x, p):
    for i, inner in enumerate(layer.layers):
        x = twin_forward(inner, x, part_params(p, str(i), inner))
    return x


TWINS = {
    Embedding: embedding_twin, Linear: linear_twin, LookupLinear: lookup_linear_twin, BatchNorm1d: batchnorm_twin,
    Tanh: tanh_twin, FlattenConsecutive: flatten_consecutive_twin, Sequential: sequential_twin, LossLayer: loss_twin,
    LayerNorm: layernorm_twin, GELU: gelu_twin, Dropout: dropout_twin, Residual: residual_twin,
    TokenPositionEmbedding: token_position_twin, CausalSelfAttention: attention_twin, Recurrent: recurrent_twin,
}


def twin_forward(layer, x, params):
    """The layer's forward by differentiable ops, with params standing in for its parameters."""
    return TWINS[type(layer)](layer, x, params)


def generators(layer):
    """Every torch.Generator that layer and the layers inside it draw from (Dropout's masks)."""
    own = [layer.generator] if isinstance(layer, Dropout) else []
    return own + [g for child in layer.children() for g in generators(child)]


# ---- the three gradient computations ----

def hand_gradients(layer, x, dout):
    """{'x': dL/dx, param name: dL/dparam} from the layer's own backward, L = sum(forward(x) * dout)."""
    layer = copy.deepcopy(layer)            # forward may update running statistics
    layer.forward(x)
    dx = layer.backward(dout)
    return ({"x": dx} if dx is not None else {}) | dict(layer.grads)


def autograd_gradients(layer, x, dout):
    """The same gradients from autograd through the layer's twin."""
    layer = copy.deepcopy(layer)            # the twin draws the same dropout masks from a copy of the generators
    with torch.enable_grad():
        params = {k: v.detach().clone().requires_grad_(True) for k, v in layer.parameters().items()}
        x = x.detach().clone().requires_grad_(x.is_floating_point())
        (twin_forward(layer, x, params) * dout).sum().backward()
    return ({"x": x.grad} if x.requires_grad else {}) | {k: v.grad for k, v in params.items()}


def numerical_gradients(layer, x, dout, step=FD_STEP):
    """The same gradients by centred finite differences of L, one element at a time."""
    layer = copy.deepcopy(layer)
    x = x.clone()
    tensors = ({"x": x} if x.is_floating_point() else {}) | layer.parameters()
    replay = [(generator, generator.get_state()) for generator in generators(layer)]

    def loss():
        for generator, state in replay:
            generator.set_state(state)      # every evaluation draws the same dropout masks
        return (layer.forward(x) * dout).sum().item()

    grads = {}
    for name, t in tensors.items():
        flat, g = t.view(-1), torch.zeros(t.numel(), dtype=t.dtype)
        for i in range(t.numel()):
            original = flat[i].item()
            flat[i] = original + step
            up = loss()
            flat[i] = original - step
            down = loss()
            flat[i] = original
            g[i] = (up - down) / (2 * step)
        grads[name] = g.view(t.shape)
    return grads


@dataclass
class GradRow:
    layer: str              # which case, e.g. 'BatchNorm1d bessel (B, C)'
    tensor: str             # 'dx', 'dweight', ...
    autograd_maxdiff: float # max |hand - autograd|
    scale: float            # max |autograd|, what maxdiff is measured against
    fd_relerr: float        # ||hand - fd|| / (||hand|| + ||fd||)
    ok: bool


def compare(label, layer, x, dout):
    """One GradRow per gradient of layer at input x and upstream gradient dout."""
    hand, ref = hand_gradients(layer, x, dout), autograd_gradients(layer, x, dout)
    num = numerical_gradients(layer, x, dout)
    rows = []
    for name in ref:
        if hand.get(name) is None or hand[name].shape != ref[name].shape:
            rows.append(GradRow(label, f"d{name}", float("inf"), 0.0, float("inf"), False))
            continue
        maxdiff = (hand[name] - ref[name]).abs().max().item()
        scale = ref[name].abs().max().item()
        relerr = ((hand[name] - num[name]).norm() / max((hand[name].norm() + num[name].norm()).item(), 1e-300)).item()
        ok = relative_maxdiff(maxdiff, scale) <= AUTOGRAD_TOL and relerr <= FD_TOL
        rows.append(GradRow(label, f"d{name}", maxdiff, scale, relerr, ok))
    return rows


class Draws:
    """Random sizes, tensors and cases, all from one seeded generator."""

    def __init__(self, seed, dtype):
        self.generator, self.dtype = torch.Generator().manual_seed(seed), dtype

    def randn(self, *shape):
        return torch.randn(shape, generator=self.generator, dtype=self.dtype)

    def size(self, low, high):
        return int(torch.randint(low, high + 1, (1,), generator=self.generator))

    def indices(self, high, *shape):
        return torch.randint(0, high, shape, generator=self.generator)

    def case(self, label, layer, x):
        """(label, layer, x, a random upstream gradient shaped like the layer's output)."""
        out = copy.deepcopy(layer).forward(x)
        return label, layer, x, self.randn(*out.shape)


def layer_cases(seed=0, dtype=torch.float64):
    """(label, layer, input, upstream gradient) for every layer kind, the losses and whole models.

    Shapes, parameters and upstream gradients are random (never ones, never zeros), so a
    backward that is right only for trivial values fails here.
    """
    draw = Draws(seed, dtype)
    return lecture_cases(draw) + sequence_cases(draw)


def lecture_cases(draw):
    """Cases for the lectures' layers, the window cross-entropy and a small WaveNet."""
    randn, size, case = draw.randn, draw.size, draw.case
    B, T, C, V = size(5, 9), 4, size(3, 6), size(5, 9)

    def batchnorm(bessel, training=True):
        bn = BatchNorm1d(1 + 0.5 * randn(C), randn(C), bessel=bessel)
        bn.running_mean, bn.running_var = randn(C), 0.5 + randn(C).abs()
        return bn.train(training)

    ix = draw.indices(V, B, T)                                  # B*T > V: indices repeat
    # no bias in front of BatchNorm: its true gradient is exactly 0, which no relative error can judge
    tiny_model = Sequential([
        Embedding(randn(V, 3)), FlattenConsecutive(2), Linear(randn(6, C)), batchnorm(True), Tanh(),
        FlattenConsecutive(2), Linear(randn(2 * C, V), randn(V)),
    ])
    return [
        case("Embedding", Embedding(randn(V, C)), ix),
        case("Linear (B, C)", Linear(randn(C, V), randn(V)), randn(B, C)),
        case("Linear no bias (B, T, C)", Linear(randn(C, V)), randn(B, T, C)),
        case("LookupLinear", LookupLinear(randn(V, 3), randn(T * 3, C), randn(C)), ix),
        case("LookupLinear no bias", LookupLinear(randn(V, 3), randn(T * 3, C)), ix),
        case("BatchNorm1d bessel (B, C)", batchnorm(True), randn(B, C)),
        case("BatchNorm1d biased (B, C)", batchnorm(False), randn(B, C)),
        case("BatchNorm1d bessel (B, T, C)", batchnorm(True), randn(B, T, C)),
        case("BatchNorm1d biased (B, T, C)", batchnorm(False), randn(B, T, C)),
        case("BatchNorm1d eval (B, C)", batchnorm(True, training=False), randn(B, C)),
        case("Tanh", Tanh(), randn(B, C)),
        case("FlattenConsecutive(2)", FlattenConsecutive(2), randn(B, T, C)),
        case("FlattenConsecutive(T)", FlattenConsecutive(T), randn(B, T, C)),
        case("CrossEntropy", LossLayer(draw.indices(V, B)), 2 * randn(B, V)),
        case("Sequential (small wavenet)", tiny_model, ix),
    ]


def sequence_cases(draw):
    """Cases for the sequence models' layers (transformer, RNN, GRU), the padded loss and small whole models.

    The whole models are narrow (width 4: 2 heads of 2) so finite differences over every parameter stay fast.
    """
    randn, size, case = draw.randn, draw.size, draw.case
    B, T, V = size(2, 3), size(3, 4), size(3, 5)               # B*T > V: indices repeat
    n_head, head_size = size(2, 3), size(1, 2)
    C = n_head * head_size                                      # attention width
    L = size(3, 5)                                              # LayerNorm width (over 2 its gradient is ~0)
    E, H = size(2, 3), size(2, 4)                               # recurrent input and state
    masks = torch.Generator().manual_seed(size(0, 2**30))      # one generator for every Dropout, as in a run

    def linear(fan_in, fan_out):    # weights at an init's scale keep softmax and tanh away from saturation
        return Linear(randn(fan_in, fan_out) / fan_in**0.5, 0.5 * randn(fan_out))

    def layernorm(width=L):
        return LayerNorm(1 + 0.5 * randn(width), 0.5 * randn(width))

    def attention(heads, width=C):
        return CausalSelfAttention(linear(width, 3 * width), linear(width, width), heads)

    def gate():                     # unsaturated gates and a unit h0 keep the reset gate's gradient (via r * h) large
        return randn(E + H, H) / (E + H) ** 0.5, 0.5 * randn(H)

    def gru():
        return Recurrent(GRUCell(*gate(), *gate(), *gate()), randn(H))

    def padded_targets():           # each row counts its first 1..T positions; row 0 only one, so padding occurs
        lengths = draw.indices(T, B) + 1
        lengths[0] = 1
        return draw.indices(V, B, T).masked_fill(torch.arange(T) >= lengths[:, None], IGNORED)

    def block(width=4):             # a pre-LayerNorm transformer block (GPT-2) with dropout; MLP width+1 wide
        hidden = width + 1
        attend = Sequential([layernorm(width), attention(2, width), Dropout(0.3, masks)])
        mlp = Sequential([layernorm(width), linear(width, hidden), GELU(), linear(hidden, width), Dropout(0.3, masks)])
        return Sequential([Residual(attend), Residual(mlp)])

    ix = draw.indices(V, B, T)
    tiny_gpt = Sequential([TokenPositionEmbedding(randn(V, 4), randn(T + 1, 4)), block(), layernorm(4), linear(4, V),
                           LossLayer(padded_targets(), SequenceCrossEntropy())])
    # logits out, no mean loss: its 1/count-sized gradients would sink the reset gate's below finite differences' reach
    tiny_gru = Sequential([Embedding(randn(V, E)), gru(), linear(H, V)])
    bigram = Sequential([Embedding(randn(V, V)), LossLayer(padded_targets(), SequenceCrossEntropy())])
    return [
        case("LayerNorm (B, C)", layernorm(), randn(B, L)),
        case("LayerNorm (B, T, C)", layernorm(), randn(B, T, L)),
        case("GELU", GELU(), 2 * randn(B, T, L)),
        case("Dropout train", Dropout(0.3, masks), randn(B, T, 8)),
        case("Dropout eval", Dropout(0.3, masks).eval(), randn(B, T, 8)),
        case("Residual (LN, Linear, GELU)", Residual(Sequential([layernorm(), linear(L, L), GELU()])), randn(B, T, L)),
        case("TokenPositionEmbedding", TokenPositionEmbedding(randn(V, C), randn(T + 1, C)), ix),
        case("CausalSelfAttention 1 head", attention(1), randn(B, T, C)),
        case(f"CausalSelfAttention {n_head} heads", attention(n_head), randn(B, T, C)),
        case("CausalSelfAttention T=1", attention(n_head), randn(B, 1, C)),
        case("Recurrent(RNNCell)", Recurrent(RNNCell(*gate()), randn(H)), randn(B, T, E)),
        case("Recurrent(GRUCell)", gru(), randn(B, T, E)),
        case("Recurrent(GRUCell) T=1", gru(), randn(B, 1, E)),
        case("CrossEntropy (B, T, V) pad", LossLayer(padded_targets(), SequenceCrossEntropy()), 2 * randn(B, T, V)),
        case("Sequential (bigram + loss)", bigram, ix),
        case("Sequential (GPT block)", block(), randn(B, T, 4)),
        case("Sequential (tiny GPT + loss)", tiny_gpt, ix),
        case("Sequential (tiny GRU)", tiny_gru, ix),
    ]


def check_layers(seed=0):
    """GradRows for every case of layer_cases(seed): the float64 proof of every backward."""
    return [row for label, layer, x, dout in layer_cases(seed) for row in compare(label, layer, x, dout)]
