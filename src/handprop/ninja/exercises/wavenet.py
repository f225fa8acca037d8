"""The lecture's part 5: a WaveNet-style hierarchy (van den Oord et al. 2016) in 33 small steps.

Eight characters are fused two at a time in three levels: FlattenConsecutive(2) (a view), a Linear
without bias, BatchNorm with the lecture's Bessel-corrected variance, tanh. The first two levels see
(B, T, C) tensors, so their BatchNorm takes its statistics over dims 0 and 1; the third level's view
drops the time axis and its BatchNorm is part 4's, over dim 0. The head is a Linear and the
cross-entropy, whose gradient is the lecture's exercise 2 in one step. Level k's tensors end in _k.
Afterwards, level 1's BatchNorm backward in one step: exercise 3 over (B, T, C).
"""

from ..exercise import Exercise, ForwardSlip, Fused, Pitfall

SETUP = """\
vocab_size, block_size, n_embd, n_hidden = 27, 8, 5, 16
B = 6                           # the batch size
n1, n2, n3 = B * 4, B * 2, B    # the rows each level's BatchNorm averages over: B*T for (B, T, C), then B
eps = 1e-5                      # added to the variance before the inverse square root
g = torch.Generator().manual_seed(2147483647)
Xb = torch.randint(0, vocab_size, (B, block_size), generator=g)     # (6, 8): eight characters of context
Yb = torch.randint(0, vocab_size, (B,), generator=g)                # (6,): the character that follows
C = torch.randn((vocab_size, n_embd), generator=g)                                      # (27, 5)
# gains and biases are not 1 and 0, so a wrong backward cannot hide behind them
W_1 = torch.randn((2 * n_embd, n_hidden), generator=g) * (5 / 3) / math.sqrt(2 * n_embd)     # (10, 16)
bngain_1 = 1.0 + 0.1 * torch.randn(n_hidden, generator=g)                               # (16,)
bnbias_1 = 0.1 * torch.randn(n_hidden, generator=g)                                     # (16,)
W_2 = torch.randn((2 * n_hidden, n_hidden), generator=g) * (5 / 3) / math.sqrt(2 * n_hidden)  # (32, 16)
bngain_2 = 1.0 + 0.1 * torch.randn(n_hidden, generator=g)                               # (16,)
bnbias_2 = 0.1 * torch.randn(n_hidden, generator=g)                                     # (16,)
W_3 = torch.randn((2 * n_hidden, n_hidden), generator=g) * (5 / 3) / math.sqrt(2 * n_hidden)  # (32, 16)
bngain_3 = 1.0 + 0.1 * torch.randn(n_hidden, generator=g)                               # (16,)
bnbias_3 = 0.1 * torch.randn(n_hidden, generator=g)                                     # (16,)
W_out = torch.randn((n_hidden, vocab_size), generator=g) * 0.1                          # (16, 27)
b_out = torch.randn(vocab_size, generator=g) * 0.1                                      # (27,)
"""

