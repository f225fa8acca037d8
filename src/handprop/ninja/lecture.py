"""The network of makemore part 4 ("becoming a backprop ninja") as a chain of small named steps.

n_embd 10, n_hidden 64, one Bessel-corrected BatchNorm layer, a batch of 32: every
intermediate tensor has the lecture's name, and each forward step is a small function of
the named tensors it reads. Exercises 2 and 3's one-step gradient formulas live here too,
beside the forward they differentiate, with autograd's reference gradients of the whole
forward. ninja.py (handprop's own solutions) and grade.py (the grader) both build on this.
"""

import functools
import inspect
import math

import torch

from ..data import Vocab, build_examples, load_corpus, split_items
from ..models import TANH_GAIN

N_EMBD = 10                 # embedding size per character
N_HIDDEN = 64               # hidden units
BLOCK_SIZE = 3              # characters of context
BATCH_SIZE = 32             # n: examples in the one batch the exercises use
SEED = 2147483647           # the lecture's torch.Generator seed
BN_EPS = 1e-5               # added to the batch variance before the inverse square root

PARAMETER_NAMES = ("C", "W1", "b1", "W2", "b2", "bngain", "bnbias")

# every tensor exercise 1 differentiates, in the lecture's order (from the loss backwards)
GRADIENT_NAMES = (
    "logprobs", "probs", "counts_sum_inv", "counts_sum", "counts", "norm_logits", "logit_maxes",
    "logits", "h", "W2", "b2", "hpreact", "bngain", "bnbias", "bnraw", "bnvar_inv", "bnvar",
    "bndiff2", "bndiff", "bnmeani", "hprebn", "embcat", "W1", "b1", "emb", "C",
)


@functools.cache
def training_examples():
    """The lecture's training split of the bundled names.txt as examples (built once), and the vocabulary size."""
    items = load_corpus().items
    vocab = Vocab.from_items(items)
    Xtr, Ytr = build_examples(split_items(items)[0], vocab, BLOCK_SIZE)     # (182625, 3), (182625,)
    return Xtr, Ytr, vocab.size


def lecture_setup(dtype=torch.float32):
    """The lecture's parameters (4137 numbers, none trivially 0 or 1) and one training batch Xb, Yb."""
    Xtr, Ytr, vocab_size = training_examples()
    g = torch.Generator().manual_seed(SEED)
    fan_in = N_EMBD * BLOCK_SIZE
    t = {
        "C": torch.randn(vocab_size, N_EMBD, generator=g),                                  # (27, 10)
        "W1": torch.randn(fan_in, N_HIDDEN, generator=g) * TANH_GAIN / math.sqrt(fan_in),   # (30, 64)
        "b1": torch.randn(N_HIDDEN, generator=g) * 0.1,                                     # (64,)
        "W2": torch.randn(N_HIDDEN, vocab_size, generator=g) * 0.1,                         # (64, 27)
        "b2": torch.randn(vocab_size, generator=g) * 0.1,                                   # (27,)
    }
    ix = torch.randint(0, Xtr.shape[0], (BATCH_SIZE,), generator=g)
    # C, W1, b1, W2, b2 and the batch are the lecture's exactly; it drew the BatchNorm gain and bias
    # from the unseeded global generator, so here they come from g, after the batch
    t["bngain"] = 1.0 + 0.1 * torch.randn(1, N_HIDDEN, generator=g)                         # (1, 64)
    t["bnbias"] = 0.1 * torch.randn(1, N_HIDDEN, generator=g)                               # (1, 64)
    t = {name: p.to(dtype) for name, p in t.items()}
    t["Xb"], t["Yb"] = Xtr[ix], Ytr[ix]                                                     # (32, 3), (32,)
    return t


