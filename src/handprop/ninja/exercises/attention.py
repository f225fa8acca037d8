"""Multi-head causal self-attention (GPT-2's layout) in 20 small steps, under a fixed random upstream gradient.

A batch of 4 sequences of 5 positions with 12 channels, 2 heads of 6: the q/k/v projection, the
split into heads, the scores, the scale, the mask, the max-subtracted softmax (named as the
lecture names its cross-entropy's softmax), the weighted values, the merge and the output
projection. Exercise 1 backpropagates through every step (24 gradients); exercise 2 redoes the
mask and the softmax in one step, the row form of the softmax backward.
"""

from ..exercise import Exercise, ForwardSlip, Fused, Pitfall

SETUP = """\
B, T, C = 4, 5, 12              # batch, positions (time), channels
n_head = 2
head_size = C // n_head         # 6 channels per head
g = torch.Generator().manual_seed(2147483647)
x = torch.randn((B, T, C), generator=g)                         # (4, 5, 12): the input, one vector per position
W_qkv = torch.randn((C, 3 * C), generator=g) / C**0.5           # (12, 36): queries, keys and values side by side
b_qkv = torch.randn(3 * C, generator=g) * 0.1                   # (36,)
W_proj = torch.randn((C, C), generator=g) / C**0.5              # (12, 12): the output projection
b_proj = torch.randn(C, generator=g) * 0.1                      # (12,)
tril = torch.tril(torch.ones(T, T))                             # (5, 5): 1 where position t may see position s <= t
# the exercise ends in out, not in a loss: a fixed random gradient dloss/dout stands for the rest of a network
upstream = torch.randn((B, T, C), generator=g)                  # (4, 5, 12)
"""

FORWARD = """\
qkv = x @ W_qkv + b_qkv                                     # (4, 5, 36): the three projections in one matmul
q = qkv[:, :, :C]                                           # (4, 5, 12): queries, the heads side by side
k = qkv[:, :, C:2 * C]                                      # (4, 5, 12): keys
v = qkv[:, :, 2 * C:]                                       # (4, 5, 12): values
qh = q.view(B, T, n_head, head_size).transpose(1, 2)        # (4, 2, 5, 6): split into heads
kh = k.view(B, T, n_head, head_size).transpose(1, 2)        # (4, 2, 5, 6)
vh = v.view(B, T, n_head, head_size).transpose(1, 2)        # (4, 2, 5, 6)
scores = qh @ kh.transpose(-2, -1)                          # (4, 2, 5, 5): query t against key s
scores_scaled = scores * head_size**-0.5                    # (4, 2, 5, 5): keeps the scores' spread near 1
scores_masked = scores_scaled.masked_fill(tril == 0, -1e4)  # (4, 2, 5, 5): the future gets -1e4, exp(-1e4) = 0
score_maxes = scores_masked.max(-1, keepdim=True).values    # (4, 2, 5, 1)
norm_scores = scores_masked - score_maxes                   # (4, 2, 5, 5): subtract the max for numerical stability
counts = norm_scores.exp()                                  # (4, 2, 5, 5)
counts_sum = counts.sum(-1, keepdim=True)                   # (4, 2, 5, 1)
counts_sum_inv = counts_sum**-1                             # (4, 2, 5, 1)
att = counts * counts_sum_inv                               # (4, 2, 5, 5): each row sums to 1, 0 on the future
yh = att @ vh                                               # (4, 2, 5, 6): each position's mix of the values
y = yh.transpose(1, 2).contiguous().view(B, T, C)           # (4, 5, 12): the heads side by side again
out = y @ W_proj + b_proj                                   # (4, 5, 12)
loss = (out * upstream).sum()                               # (): dloss/dout is upstream
"""