FORWARD = """\
emb = C[Xb]                                                     # (6, 8, 5)
x_1 = emb.view(B, 4, 2 * n_embd)                                # (6, 4, 10): FlattenConsecutive(2), pairs of characters
hprebn_1 = x_1 @ W_1                                            # (6, 4, 16): no bias, BatchNorm's bias takes its place
bnmeani_1 = 1 / n1 * hprebn_1.sum((0, 1), keepdim=True)         # (1, 1, 16): over the batch and the positions
bndiff_1 = hprebn_1 - bnmeani_1                                 # (6, 4, 16)
bndiff2_1 = bndiff_1**2                                         # (6, 4, 16)
bnvar_1 = 1 / (n1 - 1) * bndiff2_1.sum((0, 1), keepdim=True)    # (1, 1, 16): Bessel's correction, n-1
bnvar_inv_1 = (bnvar_1 + eps) ** -0.5                           # (1, 1, 16)
bnraw_1 = bndiff_1 * bnvar_inv_1                                # (6, 4, 16)
hpreact_1 = bngain_1 * bnraw_1 + bnbias_1                       # (6, 4, 16)
h_1 = torch.tanh(hpreact_1)                                     # (6, 4, 16)
x_2 = h_1.view(B, 2, 2 * n_hidden)                              # (6, 2, 32): pairs of level-1 positions
hprebn_2 = x_2 @ W_2                                            # (6, 2, 16)
bnmeani_2 = 1 / n2 * hprebn_2.sum((0, 1), keepdim=True)         # (1, 1, 16)
bndiff_2 = hprebn_2 - bnmeani_2                                 # (6, 2, 16)
bndiff2_2 = bndiff_2**2                                         # (6, 2, 16)
bnvar_2 = 1 / (n2 - 1) * bndiff2_2.sum((0, 1), keepdim=True)    # (1, 1, 16)
bnvar_inv_2 = (bnvar_2 + eps) ** -0.5                           # (1, 1, 16)
bnraw_2 = bndiff_2 * bnvar_inv_2                                # (6, 2, 16)
hpreact_2 = bngain_2 * bnraw_2 + bnbias_2                       # (6, 2, 16)
h_2 = torch.tanh(hpreact_2)                                     # (6, 2, 16)
x_3 = h_2.view(B, 2 * n_hidden)                                 # (6, 32): the last pair; the time axis (now 1) dropped
hprebn_3 = x_3 @ W_3                                            # (6, 16)
bnmeani_3 = 1 / n3 * hprebn_3.sum(0, keepdim=True)              # (1, 16): over the batch, as in part 4
bndiff_3 = hprebn_3 - bnmeani_3                                 # (6, 16)
bndiff2_3 = bndiff_3**2                                         # (6, 16)
bnvar_3 = 1 / (n3 - 1) * bndiff2_3.sum(0, keepdim=True)         # (1, 16)
bnvar_inv_3 = (bnvar_3 + eps) ** -0.5                           # (1, 16)
bnraw_3 = bndiff_3 * bnvar_inv_3                                # (6, 16)
hpreact_3 = bngain_3 * bnraw_3 + bnbias_3                       # (6, 16)
h_3 = torch.tanh(hpreact_3)                                     # (6, 16)
logits = h_3 @ W_out + b_out                                    # (6, 27)
loss = F.cross_entropy(logits, Yb)                              # ()
"""

