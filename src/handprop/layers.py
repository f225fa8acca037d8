"""Layers with hand-written backward passes, one uniform contract.

    y  = layer.forward(x)      keeps on self only what backward needs
    dx = layer.backward(dy)    returns dL/dx and stores dL/dparam in layer.grads
    layer.parameters()         {name: tensor} in a stable order; layer.grads has the same keys

Every backward here is proven against an autograd twin and finite differences in
gradcheck.py. Nothing in this file calls autograd.
"""

from contextlib import contextmanager

import torch


class Layer:
    """The contract every layer keeps; a layer without parameters inherits the defaults."""

    training = True
    grads = {}  # replaced (never mutated) by backward in layers that have parameters

    def forward(self, x):
        """Compute the output, keeping on self only what backward needs."""
        raise NotImplementedError

    def backward(self, dout):
        """dL/d(input) from dL/d(output); dL/d(parameter) goes into self.grads."""
        raise NotImplementedError

    def parameters(self):
        """{name: tensor} in a stable order; self.grads has the same keys after backward."""
        return {}

    def buffers(self):
        """State that is not trained by gradients (BatchNorm's running statistics)."""
        return {}

    def children(self):
        """The layers inside this one (a composite's parts), in order."""
        return []

    def train(self, mode=True):
        """Training mode (True) or evaluation mode (False), for this layer and every layer inside it."""
        self.training = mode
        for child in self.children():
            child.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def __repr__(self):
        return f"{type(self).__name__}({self.describe()})"

    def describe(self):
        """The shapes and settings shown inside the parentheses of repr."""
        return ""


