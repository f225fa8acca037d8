"""Layers with hand-written backward passes, one uniform contract.

    y  = layer.forward(x)      keeps on self only what backward needs
    dx = layer.backward(dy)    returns dL/dx and stores dL/dparam in layer.grads
    layer.parameters()         {name: tensor} in a stable order; layer.grads has the same keys

Four seams, declared here with defaults that pass them on to the layers inside, let other modules
change how a layer acts without reaching into it: share_batch (distributed.py: a layer that looks
across the batch acts on the global batch), use_generator (a resumed run: the generator random
noise is drawn from), take_noise_from (compiled.py, data.py: where random noise comes from) and
multiply_in (train.py: the dtype of the matrix products in training, bf16 for mixed precision).

Every backward here is proven against an autograd twin and finite differences in
gradcheck.py. Nothing in this file calls autograd.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from .errors import UserError
from .noise import uniform_noise
from .packing import Layout, Packed


def product(a, b, dtype=None, bias=None):
    """bias + a @ b; dtype (bf16): the operands cast to it for the multiply, the product cast back to a's dtype and
    the bias added there (mixed precision, as in llm.c); None: in the operands' own dtype, the bias in the same call."""
    if dtype is not None:
        out = (a.to(dtype) @ b.to(dtype)).to(a.dtype)
        return out if bias is None else out.add_(bias)
    return a @ b if bias is None else torch.addmm(bias, a, b)


class Layer:
    """The contract every layer keeps; a layer without parameters inherits the defaults."""

    training = True
    grads = {}  # replaced (never mutated) by backward in layers that have parameters
    packs = False   # whether forward takes a packing.Packed batch: only the positions that have a target
    product_dtype = None    # multiply_in's dtype for the matrix products in training; None: the tensors' own

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

    def share_batch(self, rows, batch_size, sum_over_ranks):
        """Data parallel: this process takes rows (a slice) of every batch of batch_size, and sum_over_ranks(t) sums
        a tensor over the processes in place. A layer that looks across the batch (BatchNorm1d's statistics,
        Dropout's mask) then acts on the whole batch; by default a layer passes this on to the layers inside it."""
        for child in self.children():
            child.share_batch(rows, batch_size, sum_over_ranks)

    def use_generator(self, generator):
        """The torch.Generator a layer that draws random numbers in training (Dropout) draws them from; by default
        passed on to the layers inside."""
        for child in self.children():
            child.use_generator(generator)

    def take_noise_from(self, source):
        """Where a layer that draws random numbers in training (Dropout) gets them: source(layer, shape, dtype,
        device) returns uniform noise in [0, 1); None: the layer's own generator. A compiled step records the
        draws, then hands its graph the noise through this; by default passed on to the layers inside."""
        for child in self.children():
            child.take_noise_from(source)

    def multiply_in(self, dtype):
        """Mixed precision: the dtype (torch.bfloat16) a layer's matrix products cast their operands to in training,
        forward and backward, their results cast back; None: the tensors' own. Evaluation mode (evaluation, sampling)
        always multiplies in the tensors' own dtype. Set on this layer and passed on to the layers inside."""
        self.product_dtype = dtype
        for child in self.children():
            child.multiply_in(dtype)

    def products_in(self):
        """The dtype this layer's matrix products run in now: multiply_in's in training, None (the tensors') in eval."""
        return self.product_dtype if self.training else None

    def new_cache(self):
        """What step() keeps from one position to the next (None: the layer treats each position alone)."""
        return None

    def step(self, x_t, cache):
        """The forward's output at the next position only, x_t (B, 1, ...): sampling one character at a time."""
        return self.forward(x_t)

    def __repr__(self):
        return f"{type(self).__name__}({self.describe()})"

    def describe(self):
        """The shapes and settings shown inside the parentheses of repr."""
        return ""


