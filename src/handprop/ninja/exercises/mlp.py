"""The lecture's part 4, "becoming a backprop ninja": a one-hidden-layer MLP with BatchNorm, in 20 small steps.

n_embd 10, n_hidden 64, one Bessel-corrected BatchNorm layer, a batch of 32 from the lecture's
training split: every intermediate has the lecture's name. Exercise 1 backpropagates through every
step (26 gradients); exercises 2 and 3 redo the cross-entropy and the BatchNorm layer in one step each.
"""

import functools

from ...data import Vocab, build_examples, load_corpus, split_items
from ..exercise import Exercise, ForwardSlip, Fused, Pitfall

BLOCK_SIZE = 3      # characters of context, as the lecture's setup below writes it


@functools.cache
def training_split():
    """The lecture's training examples of the bundled names.txt, built once: Xtr (182625, 3), Ytr (182625,)."""
    items = load_corpus().items
    return build_examples(split_items(items)[0], Vocab.from_items(items), BLOCK_SIZE)


SETUP = """\
from handprop.ninja.exercises.mlp import training_split

Xtr, Ytr = training_split()     # the lecture's training split of names.txt: (182625, 3), (182625,)
vocab_size, n_embd, n_hidden, block_size = 27, 10, 64, 3
n = 32                          # the batch size
g = torch.Generator().manual_seed(2147483647)
C = torch.randn((vocab_size, n_embd), generator=g)                                      # (27, 10)
W1 = torch.randn((n_embd * block_size, n_hidden), generator=g) * (5 / 3) / math.sqrt(n_embd * block_size)  # (30, 64)
b1 = torch.randn(n_hidden, generator=g) * 0.1           # (64,): useless under BatchNorm, but fun to derive
W2 = torch.randn((n_hidden, vocab_size), generator=g) * 0.1                             # (64, 27)
b2 = torch.randn(vocab_size, generator=g) * 0.1                                         # (27,)
ix = torch.randint(0, Xtr.shape[0], (n,), generator=g)
# gain and bias are not 1 and 0, so a wrong backward cannot hide behind them
bngain = 1.0 + 0.1 * torch.randn((1, n_hidden), generator=g)                            # (1, 64)
bnbias = 0.1 * torch.randn((1, n_hidden), generator=g)                                  # (1, 64)
Xb, Yb = Xtr[ix], Ytr[ix]                                                               # (32, 3), (32,)
"""

FORWARD = """\
emb = C[Xb]                                             # (32, 3, 10)
embcat = emb.view(emb.shape[0], -1)                     # (32, 30)
hprebn = embcat @ W1 + b1                               # (32, 64)
bnmeani = 1 / n * hprebn.sum(0, keepdim=True)           # (1, 64)
bndiff = hprebn - bnmeani                               # (32, 64)
bndiff2 = bndiff**2                                     # (32, 64)
bnvar = 1 / (n - 1) * bndiff2.sum(0, keepdim=True)      # (1, 64): Bessel's correction, n-1
bnvar_inv = (bnvar + 1e-5) ** -0.5                      # (1, 64)
bnraw = bndiff * bnvar_inv                              # (32, 64)
hpreact = bngain * bnraw + bnbias                       # (32, 64)
h = torch.tanh(hpreact)                                 # (32, 64)
logits = h @ W2 + b2                                    # (32, 27)
logit_maxes = logits.max(1, keepdim=True).values        # (32, 1)
norm_logits = logits - logit_maxes                      # (32, 27): subtract the max for numerical stability
counts = norm_logits.exp()                              # (32, 27)
counts_sum = counts.sum(1, keepdim=True)                # (32, 1)
counts_sum_inv = counts_sum**-1                         # (32, 1): **-1, not 1.0 / ..., keeps it bit-exact
probs = counts * counts_sum_inv                         # (32, 27)
logprobs = probs.log()                                  # (32, 27)
loss = -logprobs[torch.arange(n), Yb].mean()            # ()
"""

EXERCISE_1 = """\
# exercise 1: backprop through every step
# loss = -mean of the picked log-probabilities: each picked entry gets -1/n
dlogprobs = torch.zeros_like(logprobs)
dlogprobs[torch.arange(n), Yb] = -1.0 / n
# d log(p) = dp / p
dprobs = dlogprobs / probs
# probs = counts * counts_sum_inv: counts_sum_inv (n, 1) was broadcast over the row, so sum it back
dcounts_sum_inv = (counts * dprobs).sum(1, keepdim=True)
dcounts = counts_sum_inv * dprobs
# d x^-1 = -x^-2
dcounts_sum = -(counts_sum**-2) * dcounts_sum_inv
# counts also feeds counts_sum: every entry of a row gets the row's gradient
dcounts += dcounts_sum
# d exp(x) = exp(x)
dnorm_logits = counts * dcounts
# norm_logits = logits - logit_maxes, logit_maxes broadcast over the row
dlogit_maxes = -dnorm_logits.sum(1, keepdim=True)
dlogits = dnorm_logits.clone()
# logit_maxes copies one entry per row: its gradient goes back to that entry
dlogits += F.one_hot(logits.max(1).indices, num_classes=logits.shape[1]) * dlogit_maxes
# logits = h @ W2 + b2
dh = dlogits @ W2.T
dW2 = h.T @ dlogits
db2 = dlogits.sum(0)
# d tanh(x) = 1 - tanh(x)^2; addcmul rounds 1 - h*h once, as PyTorch's own tanh backward does, so it stays
# bit-exact in float32 ((1.0 - h**2) * dh is equal to about 1e-9)
dhpreact = torch.addcmul(torch.ones_like(h), h, h, value=-1.0) * dh
# hpreact = bngain * bnraw + bnbias, gain and bias broadcast over the batch
dbngain = (bnraw * dhpreact).sum(0, keepdim=True)
dbnbias = dhpreact.sum(0, keepdim=True)
dbnraw = bngain * dhpreact
# bnraw = bndiff * bnvar_inv, bnvar_inv broadcast over the batch
dbnvar_inv = (bndiff * dbnraw).sum(0, keepdim=True)
dbndiff = bnvar_inv * dbnraw
# d (x + eps)^-1/2 = -1/2 (x + eps)^-3/2
dbnvar = -0.5 * (bnvar + 1e-5) ** -1.5 * dbnvar_inv
# bnvar = 1/(n-1) * sum over the batch of bndiff2
dbndiff2 = 1.0 / (n - 1) * torch.ones_like(bndiff2) * dbnvar
# bndiff also feeds bndiff2 = bndiff^2
dbndiff += 2 * bndiff * dbndiff2
# bndiff = hprebn - bnmeani, bnmeani broadcast over the batch
dbnmeani = -dbndiff.sum(0, keepdim=True)
dhprebn = dbndiff.clone()
# hprebn also feeds bnmeani = 1/n * sum over the batch
dhprebn += 1.0 / n * dbnmeani
# hprebn = embcat @ W1 + b1
dembcat = dhprebn @ W1.T
dW1 = embcat.T @ dhprebn
db1 = dhprebn.sum(0)
# embcat is a view of emb
demb = dembcat.view(emb.shape)
# emb = C[Xb]: each row of C collects the gradients of every position that looked it up (a scatter-add)
dC = torch.zeros_like(C).index_add_(0, Xb.view(-1), demb.view(-1, C.shape[1]))
"""

