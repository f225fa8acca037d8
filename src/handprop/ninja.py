"""Becoming a backprop ninja: the lecture's step-by-step MLP, its gradients by hand, cmp tables.

The network of makemore part 4 (n_embd 10, n_hidden 64, one BatchNorm layer, batch 32) is
run as a chain of small named steps, one per intermediate tensor. Exercise 1 backpropagates
through every step by hand; exercise 2 does the cross-entropy in one fused step; exercise 3
does the BatchNorm layer in one fused step (for the lecture's Bessel-corrected variance).
Each result is compared with autograd in the lecture's `cmp` format. Autograd appears here
only to compute those reference gradients.
"""

import functools
import inspect
import math
from dataclasses import dataclass

import torch

from .data import Vocab, build_examples, load_corpus, split_items
from .gradcheck import check_layers

N_EMBD = 10                 # embedding size per character
N_HIDDEN = 64               # hidden units
BLOCK_SIZE = 3              # characters of context
BATCH_SIZE = 32             # n: examples in the one batch the exercises use
SEED = 2147483647           # the lecture's torch.Generator seed
BN_EPS = 1e-5               # added to the batch variance before the inverse square root
CHECK_MAXDIFF = 1e-8        # a float32 cmp row passes when approximate and maxdiff is at most this

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
        "W1": torch.randn(fan_in, N_HIDDEN, generator=g) * (5 / 3) / math.sqrt(fan_in),     # (30, 64)
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


def autograd_gradients(tensors):
    """Autograd's dloss/dx for every parameter and intermediate, the lecture's reference."""
    leaves = {k: v.clone().requires_grad_(k in PARAMETER_NAMES) for k, v in tensors.items()}
    values = forward(leaves)
    for name in GRADIENT_NAMES:
        values[name].retain_grad()
    values["loss"].backward()
    return {name: values[name].grad for name in GRADIENT_NAMES}


def backward_by_hand(v):
    """Exercise 1: dloss/dx for all 26 tensors, one step at a time through the forward of `forward`."""
    n = v["Xb"].shape[0]
    d = {}
    # loss = -mean of the target log-probabilities: each picked entry gets -1/n
    d["logprobs"] = torch.zeros_like(v["logprobs"])
    d["logprobs"][torch.arange(n), v["Yb"]] = -1.0 / n
    # d log(p) = dp / p
    d["probs"] = d["logprobs"] / v["probs"]
    # probs = counts * counts_sum_inv: counts_sum_inv (n, 1) was broadcast over the row, so sum it
    d["counts_sum_inv"] = (v["counts"] * d["probs"]).sum(1, keepdim=True)
    d["counts"] = v["counts_sum_inv"] * d["probs"]
    # d x^-1 = -x^-2
    d["counts_sum"] = -v["counts_sum"] ** -2 * d["counts_sum_inv"]
    # counts also feeds counts_sum: every entry of a row gets the row's gradient
    d["counts"] += d["counts_sum"]
    # d exp(x) = exp(x)
    d["norm_logits"] = v["counts"] * d["counts"]
    # norm_logits = logits - logit_maxes, logit_maxes broadcast over the row
    d["logit_maxes"] = -d["norm_logits"].sum(1, keepdim=True)
    d["logits"] = d["norm_logits"].clone()
    # logit_maxes copies one entry per row: its gradient goes back to that entry
    d["logits"][torch.arange(n), v["logits"].argmax(1)] += d["logit_maxes"][:, 0]
    # logits = h @ W2 + b2
    d["h"] = d["logits"] @ v["W2"].T
    d["W2"] = v["h"].T @ d["logits"]
    d["b2"] = d["logits"].sum(0)
    # d tanh(x) = 1 - tanh(x)^2; addcmul rounds 1 - h*h once (a fused multiply-add), as PyTorch's
    # own tanh backward does, so the rows below stay bit-exact; (1.0 - h**2) * dh is equal to ~1e-9
    d["hpreact"] = torch.addcmul(torch.ones_like(v["h"]), v["h"], v["h"], value=-1.0) * d["h"]
    # hpreact = bngain * bnraw + bnbias, gain and bias broadcast over the batch
    d["bngain"] = (v["bnraw"] * d["hpreact"]).sum(0, keepdim=True)
    d["bnbias"] = d["hpreact"].sum(0, keepdim=True)
    d["bnraw"] = v["bngain"] * d["hpreact"]
    # bnraw = bndiff * bnvar_inv, bnvar_inv broadcast over the batch
    d["bnvar_inv"] = (v["bndiff"] * d["bnraw"]).sum(0, keepdim=True)
    d["bndiff"] = v["bnvar_inv"] * d["bnraw"]
    # d (x + eps)^-1/2 = -1/2 (x + eps)^-3/2
    d["bnvar"] = -0.5 * (v["bnvar"] + BN_EPS) ** -1.5 * d["bnvar_inv"]
    # bnvar = 1/(n-1) * sum over the batch of bndiff2
    d["bndiff2"] = 1.0 / (n - 1) * torch.ones_like(v["bndiff2"]) * d["bnvar"]
    # bndiff also feeds bndiff2 = bndiff^2
    d["bndiff"] += 2 * v["bndiff"] * d["bndiff2"]
    # bndiff = hprebn - bnmeani, bnmeani broadcast over the batch
    d["bnmeani"] = -d["bndiff"].sum(0, keepdim=True)
    d["hprebn"] = d["bndiff"].clone()
    # hprebn also feeds bnmeani = 1/n * sum over the batch
    d["hprebn"] += 1.0 / n * d["bnmeani"]
    # hprebn = embcat @ W1 + b1
    d["embcat"] = d["hprebn"] @ v["W1"].T
    d["W1"] = v["embcat"].T @ d["hprebn"]
    d["b1"] = d["hprebn"].sum(0)
    # embcat is a view of emb
    d["emb"] = d["embcat"].view(v["emb"].shape)
    # emb = C[Xb]: each row of C collects the gradients of every position that looked it up
    d["C"] = torch.zeros_like(v["C"]).index_add_(0, v["Xb"].view(-1), d["emb"].view(-1, v["C"].shape[1]))
    return d


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