def forward_steps(n):
    """The lecture's forward for a batch of n, one step per intermediate: {name: function of named inputs}.

    Each function's parameter names are the names of the tensors it reads.
    """
    return {
        "emb": lambda C, Xb: C[Xb],                                                  # (n, 3, 10)
        "embcat": lambda emb: emb.view(emb.shape[0], -1),                            # (n, 30)
        "hprebn": lambda embcat, W1, b1: embcat @ W1 + b1,                           # (n, 64)
        "bnmeani": lambda hprebn: 1 / n * hprebn.sum(0, keepdim=True),               # (1, 64)
        "bndiff": lambda hprebn, bnmeani: hprebn - bnmeani,                          # (n, 64)
        "bndiff2": lambda bndiff: bndiff**2,                                         # (n, 64)
        "bnvar": lambda bndiff2: 1 / (n - 1) * bndiff2.sum(0, keepdim=True),         # (1, 64), Bessel: n-1
        "bnvar_inv": lambda bnvar: (bnvar + BN_EPS) ** -0.5,                         # (1, 64)
        "bnraw": lambda bndiff, bnvar_inv: bndiff * bnvar_inv,                       # (n, 64)
        "hpreact": lambda bngain, bnraw, bnbias: bngain * bnraw + bnbias,            # (n, 64)
        "h": lambda hpreact: torch.tanh(hpreact),                                    # (n, 64)
        "logits": lambda h, W2, b2: h @ W2 + b2,                                     # (n, 27)
        "logit_maxes": lambda logits: logits.max(1, keepdim=True).values,            # (n, 1)
        "norm_logits": lambda logits, logit_maxes: logits - logit_maxes,             # (n, 27)
        "counts": lambda norm_logits: norm_logits.exp(),                             # (n, 27)
        "counts_sum": lambda counts: counts.sum(1, keepdim=True),                    # (n, 1)
        "counts_sum_inv": lambda counts_sum: counts_sum**-1,                         # (n, 1); **-1 keeps it bit-exact
        "probs": lambda counts, counts_sum_inv: counts * counts_sum_inv,             # (n, 27)
        "logprobs": lambda probs: probs.log(),                                       # (n, 27)
        "loss": lambda logprobs, Yb: -logprobs[torch.arange(n), Yb].mean(),          # scalar
    }


def inputs_of(step):
    """The names of the tensors a forward step reads."""
    return tuple(inspect.signature(step).parameters)


def forward(tensors):
    """Parameters and batch in, the same dict out with every intermediate of the lecture's forward added."""
    values = dict(tensors)
    for name, step in forward_steps(tensors["Xb"].shape[0]).items():
        values[name] = step(*(values[arg] for arg in inputs_of(step)))
    return values


def autograd_reference(tensors):
    """Autograd's dloss/dx for every parameter and intermediate of the whole forward: the lecture's reference."""
    leaves = {k: v.clone().requires_grad_(k in PARAMETER_NAMES) for k, v in tensors.items()}
    values = forward(leaves)
    for name in GRADIENT_NAMES:
        values[name].retain_grad()
    values["loss"].backward()
    return {name: values[name].grad for name in GRADIENT_NAMES}


def cross_entropy_backward(logits, Yb):
    """Exercise 2: dloss/dlogits in one step, (softmax(logits) - onehot(Yb)) / n."""
    n = logits.shape[0]
    dlogits = torch.softmax(logits, 1)                      # (n, 27)
    dlogits[torch.arange(n), Yb] -= 1
    return dlogits / n


def batchnorm_backward(dhpreact, bngain, bnvar_inv, bnraw, bessel=True):
    """Exercise 3: dloss/dhprebn in one step; bessel=False is the formula for the biased (1/n) variance."""
    n = dhpreact.shape[0]
    correction = n / (n - 1) if bessel else 1.0
    # dhprebn = gain * inv_std / n * (n dy - sum(dy) - correction * raw * sum(dy * raw))
    return bngain * bnvar_inv / n * (
        n * dhpreact - dhpreact.sum(0, keepdim=True) - correction * bnraw * (dhpreact * bnraw).sum(0, keepdim=True)
    )