def walk(layer):
    """layer and every layer inside it, depth first."""
    yield layer
    for child in layer.children():
        yield from walk(child)


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
        self.x = x                                              # (..., fan_in)
        x2d = x.reshape(-1, self.weight.shape[0])               # (N, fan_in): every leading position is a row
        out = product(x2d, self.weight, self.products_in(), self.bias)     # (N, fan_out)
        return out.view(*x.shape[:-1], self.weight.shape[1])    # (..., fan_out)

    def backward(self, dout):
        # dW = x^T dout, db = sum of dout over every leading dimension, dx = dout W^T
        x2d = self.x.reshape(-1, self.weight.shape[0])          # (N, fan_in)
        dout2d = dout.reshape(-1, self.weight.shape[1])         # (N, fan_out)
        dtype = self.products_in()
        self.grads = {"weight": product(x2d.T, dout2d, dtype)}
        if self.bias is not None:
            self.grads["bias"] = dout2d.sum(0)
        return product(dout2d, self.weight.T, dtype).view(self.x.shape)     # (..., fan_in)

    def parameters(self):
        return {"weight": self.weight} if self.bias is None else {"weight": self.weight, "bias": self.bias}

    def describe(self):
        fan_in, fan_out = self.weight.shape
        return f"{fan_in} -> {fan_out}" + ("" if self.bias is not None else ", no bias")