STEP_BY_STEP = """\
# step 1: backprop through every step
# the head: loss = F.cross_entropy(logits, Yb), in one step as the lecture's exercise 2: (softmax - onehot) / B
dlogits = F.softmax(logits, 1)
dlogits[torch.arange(B), Yb] -= 1
dlogits /= B
# logits = h_3 @ W_out + b_out
dh_3 = dlogits @ W_out.T
dW_out = h_3.T @ dlogits
db_out = dlogits.sum(0)

# level 3, (6, 16): part 4's BatchNorm over dim 0
# d tanh(x) = 1 - tanh(x)^2, from the output; addcmul rounds 1 - h*h once, as PyTorch's tanh backward does
dhpreact_3 = torch.addcmul(torch.ones_like(h_3), h_3, h_3, value=-1.0) * dh_3
# hpreact_3 = bngain_3 * bnraw_3 + bnbias_3: gain and bias (16,) broadcast over the batch
dbngain_3 = (bnraw_3 * dhpreact_3).sum(0)
dbnbias_3 = dhpreact_3.sum(0)
dbnraw_3 = bngain_3 * dhpreact_3
# bnraw_3 = bndiff_3 * bnvar_inv_3, bnvar_inv_3 (1, 16) broadcast over the batch
dbnvar_inv_3 = (bndiff_3 * dbnraw_3).sum(0, keepdim=True)
dbndiff_3 = bnvar_inv_3 * dbnraw_3
# d (v + eps)^-1/2 = -1/2 (v + eps)^-3/2
dbnvar_3 = -0.5 * (bnvar_3 + eps) ** -1.5 * dbnvar_inv_3
# bnvar_3 = 1/(n3-1) * sum over the batch of bndiff2_3
dbndiff2_3 = 1 / (n3 - 1) * torch.ones_like(bndiff2_3) * dbnvar_3
# bndiff_3 also feeds bndiff2_3 = bndiff_3^2
dbndiff_3 += 2 * bndiff_3 * dbndiff2_3
# bndiff_3 = hprebn_3 - bnmeani_3, bnmeani_3 broadcast over the batch
dbnmeani_3 = -dbndiff_3.sum(0, keepdim=True)
dhprebn_3 = dbndiff_3.clone()
# hprebn_3 also feeds bnmeani_3 = 1/n3 * sum over the batch
dhprebn_3 += 1 / n3 * dbnmeani_3
# hprebn_3 = x_3 @ W_3
dx_3 = dhprebn_3 @ W_3.T
dW_3 = x_3.T @ dhprebn_3
# x_3 is a view of h_2: the same view backwards (a view moves no numbers)
dh_2 = dx_3.view(h_2.shape)

# level 2, (6, 2, 16): BatchNorm's statistics over dims 0 and 1, n2 = B*2 rows
dhpreact_2 = torch.addcmul(torch.ones_like(h_2), h_2, h_2, value=-1.0) * dh_2
# gain and bias (16,) broadcast over the batch and the positions: sum both back
dbngain_2 = (bnraw_2 * dhpreact_2).sum((0, 1))
dbnbias_2 = dhpreact_2.sum((0, 1))
dbnraw_2 = bngain_2 * dhpreact_2
# bnvar_inv_2 (1, 1, 16) broadcast over dims 0 and 1
dbnvar_inv_2 = (bndiff_2 * dbnraw_2).sum((0, 1), keepdim=True)
dbndiff_2 = bnvar_inv_2 * dbnraw_2
dbnvar_2 = -0.5 * (bnvar_2 + eps) ** -1.5 * dbnvar_inv_2
# bnvar_2 = 1/(n2-1) * sum over dims 0 and 1 of bndiff2_2
dbndiff2_2 = 1 / (n2 - 1) * torch.ones_like(bndiff2_2) * dbnvar_2
dbndiff_2 += 2 * bndiff_2 * dbndiff2_2
dbnmeani_2 = -dbndiff_2.sum((0, 1), keepdim=True)
dhprebn_2 = dbndiff_2.clone()
# hprebn_2 also feeds bnmeani_2 = 1/n2 * sum over dims 0 and 1
dhprebn_2 += 1 / n2 * dbnmeani_2
# hprebn_2 = x_2 @ W_2 multiplies every (example, position) row by W_2: the matmul broadcasts over dim 0
dx_2 = dhprebn_2 @ W_2.T
# W_2 is shared by all those rows: flatten them to (n2, .) and sum their products
dW_2 = x_2.view(-1, 2 * n_hidden).T @ dhprebn_2.view(-1, n_hidden)
# x_2 is a view of h_1
dh_1 = dx_2.view(h_1.shape)

# level 1, (6, 4, 16): as level 2, n1 = B*4 rows
dhpreact_1 = torch.addcmul(torch.ones_like(h_1), h_1, h_1, value=-1.0) * dh_1
dbngain_1 = (bnraw_1 * dhpreact_1).sum((0, 1))
dbnbias_1 = dhpreact_1.sum((0, 1))
dbnraw_1 = bngain_1 * dhpreact_1
dbnvar_inv_1 = (bndiff_1 * dbnraw_1).sum((0, 1), keepdim=True)
dbndiff_1 = bnvar_inv_1 * dbnraw_1
dbnvar_1 = -0.5 * (bnvar_1 + eps) ** -1.5 * dbnvar_inv_1
dbndiff2_1 = 1 / (n1 - 1) * torch.ones_like(bndiff2_1) * dbnvar_1
dbndiff_1 += 2 * bndiff_1 * dbndiff2_1
dbnmeani_1 = -dbndiff_1.sum((0, 1), keepdim=True)
dhprebn_1 = dbndiff_1.clone()
dhprebn_1 += 1 / n1 * dbnmeani_1
dx_1 = dhprebn_1 @ W_1.T
dW_1 = x_1.view(-1, 2 * n_embd).T @ dhprebn_1.view(-1, n_hidden)
# x_1 is a view of emb
demb = dx_1.view(emb.shape)
# emb = C[Xb]: each row of C collects the gradients of every position that looked it up (a scatter-add)
dC = torch.zeros_like(C).index_add_(0, Xb.view(-1), demb.view(-1, n_embd))
"""

