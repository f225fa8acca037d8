"""Proof of the hand-written gradients: autograd twins and float64 finite differences.

Every layer's twin computes the same forward with ordinary PyTorch ops (torch.nn.functional
where PyTorch has the op) so autograd can differentiate it. This module, and the tests and
the `check` command built on it, are the only places handprop uses autograd.
"""

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layers import BatchNorm1d, Embedding, FlattenConsecutive, Linear, Sequential, Tanh
from .losses import CrossEntropy

AUTOGRAD_TOL = 1e-12        # max |hand - autograd| relative to max |autograd|, in float64
FD_TOL = 1e-7               # ||hand - numerical|| / (||hand|| + ||numerical||), in float64
FD_STEP = 1e-6              # centred difference step


# ---- autograd twins: the same forward as each layer, written with differentiable ops ----

def embedding_twin(layer, ix, p):
    return F.embedding(ix, p["weight"])                         # (B, T, E)


def linear_twin(layer, x, p):
    return F.linear(x, p["weight"].T, p.get("bias"))            # (..., fan_out)


def batchnorm_twin(layer, x, p):
    channels_first = x.transpose(1, -1) if x.ndim == 3 else x   # F.batch_norm wants (B, C) or (B, C, T)
    if not layer.training:
        out = F.batch_norm(channels_first, layer.running_mean, layer.running_var, p["weight"], p["bias"], False, 0.0, layer.eps)
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


class LossLayer:
    """Cross-entropy with fixed targets, seen through the layer contract (logits in, loss out)."""

    def __init__(self, targets):
        self.targets, self.loss, self.grads = targets, CrossEntropy(), {}

    def forward(self, logits):
        return self.loss.forward(logits, self.targets)

    def backward(self, dloss):
        return self.loss.backward(dloss)

    def parameters(self):
        return {}


def loss_twin(layer, logits, p):
    return F.cross_entropy(logits, layer.targets)               # scalar


def sequential_twin(layer, x, p):
    for i, inner in enumerate(layer.layers):
        x = twin_forward(inner, x, {name: p[f"{i}.{name}"] for name in inner.parameters()})
    return x


TWINS = {
    Embedding: embedding_twin, Linear: linear_twin, BatchNorm1d: batchnorm_twin, Tanh: tanh_twin,
    FlattenConsecutive: flatten_consecutive_twin, Sequential: sequential_twin, LossLayer: loss_twin,
}


def twin_forward(layer, x, params):
    """The layer's forward by differentiable ops, with params standing in for its parameters."""
    return TWINS[type(layer)](layer, x, params)


# ---- the three gradient computations ----

def hand_gradients(layer, x, dout):
    """{'x': dL/dx, param name: dL/dparam} from the layer's own backward, L = sum(forward(x) * dout)."""
    layer = copy.deepcopy(layer)            # forward may update running statistics
    layer.forward(x)
    dx = layer.backward(dout)
    return ({"x": dx} if dx is not None else {}) | dict(layer.grads)


def autograd_gradients(layer, x, dout):
    """The same gradients from autograd through the layer's twin."""
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

    def loss():
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
    hand, ref, num = hand_gradients(layer, x, dout), autograd_gradients(layer, x, dout), numerical_gradients(layer, x, dout)
    rows = []
    for name in ref:
        if hand.get(name) is None or hand[name].shape != ref[name].shape:
            rows.append(GradRow(label, f"d{name}", float("inf"), 0.0, float("inf"), False))
            continue
        maxdiff = (hand[name] - ref[name]).abs().max().item()
        scale = ref[name].abs().max().item()
        relerr = ((hand[name] - num[name]).norm() / max((hand[name].norm() + num[name].norm()).item(), 1e-300)).item()
        ok = maxdiff <= AUTOGRAD_TOL * scale and relerr <= FD_TOL
        rows.append(GradRow(label, f"d{name}", maxdiff, scale, relerr, ok))
    return rows


def layer_cases(seed=0, dtype=torch.float64):
    """(label, layer, input, upstream gradient) for every layer kind, the loss and a whole model.

    Shapes, parameters and upstream gradients are random (never ones, never zeros), so a
    backward that is right only for trivial values fails here.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=g, dtype=dtype)

    def size(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=g))

    B, T, C, V = size(5, 9), 4, size(3, 6), size(5, 9)

    def batchnorm(bessel, training=True):
        bn = BatchNorm1d(1 + 0.5 * randn(C), randn(C), bessel=bessel)
        bn.running_mean, bn.running_var = randn(C), 0.5 + randn(C).abs()
        return bn.train(training)

    def case(label, layer, x):
        out = copy.deepcopy(layer).forward(x)
        return label, layer, x, randn(*out.shape)

    ix = torch.randint(0, V, (B, T), generator=g)              # B*T > V: indices repeat
    # no bias in front of BatchNorm: its true gradient is exactly 0, which no relative error can judge
    tiny_model = Sequential([
        Embedding(randn(V, 3)), FlattenConsecutive(2), Linear(randn(6, C)), batchnorm(True), Tanh(),
        FlattenConsecutive(2), Linear(randn(2 * C, V), randn(V)),
    ])
    return [
        case("Embedding", Embedding(randn(V, C)), ix),
        case("Linear (B, C)", Linear(randn(C, V), randn(V)), randn(B, C)),
        case("Linear no bias (B, T, C)", Linear(randn(C, V)), randn(B, T, C)),
        case("BatchNorm1d bessel (B, C)", batchnorm(True), randn(B, C)),
        case("BatchNorm1d biased (B, C)", batchnorm(False), randn(B, C)),
        case("BatchNorm1d bessel (B, T, C)", batchnorm(True), randn(B, T, C)),
        case("BatchNorm1d biased (B, T, C)", batchnorm(False), randn(B, T, C)),
        case("BatchNorm1d eval (B, C)", batchnorm(True, training=False), randn(B, C)),
        case("Tanh", Tanh(), randn(B, C)),
        case("FlattenConsecutive(2)", FlattenConsecutive(2), randn(B, T, C)),
        case("FlattenConsecutive(T)", FlattenConsecutive(T), randn(B, T, C)),
        case("CrossEntropy", LossLayer(torch.randint(0, V, (B,), generator=g)), 2 * randn(B, V)),
        case("Sequential (small wavenet)", tiny_model, ix),
    ]


def check_layers(seed=0):
    """GradRows for every case of layer_cases(seed): the float64 proof of every backward."""
    return [row for label, layer, x, dout in layer_cases(seed) for row in compare(label, layer, x, dout)]