class LookupLinear(Layer):
    """Embedding, flattened over the context, then Linear, computed through per-position lookup tables.

    The same function as Embedding(E), FlattenConsecutive(T), Linear(W, b) on (B, T) tokens:
    h = b + sum_t E[x_t] @ W_t, where W_t is the t-th block of n_embd rows of W. E[x_t] @ W_t is row
    x_t of the table P_t = E @ W_t (V, H), so the forward builds T small tables and sums one row of each
    per example; the backward adds each dout row into row x_t of dP_t, then dW_t = E^T dP_t and
    dE = sum_t dP_t W_t^T. It multiplies V rows where the plain layers multiply B: far cheaper when the
    batch is much larger than the vocabulary (batch 512 over 27 characters: 3x fewer flops a step).
    """

    def __init__(self, embedding, weight, bias=None):
        self.embedding = embedding              # (V, C) one vector per token
        self.weight = weight                    # (T * C, H): rows t*C .. t*C + C - 1 act on position t
        self.bias = bias                        # (H,) or None
        self.grads = {}

    def blocks(self):
        """W as (T, C, H): W_t for each position t."""
        return self.weight.view(-1, self.embedding.shape[1], self.weight.shape[1])

    def forward(self, ix):
        self.ix = ix                                                    # (B, T) token indices
        V = self.embedding.shape[0]
        tables = torch.matmul(self.embedding, self.blocks())            # (T, V, H): P_t = E @ W_t
        rows = ix + torch.arange(0, ix.shape[1] * V, V, device=ix.device)   # (B, T): x_t's row in the stacked P
        out = F.embedding_bag(rows, tables.view(-1, tables.shape[2]), mode="sum")     # (B, H): sum_t P_t[x_t]
        return out if self.bias is None else out.add_(self.bias)

    def backward(self, dout):
        # dP_t[v] = sum of the dout rows (B, H) whose token at position t is v; index_add_ keeps repeats
        T, V = self.ix.shape[1], self.embedding.shape[0]
        dtables = dout.new_zeros(T, V, dout.shape[1])                   # (T, V, H)
        for t in range(T):
            dtables[t].index_add_(0, self.ix[:, t], dout)
        blocks = self.blocks()                                          # (T, C, H)
        self.grads = {
            "embedding": torch.bmm(dtables, blocks.transpose(1, 2)).sum(0),            # (V, C) sum_t dP_t W_t^T
            "weight": torch.matmul(self.embedding.T, dtables).view(self.weight.shape),  # (T*C, H) E^T dP_t
        }
        if self.bias is not None:
            self.grads["bias"] = dout.sum(0)                            # (H,)
        return None                             # indices have no gradient

    def parameters(self):
        both = {"embedding": self.embedding, "weight": self.weight}
        return both if self.bias is None else both | {"bias": self.bias}

    def describe(self):
        (vocab, dim), (fan_in, fan_out) = self.embedding.shape, self.weight.shape
        bias = "" if self.bias is not None else ", no bias"
        return f"{vocab}, {dim}, {fan_in // dim} positions -> {fan_out}{bias}"


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

    reduce = None   # sync BatchNorm: sums a tensor over the processes sharing the batch; None: this process alone

    def share_batch(self, rows, batch_size, sum_over_ranks):
        self.reduce = sum_over_ranks        # the statistics of the global batch (sync BatchNorm)

    def summed(self, *sums):
        """Per-feature sums (C,) over every process's rows of the batch, in one all-reduce; alone, as given."""
        if self.reduce is None:
            return sums
        return self.reduce(torch.cat(sums)).split([s.shape[0] for s in sums])

    def forward(self, x):
        dims = tuple(range(x.ndim - 1))         # every dimension but the channels
        if self.training:
            n = float(x.numel() // x.shape[-1])
            if self.reduce is None:
                mean = x.mean(dims)                                     # (C,)
            else:                               # the global batch's rows, and their mean
                total, n = self.summed(x.sum(dims), x.new_full((1,), n))
                mean = total / n                                        # (C,), n (1,)
            centred = x - mean
            (sum_sq,) = self.summed((centred * centred).sum(dims))      # (C,)
            self.n = n
            var = sum_sq / (n - 1.0) if self.bessel else sum_sq / n
            self.running_mean.lerp_(mean, self.momentum)                # (1-m)*running + m*batch
            self.running_var.lerp_(sum_sq / (n - 1.0), self.momentum)   # always unbiased
        else:
            centred = x - self.running_mean
            var = self.running_var
        self.inv_std = torch.rsqrt(var + self.eps)     # (var + eps)^-1/2; rsqrt, not pow: cheap when fused
        self.xhat = centred * self.inv_std      # same shape as x
        return self.weight * self.xhat + self.bias

    def backward(self, dout):
        dims = tuple(range(dout.ndim - 1))
        dweight, dbias = (dout * self.xhat).sum(dims), dout.sum(dims)     # (C,), (C,)
        self.grads = {"weight": dweight, "bias": dbias}
        if not self.training:                   # running stats are constants
            return dout * (self.weight * self.inv_std)
        n = self.n
        c = n / (n - 1) if self.bessel else 1.0
        # the lecture's exercise 3: dx = gamma*inv_std/n * (n*dout - sum(dout) - c*xhat*sum(dout*xhat)),
        # c = n/(n-1) for the Bessel-corrected variance, 1 for the biased one; sums over the global batch
        sum_dout, sum_dout_xhat = self.summed(dbias, dweight)
        return (self.weight * self.inv_std / n) * (n * dout - sum_dout - self.xhat * (c * sum_dout_xhat))

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
        # d tanh(x)/dx = 1 - tanh(x)^2, in place on one temporary: (1 - y*y) * dout, rounded the same
        return (self.out * self.out).neg_().add_(1.0).mul_(dout)


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

    @property
    def packs(self):
        return self.layers[0].packs             # the first layer reads the batch

    def new_cache(self):
        return [layer.new_cache() for layer in self.layers]

    def step(self, x_t, cache):
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            x_t = layer.step(x_t, layer_cache)
        return x_t

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


def prefixed(prefix, named):
    """{'prefix.name': value}: how a composite names its parts' parameters, buffers and gradients."""
    return {f"{prefix}.{name}": value for name, value in named.items()}


class LayerNorm(Layer):
    """Layer normalisation (Ba et al. 2016) over the last dimension, with PyTorch's biased variance."""

    def __init__(self, weight, bias, eps=1e-5):
        self.weight, self.bias, self.eps = weight, bias, eps     # (C,) gamma, (C,) beta
        self.grads = {}

    def forward(self, x):
        centred = x - x.mean(-1, keepdim=True)                  # (..., C)
        var = (centred * centred).mean(-1, keepdim=True)        # (..., 1), divides by C
        self.inv_std = var.add_(self.eps).rsqrt_()              # (..., 1)
        self.xhat = centred.mul_(self.inv_std)                  # (..., C)
        return torch.addcmul(self.bias, self.xhat, self.weight)     # gamma * xhat + beta

    def backward(self, dout):
        # dx = inv_std * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = gamma * dout, means over C
        dims = tuple(range(dout.ndim - 1))
        dout_xhat = dout * self.xhat                            # (..., C)
        self.grads = {"weight": dout_xhat.sum(dims), "bias": dout.sum(dims)}
        dxhat = dout * self.weight
        mean_dxhat, mean_dxhat_xhat = dxhat.mean(-1, keepdim=True), (dout_xhat * self.weight).mean(-1, keepdim=True)
        return (dxhat - mean_dxhat).sub_(self.xhat * mean_dxhat_xhat).mul_(self.inv_std)

    def parameters(self):
        return {"weight": self.weight, "bias": self.bias}

    def describe(self):
        return str(self.weight.shape[0])


SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715


class GELU(Layer):
    """GELU (Hendrycks & Gimpel 2016) by its tanh approximation, as in GPT-2 and llm.c (not the exact erf form).

    gelu(x) = 0.5 x (1 + tanh(u / 2)), u = 2 sqrt(2/pi) (x + 0.044715 x^3): PyTorch's F.gelu(x, approximate="tanh").

    Computed as x sigmoid(u), the same function (0.5 (1 + tanh(u / 2)) = sigmoid(u)): torch's CPU tanh,
    eager and compiled, takes several times as long as its sigmoid (measured: 335 against 53 us for the
    transformer's 496 x 256), and a tenth of the compiled transformer step went to it.
    """

    def forward(self, x):
        self.x = x
        u = torch.addcmul(x, x * x, x, value=GELU_CUBIC).mul_(2 * SQRT_2_OVER_PI)   # 2 sqrt(2/pi) (x + 0.044715 x^3)
        self.sigmoid = u.sigmoid_()                                                 # s = 0.5 (1 + tanh(u / 2))
        return x * self.sigmoid

    def backward(self, dout):
        # d gelu/dx = s + x s (1 - s) du/dx, du/dx = 2 sqrt(2/pi) (1 + 3 * 0.044715 x^2), s the sigmoid above
        x, s = self.x, self.sigmoid
        slope = (x * x).mul_(3 * GELU_CUBIC).add_(1.0).mul_(x).mul_(2 * SQRT_2_OVER_PI)    # x du/dx
        return (1.0 - s).mul_(s).mul_(slope).add_(s).mul_(dout)


class Dropout(Layer):
    """Inverted dropout (Srivastava et al. 2014): training drops entries with probability p, scales the rest by 1/(1-p).

    The masks come from the torch.Generator the layer is given, so a run that saves and restores
    that generator's state draws the same masks after a resume. Identity in evaluation mode.
    """

    def __init__(self, p, generator, layout=None):
        if not 0.0 <= p < 1.0:
            raise UserError(f"dropout must be at least 0 and below 1, got {p}")
        self.p, self.generator = p, generator
        self.layout = layout or Layout()    # a transformer's: its input may be packed rows of a (B, T) grid
        self.mask = None

    rows = None     # data parallel: (this process's rows, as a slice, of a batch of n rows); None: the whole batch
    noise_source = None     # take_noise_from's source of uniform noise; None: self.generator

    def share_batch(self, rows, batch_size, sum_over_ranks):
        self.rows = (rows, batch_size)

    def use_generator(self, generator):
        self.generator = generator

    def take_noise_from(self, source):
        self.noise_source = source

    def draw_mask(self, x):
        """1/(1-p) where an entry of x is kept, 0 where it is dropped; advances the generator.

        Data parallel, the whole batch's mask is drawn and this process's rows kept: N processes drop
        what one process with the whole batch drops, and every generator stays in step. Packed rows
        get their cells of the whole grid's mask: the masks a padded batch gets."""
        grid = self.layout.grid_shape(x)                # (B, T, ...)
        shape = grid if self.rows is None else (self.rows[1], *grid[1:])
        keep = self.uniform(shape, x.dtype, x.device) >= self.p
        keep = keep if self.rows is None else keep[self.rows[0]]
        return self.layout.to_rows(keep.to(x.dtype) / (1.0 - self.p))

    def uniform(self, shape, dtype, device):
        """Uniform noise in [0, 1) from the layer's generator (noise.py), or from its noise source when it has one."""
        if self.noise_source is not None:
            return self.noise_source(self, shape, dtype, device)
        return uniform_noise(shape, self.generator, dtype, device)

    def forward(self, x):
        self.mask = self.draw_mask(x) if self.training and self.p > 0 else None   # same shape as x
        return x if self.mask is None else x * self.mask

    def backward(self, dout):
        return dout if self.mask is None else dout * self.mask      # d(x * mask)/dx = mask

    def describe(self):
        return f"p={self.p:g}"


class Residual(Layer):
    """y = x + inner(x) (He et al. 2016); the inner layer's parameters are named 'inner.<its name>'."""

    def __init__(self, inner):
        self.inner = inner

    def forward(self, x):
        return x + self.inner.forward(x)

    def backward(self, dout):
        return dout + self.inner.backward(dout)     # x fans out: to the sum directly and through inner

    def new_cache(self):
        return self.inner.new_cache()

    def step(self, x_t, cache):
        return x_t + self.inner.step(x_t, cache)

    def children(self):
        return [self.inner]

    def parameters(self):
        return prefixed("inner", self.inner.parameters())

    def buffers(self):
        return prefixed("inner", self.inner.buffers())

    @property
    def grads(self):
        return prefixed("inner", self.inner.grads)

    def __repr__(self):
        return "Residual(\n  " + repr(self.inner).replace("\n", "\n  ") + "\n)"


@dataclass
class Position:
    """How many positions step() has embedded so far."""

    t: int = 0


class TokenPositionEmbedding(Layer):
    """A token embedding plus a learned position embedding (GPT-2): (B, T) indices -> (B, T, C), or a Packed batch
    -> (N, C), its rows only; it tells the layers sharing its layout which of the two this forward pass is."""

    packs = True

    def __init__(self, wte, wpe, layout=None):
        self.wte = wte                          # (V, C) one vector per token
        self.wpe = wpe                          # (block_size, C) one vector per position
        self.layout = layout or Layout()
        self.grads = {}

    def forward(self, ix):
        self.layout.packed = ix if isinstance(ix, Packed) else None
        if self.layout.packed is None:
            self.tokens, self.positions = ix, None  # (B, T) token indices, T <= block_size
            return self.wte[ix] + self.wpe[: ix.shape[1]]   # (B, T, C)
        self.tokens, self.positions = ix.to_rows(ix.tokens), ix.positions   # (N,) each
        return self.wte[self.tokens] + self.wpe[self.positions]            # (N, C)

    def backward(self, dout):
        # dwte[v] = sum of the dout rows whose token is v (scatter-add); dwpe[t] = sum of the dout rows at position t
        C = self.wte.shape[1]
        dwte = torch.zeros_like(self.wte).index_add_(0, self.tokens.reshape(-1), dout.reshape(-1, C))
        dwpe = torch.zeros_like(self.wpe)
        if self.positions is None:
            dwpe[: dout.shape[1]] = dout.sum(0)     # (B, T, C): every row has positions 0..T-1
        else:
            dwpe.index_add_(0, self.positions, dout)
        self.grads = {"wte": dwte, "wpe": dwpe}
        return None                             # indices have no gradient

    def new_cache(self):
        return Position()

    def step(self, ix_t, cache):
        """The next position's embedding: ix_t (B, 1) at position cache.t, which moves on by one."""
        out = self.wte[ix_t] + self.wpe[cache.t]    # (B, 1, C)
        cache.t += 1
        return out

    def parameters(self):
        return {"wte": self.wte, "wpe": self.wpe}

    def describe(self):
        (vocab, dim), block_size = self.wte.shape, self.wpe.shape[0]
        return f"{vocab}, {dim}, positions {block_size}"


def softmax_backward(probs, dprobs):
    """dL/dscores from dL/dprobs for probs = softmax(scores) along the last dimension (the compact row form)."""
    return probs * (dprobs - (dprobs * probs).sum(-1, keepdim=True))    # dS = P * (dP - sum_j dP_j P_j)


@lru_cache(maxsize=16)
def causal_mask(T, device, dtype):
    """(T, T): 0 where a query may see a key (key <= query), -inf on the future; made once per length."""
    return torch.full((T, T), float("-inf"), device=device, dtype=dtype).triu_(1)


def merge_heads(t):
    """(B, n_head, T, head_size) -> (B, T, C): the heads side by side again."""
    B, n_head, T, head_size = t.shape
    return t.transpose(1, 2).reshape(B, T, n_head * head_size)


@dataclass
class KVCache:
    """The keys and values of every position seen so far, for step(): buffers (B, n_head, room, head_size) each,
    filled up to position t and grown by doubling, so a new position is one write, not a copy of the whole past."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    t: int = 0              # positions held
    ROOM = 32               # positions allocated at first (a names transformer never needs more)

    def append(self, k, v):
        """Add one position's keys and values (B, n_head, 1, head_size); return all of them, (B, n_head, t, hs)."""
        if self.keys is None or self.t == self.keys.shape[2]:
            self.keys, self.values = (self.grown(old, new) for old, new in ((self.keys, k), (self.values, v)))
        self.keys[:, :, self.t] = k[:, :, 0]
        self.values[:, :, self.t] = v[:, :, 0]
        self.t += 1
        return self.keys[:, :, : self.t], self.values[:, :, : self.t]

    def grown(self, old, new):
        """A buffer with twice the room (ROOM at first) holding old's first t positions; new gives shape and type."""
        B, n_head, _, head_size = new.shape
        room = self.ROOM if old is None else 2 * old.shape[2]
        buffer = new.new_empty(B, n_head, room, head_size)
        if old is not None:
            buffer[:, :, : self.t] = old[:, :, : self.t]
        return buffer


class CausalSelfAttention(Layer):
    """Multi-head masked self-attention (Vaswani et al. 2017, GPT-2's layout): (B, T, C) -> (B, T, C).

    qkv is a Linear C -> 3C whose output splits into queries, keys and values (n_head heads of
    C/n_head each), proj a Linear C -> C. Position t attends to positions 0..t only. Given packed
    rows (N, C) (its layout says so), it attends on their (B, T) grid and returns rows again.
    """

    def __init__(self, qkv, proj, n_head, layout=None):
        width = proj.weight.shape[0]
        if width % n_head:
            raise UserError(f"n_embd {width} is not a multiple of n_head {n_head}")
        self.qkv, self.proj, self.n_head = qkv, proj, n_head
        self.layout = layout or Layout()

    def split_heads(self, t):
        """(B, T, C) -> (B, n_head, T, head_size)."""
        B, T, C = t.shape
        return t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def forward(self, x):
        qkv = self.layout.to_grid(self.qkv.forward(x))                      # (B, T, 3C), zero off the rows
        self.q, self.k, self.v = (self.split_heads(t) for t in qkv.chunk(3, dim=-1))    # (B, nh, T, hs)
        self.scale = self.q.shape[-1] ** -0.5                               # 1/sqrt(head_size)
        dtype = self.products_in()
        scores = product(self.q, self.k.transpose(-2, -1), dtype).mul_(self.scale)     # (B, nh, T, T)
        scores.add_(causal_mask(qkv.shape[1], x.device, x.dtype))           # -inf on the future
        self.probs = torch.softmax(scores, dim=-1)                          # (B, nh, T, T), 0 on the future
        y = merge_heads(product(self.probs, self.v, dtype))                 # (B, T, C)
        return self.proj.forward(self.layout.to_rows(y))                    # (B, T, C) or (N, C)

    def backward(self, dout):
        # y = P v: dP = dy v^T, dv = P^T dy; scores = q k^T * scale: dq = dS k * scale, dk = dS^T q * scale
        dtype = self.products_in()
        dy = self.split_heads(self.layout.to_grid(self.proj.backward(dout)))    # (B, nh, T, hs)
        dprobs = product(dy, self.v.transpose(-2, -1), dtype)               # (B, nh, T, T)
        dv = product(self.probs.transpose(-2, -1), dy, dtype)
        dscores = softmax_backward(self.probs, dprobs) * self.scale         # 0 on the future, where P is 0
        dq, dk = product(dscores, self.k, dtype), product(dscores.transpose(-2, -1), self.q, dtype)
        dqkv = torch.cat([merge_heads(dq), merge_heads(dk), merge_heads(dv)], dim=-1)  # (B, T, 3C)
        return self.qkv.backward(self.layout.to_rows(dqkv))

    def new_cache(self):
        return KVCache()

    def step(self, x_t, cache):
        """The forward's output at the next position only: x_t (B, 1, C); cache (a KVCache) grows by one position."""
        q, k, v = (self.split_heads(t) for t in self.qkv.forward(x_t).chunk(3, dim=-1))  # (B, nh, 1, hs) each
        keys, values = cache.append(k, v)                                   # (B, nh, t, hs): no future to mask
        probs = torch.softmax((q @ keys.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1)   # (B, nh, 1, t)
        return self.proj.forward(merge_heads(probs @ values))              # (B, 1, C)

    def children(self):
        return [self.qkv, self.proj]

    def parameters(self):
        return prefixed("qkv", self.qkv.parameters()) | prefixed("proj", self.proj.parameters())

    @property
    def grads(self):
        return prefixed("qkv", self.qkv.grads) | prefixed("proj", self.proj.grads)

    def describe(self):
        return f"{self.proj.weight.shape[0]}, {self.n_head} head{'s' if self.n_head > 1 else ''}"


class RNNCell(Layer):
    """makemore's RNN cell: h' = tanh([x, h] @ W + b), W (C + H, H). Run over time by Recurrent."""

    def __init__(self, weight, bias):
        self.weight = weight                    # (C + H, H)
        self.bias = bias                        # (H,)

    def next_hidden(self, x, h):
        """h' (B, H) from x (B, C) and h (B, H), and the cache next_hidden_backward needs."""
        xh = torch.cat([x, h], dim=1)                               # (B, C + H)
        h_next = torch.tanh(xh @ self.weight + self.bias)           # (B, H)
        return h_next, (xh, h_next)

    def next_hidden_backward(self, dh_next, cache):
        """(dL/dx, dL/dh, this step's parameter gradients) from dL/dh'."""
        # dpre = (1 - h'^2) dh'; dW = [x, h]^T dpre, db = sum of dpre, d[x, h] = dpre W^T
        xh, h_next = cache
        dpre = (1.0 - h_next * h_next) * dh_next                    # (B, H)
        dxh = dpre @ self.weight.T                                  # (B, C + H)
        H = h_next.shape[1]
        return dxh[:, :-H], dxh[:, -H:], {"weight": xh.T @ dpre, "bias": dpre.sum(0)}

    def parameters(self):
        return {"weight": self.weight, "bias": self.bias}

    def describe(self):
        fan_in, hidden = self.weight.shape
        return f"{fan_in - hidden} -> {hidden}"


class GRUCell(Layer):
    """makemore's GRU cell (Cho et al. 2014). Run over time by Recurrent. With xh = [x, h]:

    r = sigmoid(xh @ Wr + br), hbar = tanh([x, r * h] @ Wbar + bbar), z = sigmoid(xh @ Wz + bz),
    h' = (1 - z) * h + z * hbar; each W is (C + H, H).
    """

    def __init__(self, weight_z, bias_z, weight_r, bias_r, weight_hbar, bias_hbar):
        self.weight_z, self.bias_z = weight_z, bias_z               # update gate, (C + H, H), (H,)
        self.weight_r, self.bias_r = weight_r, bias_r               # reset gate
        self.weight_hbar, self.bias_hbar = weight_hbar, bias_hbar   # candidate state

    def next_hidden(self, x, h):
        """h' (B, H) from x (B, C) and h (B, H), and the cache next_hidden_backward needs."""
        xh = torch.cat([x, h], dim=1)                                       # (B, C + H)
        r = torch.sigmoid(xh @ self.weight_r + self.bias_r)                 # (B, H)
        xrh = torch.cat([x, r * h], dim=1)                                  # (B, C + H)
        hbar = torch.tanh(xrh @ self.weight_hbar + self.bias_hbar)          # (B, H)
        z = torch.sigmoid(xh @ self.weight_z + self.bias_z)                 # (B, H)
        return (1.0 - z) * h + z * hbar, (xh, h, r, xrh, hbar, z)

    def next_hidden_backward(self, dh_next, cache):
        """(dL/dx, dL/dh, this step's parameter gradients) from dL/dh'."""
        # dz = dh' (hbar - h), dhbar = dh' z, dh gets dh' (1 - z) directly plus the paths through r*h and both gates
        xh, h, r, xrh, hbar, z = cache
        H = h.shape[1]
        dpre_z = dh_next * (hbar - h) * z * (1.0 - z)                       # (B, H), sigmoid' = z (1 - z)
        dpre_hbar = dh_next * z * (1.0 - hbar * hbar)                       # (B, H), tanh' = 1 - hbar^2
        dxrh = dpre_hbar @ self.weight_hbar.T                               # (B, C + H)
        dpre_r = dxrh[:, -H:] * h * r * (1.0 - r)                           # (B, H), through r * h to r
        dxh = dpre_z @ self.weight_z.T + dpre_r @ self.weight_r.T           # (B, C + H)
        dx = dxh[:, :-H] + dxrh[:, :-H]
        dh = dxh[:, -H:] + dxrh[:, -H:] * r + dh_next * (1.0 - z)
        grads = {"weight_z": xh.T @ dpre_z, "bias_z": dpre_z.sum(0), "weight_r": xh.T @ dpre_r,
                 "bias_r": dpre_r.sum(0), "weight_hbar": xrh.T @ dpre_hbar, "bias_hbar": dpre_hbar.sum(0)}
        return dx, dh, grads

    def parameters(self):
        return {"weight_z": self.weight_z, "bias_z": self.bias_z, "weight_r": self.weight_r,
                "bias_r": self.bias_r, "weight_hbar": self.weight_hbar, "bias_hbar": self.bias_hbar}

    def describe(self):
        fan_in, hidden = self.weight_z.shape
        return f"{fan_in - hidden} -> {hidden}"


@dataclass
class HiddenState:
    """The hidden state (B, H) after the positions seen so far, for Recurrent.step (None: not started)."""

    h: torch.Tensor | None = None


class Recurrent(Layer):
    """A cell run over time from a learned start state h0: (B, T, C) -> (B, T, H), backprop through time.

    Parameters: 'h0' (H,) and the cell's as 'cell.<name>'.
    """

    def __init__(self, cell, h0):
        self.cell, self.h0 = cell, h0           # h0 (H,): the same start for every row
        self.grads = {}

    def forward(self, x):
        h = self.h0.expand(x.shape[0], -1)                      # (B, H)
        self.caches, hiddens = [], []
        for t in range(x.shape[1]):
            h, cache = self.cell.next_hidden(x[:, t], h)               # (B, H)
            self.caches.append(cache)
            hiddens.append(h)
        return torch.stack(hiddens, dim=1)                      # (B, T, H)

    def backward(self, dout):
        # BPTT: dh'_t = dout[:, t] + what step t+1 sent back to its h; dh0 = what step 0 sent back, summed over B
        dh = torch.zeros_like(dout[:, 0])                       # (B, H): nothing comes back from after the last step
        grads = {name: torch.zeros_like(p) for name, p in self.cell.parameters().items()}
        dxs = [None] * dout.shape[1]
        for t in reversed(range(dout.shape[1])):
            dxs[t], dh, step_grads = self.cell.next_hidden_backward(dout[:, t] + dh, self.caches[t])
            for name, g in step_grads.items():
                grads[name] += g                                # the cell's parameters fan out over time
        self.cell.grads = grads
        self.grads = {"h0": dh.sum(0)} | prefixed("cell", grads)
        return torch.stack(dxs, dim=1)                          # (B, T, C)

    def new_cache(self):
        return HiddenState()

    def step(self, x_t, state):
        """The forward's output at the next position only: x_t (B, 1, C); state (a HiddenState) moves on one step."""
        h = self.h0.expand(x_t.shape[0], -1) if state.h is None else state.h
        state.h, _ = self.cell.next_hidden(x_t[:, 0], h)              # (B, H)
        return state.h[:, None]                                 # (B, 1, H)

    def children(self):
        return [self.cell]

    def parameters(self):
        return {"h0": self.h0} | prefixed("cell", self.cell.parameters())

    def describe(self):
        return repr(self.cell)