FUSED = (
    Fused("hprebn_1", "step 2: BatchNorm over (B, T, C) in one step, exercise 3 with sums over dims 0 and 1", """\
dhprebn_1 = bngain_1 * bnvar_inv_1 / n1 * (
    n1 * dhpreact_1 - dhpreact_1.sum((0, 1), keepdim=True)
    - n1 / (n1 - 1) * bnraw_1 * (dhpreact_1 * bnraw_1).sum((0, 1), keepdim=True)
)
"""),
)

PITFALLS = (
    Pitfall("hpreact_3", "dhpreact_3 = (1.0 - hpreact_3**2) * dh_3\n",
            "tanh's derivative is 1 - tanh(x)**2 = 1 - h_3**2: take it from the output h_3, not from hpreact_3"),
    Pitfall("W_2", "dW_2 = x_2.view(2 * n_hidden, -1) @ dhprebn_2.view(-1, n_hidden)\n",
            "view(2 * n_hidden, -1) reads the numbers in memory order into a new shape, it does not transpose: "
            "flatten the rows first and then transpose, x_2.view(-1, 2 * n_hidden).T"),
    Pitfall("W_1", "dW_1 = x_1.transpose(1, 2) @ dhprebn_1\n",
            "this batched product is one (10, 16) gradient per example; W_1 is shared by every example, so add them "
            "up (.sum(0)), or flatten the rows first: x_1.view(-1, 2 * n_embd).T @ dhprebn_1.view(-1, n_hidden)"),
    Pitfall("h_1", "dh_1 = torch.cat([dx_2[:, :, :n_hidden], dx_2[:, :, n_hidden:]], 1)\n",
            "x_2 = h_1.view(B, 2, 2 * n_hidden) puts positions 0 and 1 side by side, then 2 and 3: concatenating the "
            "halves along dim 1 lists positions 0, 2, 1, 3. A view is undone by the view back, dx_2.view(h_1.shape)"),
    Pitfall("bnvar_inv_1", "dbnvar_inv_1 = (bndiff_1 * dbnraw_1).sum(0, keepdim=True)\n",
            "BatchNorm over (B, T, C) takes its statistics over dims 0 and 1 (every example and every position), so "
            "bnvar_inv_1 is (1, 1, 16): sum over both, .sum((0, 1), keepdim=True), not over dim 0 only"),
    Pitfall("bngain_1", "dbngain_1 = (bnraw_1 * dhpreact_1).sum(0)\n",
            "bngain_1 (16,) scales every position of every example: sum its gradient over dims 0 and 1, "
            ".sum((0, 1)), back to its shape (16,)"),
    Pitfall("hprebn_1", """\
dhprebn_1 = bngain_1 * bnvar_inv_1 / n1 * (
    n1 * dhpreact_1 - dhpreact_1.sum(0) - n1 / (n1 - 1) * bnraw_1 * (dhpreact_1 * bnraw_1).sum(0)
)
""", "this is part 4's one-step formula with its sums over dim 0 only, one sum per position; BatchNorm over "
        "(B, T, C) sums over dims 0 and 1, .sum((0, 1), keepdim=True), the n1 = B*4 rows its statistics came from"),
    Pitfall("hprebn_1", "dhprebn_1 = dbndiff_1 + 1 / B * dbnmeani_1\n",
            "bnmeani_1 averages over n1 = B*4 rows (every example and every position), not over the batch size B: "
            "each row gets 1/n1 of dbnmeani_1"),
    Pitfall("bndiff2_2", "dbndiff2_2 = 1 / (B - 1) * torch.ones_like(bndiff2_2) * dbnvar_2\n",
            "bnvar_2 sums over n2 = B*2 rows (every example and every position) and divides by n2-1, not by B-1"),
    Pitfall("C", "dC = torch.zeros_like(C)\ndC[Xb] += demb\n",
            "wrong in the rows of C that Xb looks up more than once: dC[Xb] += demb writes each row once, keeping "
            "one of its repeated contributions; accumulate with index_add_ (a scatter-add)"),
    Pitfall("bndiff_2", "dbndiff_2 = 2 * bndiff_2 * dbndiff2_2\n",
            "bndiff_2 is read twice, by bndiff2_2 = bndiff_2**2 and by bnraw_2: add this branch's gradient to the "
            "one from bnraw_2 (+=) instead of overwriting it"),
)