FUSED = (
    Fused("logits", "exercise 2: cross-entropy in one step", """\
# softmax(logits) - onehot(Yb), over n for the mean
dlogits = F.softmax(logits, 1)
dlogits[torch.arange(n), Yb] -= 1
dlogits /= n
"""),
    Fused("hprebn", "exercise 3: BatchNorm in one step", """\
# bnvar divides by n-1, hence the n/(n-1) of the last term
dhprebn = bngain * bnvar_inv / n * (
    n * dhpreact - dhpreact.sum(0, keepdim=True) - n / (n - 1) * bnraw * (dhpreact * bnraw).sum(0, keepdim=True)
)
"""),
)

PITFALLS = (
    Pitfall("C", """\
dC = torch.zeros_like(C)
for k in range(Xb.shape[0]):
    dC[Xb[k]] += demb[k]
""", "wrong only in rows that Xb looks up more than once: dC[ix] += ... keeps one of the repeated contributions; "
        "accumulate with index_add_ (a scatter-add)"),
    Pitfall("C", """\
dC = torch.zeros_like(C)
for k in range(Xb.shape[0]):
    for j in range(Xb.shape[1]):
        dC[Xb[k]][j] += demb[k, j]
""", "yours is all zeros, as if nothing was ever added to it; note dC[Xb[k]][j] += ... adds to a copy (indexing "
        "with the tensor Xb[k] copies rows): dC[Xb[k, j]] += ... or index_add_ adds to dC itself"),
    Pitfall("hprebn", """\
dhprebn = bngain * bnvar_inv / n * (n * dhpreact - dhpreact.sum(0) - bnraw * (dhpreact * bnraw).sum(0))
""", "this is the fused formula for the biased (1/n) variance, but bnvar divides by n-1: the last term needs the "
        "factor n/(n-1)"),
    Pitfall("bnvar", "dbnvar = -0.5 * bnvar**-1.5 * dbnvar_inv  # no eps\n",
            "the eps of bnvar_inv = (bnvar + eps)**-0.5 belongs in the derivative too"),
    Pitfall("bndiff2", "dbndiff2 = 1 / n * torch.ones_like(bndiff2) * dbnvar\n",
            "off by the factor (n-1)/n: the lecture's bnvar divides by n-1 (Bessel), not n"),
    Pitfall("hpreact", "dhpreact = (1.0 - hpreact**2) * dh\n",
            "tanh's derivative is 1 - tanh(x)**2 = 1 - h**2: take it from the output h, not from hpreact"),
)

FORWARD_SLIPS = (
    ForwardSlip("bnraw", "hprebn - bnmeani * bnvar_inv",
                "this is hprebn - bnmeani * bnvar_inv: operator precedence, the subtraction comes first: "
                "(hprebn - bnmeani) * bnvar_inv"),
    ForwardSlip("bnvar", "bndiff2.mean(0, keepdim=True)",
                "this divides by n (the biased variance); the lecture's BatchNorm divides by n-1 "
                "(Bessel's correction)"),
)

EXERCISE = Exercise(
    name="mlp",
    summary="the lecture's part 4: an MLP with BatchNorm in 20 steps, 26 gradients, then cross-entropy and "
            "BatchNorm in one step each",
    setup_code=SETUP,
    forward_code=FORWARD,
    parameters=("C", "W1", "b1", "W2", "b2", "bngain", "bnbias"),
    gradients=(
        "logprobs", "probs", "counts_sum_inv", "counts_sum", "counts", "norm_logits", "logit_maxes",
        "logits", "h", "W2", "b2", "hpreact", "bngain", "bnbias", "bnraw", "bnvar_inv", "bnvar",
        "bndiff2", "bndiff", "bnmeani", "hprebn", "embcat", "W1", "b1", "emb", "C",
    ),
    solution_code=EXERCISE_1 + "".join(f"\n# {f.title}\n{f.code}" for f in FUSED),
    page="exercises/mlp.md",
    fused=FUSED,
    pitfalls=PITFALLS,
    forward_slips=FORWARD_SLIPS,
    constants=("n",),
)