@contextmanager
def eval_mode(model):
    """Evaluation mode for the block (BatchNorm uses and keeps its running statistics), restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class Embedding(Layer):
    """A lookup table of one vector per token (Bengio et al. 2003)."""

    def __init__(self, weight):
        self.weight = weight                    # (V, E)
        self.grads = {}

    def forward(self, ix):
        self.ix = ix                            # (B, T) token indices
        return self.weight[ix]                  # (B, T, E)

    def backward(self, dout):
        # dW[v] = sum of dout rows whose index is v; index_add_ keeps repeated indices
        dweight = torch.zeros_like(self.weight)
        dweight.index_add_(0, self.ix.reshape(-1), dout.reshape(-1, self.weight.shape[1]))
        self.grads = {"weight": dweight}
        return None                             # indices have no gradient

    def parameters(self):
        return {"weight": self.weight}

    def describe(self):
        vocab, dim = self.weight.shape
        return f"{vocab}, {dim}"


class Linear(Layer):
    """y = x @ W + b over the last dimension."""

    def __init__(self, weight, bias=None):
        self.weight = weight                    # (fan_in, fan_out)
        self.bias = bias                        # (fan_out,) or None
        self.grads = {}

    def forward(self, x):
        self.x = x                              # (..., fan_in)
        out = x @ self.weight                   # (..., fan_out)
        return out + self.bias if self.bias is not None else out

    def backward(self, dout):
        # dW = x^T dout, db = sum of dout over every leading dimension, dx = dout W^T
        x2d = self.x.reshape(-1, self.weight.shape[0])          # (N, fan_in)
        dout2d = dout.reshape(-1, self.weight.shape[1])         # (N, fan_out)
        self.grads = {"weight": x2d.T @ dout2d}
        if self.bias is not None:
            self.grads["bias"] = dout2d.sum(0)
        return dout @ self.weight.T                             # (..., fan_in)

    def parameters(self):
        return {"weight": self.weight} if self.bias is None else {"weight": self.weight, "bias": self.bias}

    def describe(self):
        fan_in, fan_out = self.weight.shape
        return f"{fan_in} -> {fan_out}" + ("" if self.bias is not None else ", no bias")


class BatchNorm1d(Layer):
    """Batch normalisation (Ioffe & Szegedy 2015) over (B, C) or (B, T, C) inputs.

    bessel=True is the lecture's convention: the batch variance divides by n-1 both to
    normalise and for the running estimate. bessel=False is PyTorch's: divide by n to
    normalise, by n-1 for the running estimate. The backward matches whichever was used.
    """

    def __init__(self, weight, bias, eps=1e-5, momentum=0.001, bessel=True):
        self.eps, self.momentum, self.bessel = eps, momentum, bessel
        self.weight = weight                    # (C,) gamma
        self.bias = bias                        # (C,) beta
        self.running_mean = torch.zeros_like(weight)
        self.running_var = torch.ones_like(weight)
        self.grads = {}

    def forward(self, x):
        dims = tuple(range(x.ndim - 1))         # every dimension but the channels
        if self.training:
            n = float(x.numel() // x.shape[-1])
            mean = x.mean(dims, keepdim=True)                           # (1, C) or (1, 1, C)
            centred = x - mean
            sum_sq = (centred * centred).sum(dims, keepdim=True)
            var = sum_sq / (n - 1.0) if self.bessel else sum_sq / n
            self.running_mean.lerp_(mean.reshape(-1), self.momentum)    # (1-m)*running + m*batch
            self.running_var.lerp_(sum_sq.reshape(-1) / (n - 1.0), self.momentum)  # always unbiased
        else:
            centred = x - self.running_mean
            var = self.running_var
        self.inv_std = (var + self.eps) ** -0.5
        self.xhat = centred * self.inv_std      # same shape as x
        return self.weight * self.xhat + self.bias

    def backward(self, dout):
        dims = tuple(range(dout.ndim - 1))
        dweight, dbias = (dout * self.xhat).sum(dims), dout.sum(dims)     # (C,), (C,)
        self.grads = {"weight": dweight, "bias": dbias}
        if not self.training:                   # running stats are constants
            return dout * (self.weight * self.inv_std)
        n = float(dout.numel() // dout.shape[-1])
        c = n / (n - 1) if self.bessel else 1.0
        # the lecture's exercise 3: dx = gamma*inv_std/n * (n*dout - sum(dout) - c*xhat*sum(dout*xhat)),
        # c = n/(n-1) for the Bessel-corrected variance, 1 for the biased one
        return (self.weight * self.inv_std / n) * (n * dout - dbias - self.xhat * (c * dweight))

    def parameters(self):
        return {"weight": self.weight, "bias": self.bias}

    def buffers(self):
        return {"running_mean": self.running_mean, "running_var": self.running_var}

    def describe(self):
        return f"{self.weight.shape[0]}, {'bessel' if self.bessel else 'biased'} variance, momentum {self.momentum:g}"


class Tanh(Layer):
    """tanh, elementwise."""

    def forward(self, x):
        self.out = torch.tanh(x)
        return self.out

    def backward(self, dout):
        return (1.0 - self.out * self.out) * dout  # d tanh(x)/dx = 1 - tanh(x)^2


class FlattenConsecutive(Layer):
    """(B, T, C) -> (B, T/n, C*n): groups n neighbouring positions (van den Oord et al. 2016).

    A group covering the whole sequence drops the time axis: (B, T, C) -> (B, T*C).
    """

    def __init__(self, n):
        self.n = n

    def forward(self, x):
        self.in_shape = x.shape                 # (B, T, C)
        B, T, C = x.shape
        out = x.reshape(B, T // self.n, C * self.n)
        return out.squeeze(1) if out.shape[1] == 1 else out

    def backward(self, dout):
        return dout.reshape(self.in_shape)      # a reshape moves no numbers

    def describe(self):
        return str(self.n)


class Sequential(Layer):
    """Layers applied in order; backward runs them in reverse.

    With record set, forward keeps every layer's output in self.outputs and backward the
    gradient of the loss with respect to it in self.output_grads (for diagnostics.py).
    """

    record = False

    def __init__(self, layers):
        self.layers = list(layers)
        self.outputs, self.output_grads = [], []

    def forward(self, x):
        if self.record:
            self.outputs = []
        for layer in self.layers:
            x = layer.forward(x)
            if self.record:
                self.outputs.append(x)
        return x

    def backward(self, dout):
        if self.record:
            self.output_grads = [None] * len(self.layers)
        for i in reversed(range(len(self.layers))):
            if self.record:
                self.output_grads[i] = dout     # dL/d(output of layer i)
            dout = self.layers[i].backward(dout)
        return dout

    def children(self):
        return self.layers

    def __repr__(self):
        lines = [f"  ({i}) {layer!r}".replace("\n", "\n  ") for i, layer in enumerate(self.layers)]
        return "Sequential(\n" + "\n".join(lines) + "\n)"

    def parameters(self):
        return {f"{i}.{name}": p for i, layer in enumerate(self.layers) for name, p in layer.parameters().items()}

    def buffers(self):
        return {f"{i}.{name}": b for i, layer in enumerate(self.layers) for name, b in layer.buffers().items()}

    @property
    def grads(self):
        return {f"{i}.{name}": g for i, layer in enumerate(self.layers) for name, g in layer.grads.items()}