EXERCISE_1 = """\
# exercise 1: backprop through every step
# loss = sum(out * upstream)
dout = upstream.clone()
# out = y @ W_proj + b_proj at every (b, t): each position is a row of one matmul, and W_proj, b_proj serve them all
dy = dout @ W_proj.T
dW_proj = y.reshape(-1, C).T @ dout.reshape(-1, C)
db_proj = dout.sum((0, 1))
# y merged the heads: undo the merge, view then transpose back to (B, n_head, T, head_size)
dyh = dy.view(B, T, n_head, head_size).transpose(1, 2)
# yh = att @ vh: dA = dY V^T, dV = A^T dY (each value s collects from every query t that read it)
datt = dyh @ vh.transpose(-2, -1)
dvh = att.transpose(-2, -1) @ dyh
# att = counts * counts_sum_inv: counts_sum_inv (.., T, 1) was broadcast over the row, so sum it back
dcounts_sum_inv = (counts * datt).sum(-1, keepdim=True)
dcounts = counts_sum_inv * datt
# d x^-1 = -x^-2
dcounts_sum = -(counts_sum**-2) * dcounts_sum_inv
# counts also feeds counts_sum: every entry of a row gets the row's gradient
dcounts += dcounts_sum
# d exp(x) = exp(x); counts is 0 on the future, so no gradient gets there
dnorm_scores = counts * dcounts
# norm_scores = scores_masked - score_maxes, score_maxes broadcast over the row
dscore_maxes = -dnorm_scores.sum(-1, keepdim=True)
dscores_masked = dnorm_scores.clone()
# score_maxes copies one entry per row: its gradient goes back to that entry
dscores_masked += F.one_hot(scores_masked.argmax(-1), T) * dscore_maxes
# masked_fill replaced the future by a constant: no gradient flows to those entries of scores_scaled
dscores_scaled = dscores_masked.masked_fill(tril == 0, 0)
# scores_scaled = scores * head_size**-0.5: the same factor in the backward
dscores = dscores_scaled * head_size**-0.5
# scores = qh @ kh^T: dQ = dS K, dK = dS^T Q (keys are the columns of scores)
dqh = dscores @ kh
dkh = dscores.transpose(-2, -1) @ qh
# undo the split in reverse: transpose back to (B, T, n_head, head_size), then the heads side by side
dq = dqh.transpose(1, 2).reshape(B, T, C)
dk = dkh.transpose(1, 2).reshape(B, T, C)
dv = dvh.transpose(1, 2).reshape(B, T, C)
# q, k, v are the three thirds of qkv
dqkv = torch.cat([dq, dk, dv], dim=-1)
# qkv = x @ W_qkv + b_qkv, as for out
dx = dqkv @ W_qkv.T
dW_qkv = x.reshape(-1, C).T @ dqkv.reshape(-1, 3 * C)
db_qkv = dqkv.sum((0, 1))
"""

FUSED = (
    Fused("scores_scaled", "exercise 2: the mask and the softmax backward in one step, "
          "att * (datt - rowsum(att * datt))", """\
dscores_scaled = att * (datt - (att * datt).sum(-1, keepdim=True))
"""),
)