@dataclass(frozen=True)
class CmpRow:
    name: str               # the tensor whose gradient is compared, e.g. 'bnvar'
    exact: bool             # bit for bit equal to autograd
    approximate: bool       # torch.allclose with its default tolerances
    maxdiff: float          # max |mine - autograd|
    relerr: float           # maxdiff / max |autograd|
    ok: bool                # approximate and maxdiff <= CHECK_MAXDIFF


def cmp(name, mine, reference):
    """One row of the lecture's comparison of a hand-written gradient with autograd's."""
    maxdiff = (mine - reference).abs().max().item()
    scale = reference.abs().max().item()
    approximate = torch.allclose(mine, reference)
    return CmpRow(
        name, torch.equal(mine, reference), approximate, maxdiff, maxdiff / scale if scale else maxdiff,
        approximate and maxdiff <= CHECK_MAXDIFF,
    )


def check_exercises(dtype=torch.float32):
    """The three exercises on the lecture's batch: {title: [CmpRow, ...]}."""
    tensors = lecture_setup(dtype)
    v = forward(tensors)
    reference = autograd_gradients(tensors)
    mine = backward_by_hand(v)
    dhpreact = mine["hpreact"]
    return {
        "exercise 1: backprop through every intermediate": [cmp(name, mine[name], reference[name]) for name in GRADIENT_NAMES],
        "exercise 2: cross-entropy in one step": [cmp("logits", cross_entropy_backward(v["logits"], v["Yb"]), reference["logits"])],
        "exercise 3: BatchNorm in one step": [
            cmp("hprebn", batchnorm_backward(dhpreact, v["bngain"], v["bnvar_inv"], v["bnraw"]), reference["hprebn"])
        ],
    }


def format_cmp(rows):
    """The rows as a table: name | exact | approximate | maxdiff | relerr | pass mark."""
    lines = [f"{'tensor':15s} | {'exact':5s} | {'approximate':11s} | {'maxdiff':>8s} | {'relerr':>8s} |"]
    for r in rows:
        lines.append(
            f"{r.name:15s} | {str(r.exact):5s} | {str(r.approximate):11s} | {r.maxdiff:8.1e} | {r.relerr:8.1e} | "
            + ("ok" if r.ok else "FAIL")
        )
    return "\n".join(lines)


def format_layer_rows(rows):
    """gradcheck's float64 rows as a table: layer | gradient | vs autograd | vs finite differences | pass mark."""
    lines = [f"{'layer':28s} | {'grad':9s} | {'maxdiff':>8s} | {'relative':>8s} | {'fd relerr':>9s} |"]
    for r in rows:
        relative = r.autograd_maxdiff / r.scale if r.scale else r.autograd_maxdiff
        lines.append(
            f"{r.layer:28s} | {r.tensor:9s} | {r.autograd_maxdiff:8.1e} | {relative:8.1e} | {r.fd_relerr:9.1e} | "
            + ("ok" if r.ok else "FAIL")
        )
    return "\n".join(lines)


def check_report():
    """The text `handprop check` prints, and whether every row passed."""
    exercises = check_exercises()
    layer_rows = check_layers()
    sections = [f"{title} (float32, against autograd)\n{format_cmp(rows)}" for title, rows in exercises.items()]
    sections.append(
        "every layer and the loss (float64; maxdiff against an autograd twin, relative to its largest entry;"
        " fd relerr against centred finite differences)\n" + format_layer_rows(layer_rows)
    )
    rows = [r for rows in exercises.values() for r in rows] + layer_rows
    failed = sum(not r.ok for r in rows)
    summary = f"{len(rows) - len(layer_rows)} float32 rows and {len(layer_rows)} float64 rows: " + (
        "all pass" if not failed else f"{failed} FAIL"
    )
    return "\n\n".join(sections + [summary]), failed == 0


def grade(namespace, file=None):
    """Grade a learner's gradients found by the lecture's names, e.g. grade(globals()); see grade.py."""
    from .grade import grade_namespace

    return grade_namespace(namespace, file)
