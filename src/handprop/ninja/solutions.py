"""Becoming a backprop ninja: handprop's own solutions to the lecture's exercises, and the `check` report.

Exercise 1 backpropagates by hand through every step of lecture.py's forward; exercise 2
does the cross-entropy in one fused step and exercise 3 the BatchNorm layer (both formulas
are in lecture.py). Each result is compared with autograd in the lecture's `cmp` format;
`check_report` adds gradcheck's float64 rows for every layer of the library.
"""

from dataclasses import dataclass

import torch

from ..gradcheck import relative_maxdiff
from .lecture import (
    BN_EPS,
    GRADIENT_NAMES,
    autograd_reference,
    batchnorm_backward,
    cross_entropy_backward,
    forward,
    lecture_setup,
)

CHECK_MAXDIFF = 1e-8        # a float32 cmp row passes when approximate and maxdiff is at most this


def backward_by_hand(v):
    """Exercise 1: dloss/dx for all 26 tensors, one step at a time back through lecture.forward's values v."""
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


@dataclass(frozen=True)
class CmpRow:
    name: str               # the tensor whose gradient is compared, e.g. 'bnvar'
    exact: bool             # bit for bit equal to autograd
    approximate: bool       # torch.allclose with its default tolerances
    maxdiff: float          # max |mine - autograd|
    relerr: float           # maxdiff relative to max |autograd|
    ok: bool                # approximate and maxdiff <= CHECK_MAXDIFF


def cmp(name, mine, reference):
    """One row of the lecture's comparison of a hand-written gradient with autograd's."""
    maxdiff = (mine - reference).abs().max().item()
    approximate = torch.allclose(mine, reference)
    return CmpRow(
        name, torch.equal(mine, reference), approximate, maxdiff,
        relative_maxdiff(maxdiff, reference.abs().max().item()), approximate and maxdiff <= CHECK_MAXDIFF,
    )


def check_exercises(dtype=torch.float32):
    """The three exercises on the lecture's batch: {title: [CmpRow, ...]}."""
    tensors = lecture_setup(dtype)
    v = forward(tensors)
    reference = autograd_reference(tensors)
    mine = backward_by_hand(v)
    fused_logits = cross_entropy_backward(v["logits"], v["Yb"])
    fused_hprebn = batchnorm_backward(mine["hpreact"], v["bngain"], v["bnvar_inv"], v["bnraw"])
    return {
        "exercise 1: backprop through every intermediate": [
            cmp(name, mine[name], reference[name]) for name in GRADIENT_NAMES
        ],
        "exercise 2: cross-entropy in one step": [cmp("logits", fused_logits, reference["logits"])],
        "exercise 3: BatchNorm in one step": [cmp("hprebn", fused_hprebn, reference["hprebn"])],
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
    wide, grad = max([28] + [len(r.layer) for r in rows]), max([9] + [len(r.tensor) for r in rows])
    lines = [f"{'layer':{wide}s} | {'grad':{grad}s} | {'maxdiff':>8s} | {'relative':>8s} | {'fd relerr':>9s} |"]
    for r in rows:
        relative = relative_maxdiff(r.autograd_maxdiff, r.scale)
        lines.append(
            f"{r.layer:{wide}s} | {r.tensor:{grad}s} | {r.autograd_maxdiff:8.1e} | {relative:8.1e} | "
            f"{r.fd_relerr:9.1e} | " + ("ok" if r.ok else "FAIL")
        )
    return "\n".join(lines)


def check_report(layer_rows):
    """The text `handprop check` prints, given gradcheck's float64 rows, and whether every row passed."""
    exercises = check_exercises()
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