FORWARD_SLIPS = (
    ForwardSlip("bnmeani_1", "hprebn_1.mean(0, keepdim=True)",
                "this is a mean over dim 0 only, (1, 4, 16): one mean per position. BatchNorm over (B, T, C) "
                "averages over dims 0 and 1, .sum((0, 1), keepdim=True) / n1, (1, 1, 16)"),
    ForwardSlip("bnvar_1", "bndiff2_1.mean((0, 1), keepdim=True)",
                "this divides by n1 (the biased variance); the lecture's BatchNorm divides by n1-1 (Bessel's "
                "correction)"),
    ForwardSlip("x_2", "torch.cat([h_1[:, :2], h_1[:, 2:]], 2)",
                "this pairs positions 0 with 2 and 1 with 3; FlattenConsecutive(2) pairs neighbours, 0 with 1 and 2 "
                "with 3: h_1.view(B, 2, 2 * n_hidden)"),
)

EXERCISE = Exercise(
    name="wavenet",
    summary="part 5's WaveNet-style hierarchy in 33 steps: 44 gradients through views and (B, T, C) BatchNorm, "
            "then that BatchNorm in one step",
    setup_code=SETUP,
    forward_code=FORWARD,
    parameters=("C", "W_1", "bngain_1", "bnbias_1", "W_2", "bngain_2", "bnbias_2", "W_3", "bngain_3", "bnbias_3",
                "W_out", "b_out"),
    gradients=(
        "logits", "h_3", "W_out", "b_out",
        "hpreact_3", "bngain_3", "bnbias_3", "bnraw_3", "bnvar_inv_3", "bnvar_3", "bndiff2_3", "bndiff_3",
        "bnmeani_3", "hprebn_3", "x_3", "W_3", "h_2",
        "hpreact_2", "bngain_2", "bnbias_2", "bnraw_2", "bnvar_inv_2", "bnvar_2", "bndiff2_2", "bndiff_2",
        "bnmeani_2", "hprebn_2", "x_2", "W_2", "h_1",
        "hpreact_1", "bngain_1", "bnbias_1", "bnraw_1", "bnvar_inv_1", "bnvar_1", "bndiff2_1", "bndiff_1",
        "bnmeani_1", "hprebn_1", "x_1", "W_1", "emb", "C",
    ),
    solution_code=STEP_BY_STEP + "".join(f"\n# {f.title}\n{f.code}" for f in FUSED),
    page="exercises/wavenet.md",
    fused=FUSED,
    pitfalls=PITFALLS,
    forward_slips=FORWARD_SLIPS,
    constants=("vocab_size", "block_size", "n_embd", "n_hidden", "B", "n1", "n2", "n3", "eps"),
)