PITFALLS = (
    Pitfall("scores", "dscores = dscores_scaled\n",
            "scores_scaled = scores * head_size**-0.5, so the backward multiplies by the same head_size**-0.5: "
            "yours leaves the scale out"),
    Pitfall("scores", "dscores = dscores_scaled * head_size**0.5\n",
            "the backward multiplies by the forward's own factor head_size**-0.5; it does not undo it with "
            "head_size**0.5"),
    Pitfall("scores_scaled", "dscores_scaled = att * datt\n",
            "the softmax backward is missing the row-sum term: every entry of a row moves the row's sum, so "
            "dscores_scaled = att * (datt - (att * datt).sum(-1, keepdim=True))"),
    Pitfall("scores_scaled", """\
dscores_scaled = F.softmax(scores_scaled, -1) * (datt - (F.softmax(scores_scaled, -1) * datt).sum(-1, keepdim=True))
""", "gradient let into masked positions: softmax(scores_scaled) is the softmax without the mask, not 0 on the "
        "future; use att, the masked softmax, which is 0 there"),
    Pitfall("att", "datt = vh @ dyh.transpose(-2, -1)\n",
            "the operands' order is swapped: yh = att @ vh gives datt = dyh @ vh.transpose(-2, -1); "
            "vh @ dyh.transpose(-2, -1) is its transpose (keys in the rows, queries in the columns)"),
    Pitfall("vh", "dvh = att @ dyh\n",
            "yh = att @ vh sums over the key position s, so value s collects from every query t that read it: "
            "dvh = att.transpose(-2, -1) @ dyh"),
    Pitfall("kh", "dkh = dscores @ qh\n",
            "scores = qh @ kh^T is not symmetric in qh and kh: keys are the columns of scores, so "
            "dkh = dscores.transpose(-2, -1) @ qh"),
    Pitfall("q", "dq = dqh.reshape(B, T, C)\n",
            "undo the split in reverse: qh is q.view(B, T, n_head, head_size).transpose(1, 2), so transpose(1, 2) "
            "back first, then put the heads side by side; reshaping (B, n_head, T, head_size) directly mixes heads "
            "and positions"),
    Pitfall("yh", "dyh = dy.view(B, n_head, T, head_size)\n",
            "y was merged as yh.transpose(1, 2) viewed (B, T, C): undo it with dy.view(B, T, n_head, head_size) "
            "then transpose(1, 2); viewing straight to (B, n_head, T, head_size) mixes heads and positions"),
    Pitfall("counts", "dcounts = counts_sum_inv * datt\n",
            "counts feeds two steps, att and counts_sum: add the second path, dcounts += dcounts_sum"),
    Pitfall("W_proj", "dW_proj = dout.reshape(-1, C).T @ y.reshape(-1, C)\n",
            "the matmul's operands are swapped: dW_proj = y^T @ dout (inputs transposed times the output's "
            "gradient); dout^T @ y is its transpose, of the same shape only because W_proj is square"),
)

FORWARD_SLIPS = (
    ForwardSlip("scores_masked", "scores_scaled.masked_fill(tril == 0, 0)",
                "the future is filled with 0, and exp(0) = 1 still gives it weight: fill with -1e4 (or -inf) so "
                "that its exp is 0"),
    ForwardSlip("scores_scaled", "scores / head_size",
                "the scale is 1/sqrt(head_size), head_size**-0.5, not 1/head_size"),
    ForwardSlip("qh", "q.reshape(B, n_head, T, head_size)",
                "reshaping (B, T, C) straight to (B, n_head, T, head_size) mixes positions into heads: "
                "view(B, T, n_head, head_size), then transpose(1, 2)"),
    ForwardSlip("y", "yh.reshape(B, T, C)",
                "merging without transpose(1, 2) mixes heads and positions: yh.transpose(1, 2), then the view"),
)

EXERCISE = Exercise(
    name="attention",
    summary="multi-head causal self-attention in 20 steps (heads, scale, mask, softmax), then the softmax in one step",
    setup_code=SETUP,
    forward_code=FORWARD,
    parameters=("x", "W_qkv", "b_qkv", "W_proj", "b_proj"),
    gradients=(
        "out", "y", "W_proj", "b_proj", "yh", "att", "vh", "counts_sum_inv", "counts_sum", "counts",
        "norm_scores", "score_maxes", "scores_masked", "scores_scaled", "scores", "qh", "kh",
        "q", "k", "v", "qkv", "x", "W_qkv", "b_qkv",
    ),
    solution_code=EXERCISE_1 + "".join(f"\n# {f.title}\n{f.code}" for f in FUSED),
    page="exercises/attention.md",
    fused=FUSED,
    pitfalls=PITFALLS,
    forward_slips=FORWARD_SLIPS,
    constants=("B", "T", "C", "n_head", "head_size"),
)
