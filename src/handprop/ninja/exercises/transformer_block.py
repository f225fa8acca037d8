"""A whole one-block transformer (GPT-2's layout, makemore's model) on a padded batch of four names.

Token and position embedding, a pre-LayerNorm block (LayerNorm, multi-head causal attention,
residual; LayerNorm, an MLP with GELU in its tanh form, chunked; residual), a final LayerNorm,
the head and the cross-entropy over every (b, t) whose target is not padding. LayerNorm and the
softmax are one step each here (the layernorm and attention exercises chunk them): the point is
the gradients that meet, at the residuals, at the embeddings and where a tensor feeds two steps.
"""

from ..exercise import Exercise, ForwardSlip, Pitfall

SETUP = """\
B, T, C = 4, 5, 12              # batch, positions (the block size), channels
n_head = 2
head_size = C // n_head         # 6 channels per head
vocab_size = 27                 # '.' = 0 starts and ends a name, 'a'..'z' = 1..26
eps = 1e-5                      # LayerNorm's, added to the variance
# four names in the sequence form, [0, c1..cn] -> [c1..cn, 0]; after a name's end the input is 0 and the
# target -1 (padding), which the loss leaves out: it counts 16 of the 20 targets
idx = torch.tensor([[0, 5, 13, 13, 1],          # (4, 5): .emma
                    [0, 1, 22, 1, 0],           #         .ava.
                    [0, 11, 1, 9, 0],           #         .kai.
                    [0, 1, 12, 0, 0]])          #         .al..
targets = torch.tensor([[5, 13, 13, 1, 0],      # (4, 5): emma.
                        [1, 22, 1, 0, -1],      #         ava.
                        [11, 1, 9, 0, -1],      #         kai.
                        [1, 12, 0, -1, -1]])    #         al.
g = torch.Generator().manual_seed(2147483647)
wte = torch.randn((vocab_size, C), generator=g)                 # (27, 12): token embedding
wpe = torch.randn((T, C), generator=g)                          # (5, 12): position embedding
# LayerNorm gains near 1 and biases near 0, but not exactly: 1 and 0 would hide a wrong backward
ln1_w = 1 + 0.1 * torch.randn(C, generator=g)                   # (12,)
ln1_b = 0.1 * torch.randn(C, generator=g)                       # (12,)
W_qkv = torch.randn((C, 3 * C), generator=g) / C**0.5           # (12, 36): queries, keys and values side by side
b_qkv = 0.1 * torch.randn(3 * C, generator=g)                   # (36,)
W_attn_proj = torch.randn((C, C), generator=g) / C**0.5         # (12, 12): attention's output projection
b_attn_proj = 0.1 * torch.randn(C, generator=g)                 # (12,)
ln2_w = 1 + 0.1 * torch.randn(C, generator=g)                   # (12,)
ln2_b = 0.1 * torch.randn(C, generator=g)                       # (12,)
W_fc = torch.randn((C, 4 * C), generator=g) / C**0.5            # (12, 48): the MLP widens 4 times
b_fc = 0.1 * torch.randn(4 * C, generator=g)                    # (48,)
W_mlp_proj = torch.randn((4 * C, C), generator=g) / (4 * C)**0.5    # (48, 12): and back
b_mlp_proj = 0.1 * torch.randn(C, generator=g)                  # (12,)
lnf_w = 1 + 0.1 * torch.randn(C, generator=g)                   # (12,)
lnf_b = 0.1 * torch.randn(C, generator=g)                       # (12,)
W_head = torch.randn((C, vocab_size), generator=g) / C**0.5     # (12, 27): no bias, as in GPT-2
tril = torch.tril(torch.ones(T, T))                             # (5, 5): 1 where position t may see position s <= t
"""

FORWARD = """\
tok_emb = wte[idx]                                          # (4, 5, 12)
pos_emb = wpe[torch.arange(T)]                              # (5, 12): one vector per position, shared by the batch
x = tok_emb + pos_emb                                       # (4, 5, 12): the residual stream
xhat1 = (x - x.mean(-1, keepdim=True)) * (x.var(-1, keepdim=True, unbiased=False) + eps) ** -0.5   # (4, 5, 12)
ln1 = ln1_w * xhat1 + ln1_b                                 # (4, 5, 12)
qkv = ln1 @ W_qkv + b_qkv                                   # (4, 5, 36)
q = qkv[:, :, :C].view(B, T, n_head, head_size).transpose(1, 2)         # (4, 2, 5, 6): queries, split into heads
k = qkv[:, :, C:2 * C].view(B, T, n_head, head_size).transpose(1, 2)    # (4, 2, 5, 6): keys
v = qkv[:, :, 2 * C:].view(B, T, n_head, head_size).transpose(1, 2)     # (4, 2, 5, 6): values
scores = q @ k.transpose(-2, -1) * head_size**-0.5          # (4, 2, 5, 5)
att = F.softmax(scores.masked_fill(tril == 0, -1e4), -1)    # (4, 2, 5, 5): 0 on the future
yh = att @ v                                                # (4, 2, 5, 6)
y = yh.transpose(1, 2).contiguous().view(B, T, C)           # (4, 5, 12): the heads side by side again
attn_out = y @ W_attn_proj + b_attn_proj                    # (4, 5, 12)
x1 = x + attn_out                                           # (4, 5, 12): residual
xhat2 = (x1 - x1.mean(-1, keepdim=True)) * (x1.var(-1, keepdim=True, unbiased=False) + eps) ** -0.5   # (4, 5, 12)
ln2 = ln2_w * xhat2 + ln2_b                                 # (4, 5, 12)
h = ln2 @ W_fc + b_fc                                       # (4, 5, 48)
gelu_inner = math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)     # (4, 5, 48)
gelu_tanh = torch.tanh(gelu_inner)                          # (4, 5, 48)
gelu = 0.5 * h * (1 + gelu_tanh)                            # (4, 5, 48): F.gelu(h, approximate='tanh')
mlp_out = gelu @ W_mlp_proj + b_mlp_proj                    # (4, 5, 12)
x2 = x1 + mlp_out                                           # (4, 5, 12): residual
xhatf = (x2 - x2.mean(-1, keepdim=True)) * (x2.var(-1, keepdim=True, unbiased=False) + eps) ** -0.5   # (4, 5, 12)
lnf = lnf_w * xhatf + lnf_b                                 # (4, 5, 12)
logits = lnf @ W_head                                       # (4, 5, 27)
loss = F.cross_entropy(logits.view(-1, vocab_size), targets.view(-1), ignore_index=-1)   # (): mean over 16 targets
"""

SOLUTION = """\
# backprop through every step
# loss = mean over the counted positions of -log softmax(logits)[target]: the lecture's exercise 2 at each
# position, divided by the number of counted targets; padded positions (target -1) are not in the loss
dlogits = F.softmax(logits, -1) - F.one_hot(targets.clamp(min=0), vocab_size)
dlogits *= (targets != -1).unsqueeze(-1) / (targets != -1).sum()
# logits = lnf @ W_head at every (b, t): each position is a row of one matmul, and W_head serves them all
dlnf = dlogits @ W_head.T
dW_head = lnf.reshape(-1, C).T @ dlogits.reshape(-1, vocab_size)
# lnf = lnf_w * xhatf + lnf_b: the gain and the bias are broadcast over every (b, t), so sum them back
dlnf_w = (dlnf * xhatf).sum((0, 1))
dlnf_b = dlnf.sum((0, 1))
dxhatf = lnf_w * dlnf
# LayerNorm's normalisation in one step: dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), means over C
dx2 = (x2.var(-1, keepdim=True, unbiased=False) + eps) ** -0.5 * (
    dxhatf - dxhatf.mean(-1, keepdim=True) - xhatf * (dxhatf * xhatf).mean(-1, keepdim=True))
# x2 = x1 + mlp_out: a sum hands its gradient to both terms
dx1 = dx2.clone()
dmlp_out = dx2.clone()
# mlp_out = gelu @ W_mlp_proj + b_mlp_proj
dgelu = dmlp_out @ W_mlp_proj.T
dW_mlp_proj = gelu.reshape(-1, 4 * C).T @ dmlp_out.reshape(-1, C)
db_mlp_proj = dmlp_out.sum((0, 1))
# gelu = 0.5 * h * (1 + gelu_tanh): a product of h and of something computed from h
dgelu_tanh = 0.5 * h * dgelu
dh = 0.5 * (1 + gelu_tanh) * dgelu
# d tanh(x) = 1 - tanh(x)^2, from the output
dgelu_inner = (1 - gelu_tanh**2) * dgelu_tanh
# h also feeds gelu_inner = sqrt(2/pi) * (h + 0.044715 h^3): add that path, with its inner derivative
dh += math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * h**2) * dgelu_inner
# h = ln2 @ W_fc + b_fc
dln2 = dh @ W_fc.T
dW_fc = ln2.reshape(-1, C).T @ dh.reshape(-1, 4 * C)
db_fc = dh.sum((0, 1))
# ln2 = ln2_w * xhat2 + ln2_b
dln2_w = (dln2 * xhat2).sum((0, 1))
dln2_b = dln2.sum((0, 1))
dxhat2 = ln2_w * dln2
# x1 feeds the residual x2 and ln2: add LayerNorm's gradient to the residual's
dx1 += (x1.var(-1, keepdim=True, unbiased=False) + eps) ** -0.5 * (
    dxhat2 - dxhat2.mean(-1, keepdim=True) - xhat2 * (dxhat2 * xhat2).mean(-1, keepdim=True))
# x1 = x + attn_out
dattn_out = dx1.clone()
# attn_out = y @ W_attn_proj + b_attn_proj
dy = dattn_out @ W_attn_proj.T
dW_attn_proj = y.reshape(-1, C).T @ dattn_out.reshape(-1, C)
db_attn_proj = dattn_out.sum((0, 1))
# y merged the heads: view then transpose back to (B, n_head, T, head_size)
dyh = dy.view(B, T, n_head, head_size).transpose(1, 2)
# yh = att @ v: dA = dY V^T, dV = A^T dY
datt = dyh @ v.transpose(-2, -1)
dv = att.transpose(-2, -1) @ dyh
# the mask and the softmax in one step (the row form); att is 0 on the future, so no gradient gets there
dscores = att * (datt - (att * datt).sum(-1, keepdim=True))
# scores = q @ k^T * head_size**-0.5: dQ = dS K, dK = dS^T Q, each times the same scale
dq = dscores @ k * head_size**-0.5
dk = dscores.transpose(-2, -1) @ q * head_size**-0.5
# q, k and v are the thirds of qkv, split into heads: undo the split, then put the thirds side by side
dqkv = torch.cat([dq.transpose(1, 2).reshape(B, T, C), dk.transpose(1, 2).reshape(B, T, C),
                  dv.transpose(1, 2).reshape(B, T, C)], dim=-1)
# qkv = ln1 @ W_qkv + b_qkv
dln1 = dqkv @ W_qkv.T
dW_qkv = ln1.reshape(-1, C).T @ dqkv.reshape(-1, 3 * C)
db_qkv = dqkv.sum((0, 1))
# ln1 = ln1_w * xhat1 + ln1_b
dln1_w = (dln1 * xhat1).sum((0, 1))
dln1_b = dln1.sum((0, 1))
dxhat1 = ln1_w * dln1
# x feeds the residual x1 and ln1: the residual's gradient plus LayerNorm's
dx = dx1.clone()
dx += (x.var(-1, keepdim=True, unbiased=False) + eps) ** -0.5 * (
    dxhat1 - dxhat1.mean(-1, keepdim=True) - xhat1 * (dxhat1 * xhat1).mean(-1, keepdim=True))
# x = tok_emb + pos_emb: pos_emb (T, C) was broadcast over the batch, so sum it back
dtok_emb = dx.clone()
dpos_emb = dx.sum(0)
# each row of wte collects the gradients of every position that looked it up (a scatter-add: idx repeats tokens)
dwte = torch.zeros_like(wte).index_add_(0, idx.view(-1), dtok_emb.reshape(-1, C))
# pos_emb = wpe[0..T-1]: the same scatter-add, each row looked up once
dwpe = torch.zeros_like(wpe).index_add_(0, torch.arange(T), dpos_emb)
"""


PITFALLS = (
    Pitfall("logits", """\
dlogits = (F.softmax(logits, -1) - F.one_hot(targets.clamp(min=0), vocab_size)) / (targets != -1).sum()
""", "padded positions (target -1) are not in the loss, so their rows of dlogits are 0: multiply by "
        "(targets != -1).unsqueeze(-1)"),
    Pitfall("logits", """\
dlogits = (F.softmax(logits, -1) - F.one_hot(targets.clamp(min=0), vocab_size)) * (targets != -1).unsqueeze(-1)
dlogits /= B * T
""", "the loss is the mean over the targets it counts ((targets != -1).sum(), 16 here), not over all B * T "
        "positions: padding is not in the count"),
    Pitfall("x2", """\
dx2 = (x2.var(-1, keepdim=True) + eps) ** -0.5 * (
    dxhatf - dxhatf.mean(-1, keepdim=True) - xhatf * (dxhatf * xhatf).mean(-1, keepdim=True))
""",
            "torch's var divides by C - 1 by default (Bessel's correction); LayerNorm's variance divides by C: "
            "var(-1, keepdim=True, unbiased=False), as in the forward"),
    Pitfall("gelu_inner", "dgelu_inner = (1 - gelu_inner**2) * dgelu_tanh\n",
            "tanh's derivative is 1 - tanh(x)**2 = 1 - gelu_tanh**2: take it from the output gelu_tanh, not from "
            "the pre-activation gelu_inner"),
    Pitfall("h", "dh = 0.5 * (1 + gelu_tanh) * dgelu + math.sqrt(2 / math.pi) * dgelu_inner\n",
            "GELU's inner chain term is dropped: gelu_inner = sqrt(2/pi) * (h + 0.044715 h^3) has the derivative "
            "sqrt(2/pi) * (1 + 3 * 0.044715 * h**2)"),
    Pitfall("h", "dh = 0.5 * (1 + gelu_tanh) * dgelu\n",
            "h feeds gelu twice, directly and through gelu_inner: add the second path, dh += sqrt(2/pi) * "
            "(1 + 3 * 0.044715 * h**2) * dgelu_inner"),
    Pitfall("h", "dh = math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * h**2) * dgelu_inner\n",
            "this is only the path through gelu_inner: h also feeds gelu directly, so add it to "
            "0.5 * (1 + gelu_tanh) * dgelu with +=, do not overwrite it"),
    Pitfall("x1", """\
dx1 = (x1.var(-1, keepdim=True, unbiased=False) + eps) ** -0.5 * (
    dxhat2 - dxhat2.mean(-1, keepdim=True) - xhat2 * (dxhat2 * xhat2).mean(-1, keepdim=True))
""",
            "a residual's gradient overwritten instead of added: x1 feeds ln2 and the residual x2 = x1 + mlp_out, "
            "so dx1 is dx2 plus LayerNorm's gradient (dx1 += ...)"),
    Pitfall("x", "dx = dx1.clone()\n",
            "x feeds the residual x1 = x + attn_out and ln1: add LayerNorm's gradient (from dxhat1) to the "
            "residual's dx1"),
    Pitfall("scores", "dscores = att * datt\n",
            "the softmax backward is missing the row-sum term: every entry of a row moves the row's sum, so "
            "dscores = att * (datt - (att * datt).sum(-1, keepdim=True))"),
    Pitfall("q", "dq = dscores @ k\n",
            "scores = q @ k^T * head_size**-0.5: the backward multiplies by the same head_size**-0.5"),
    Pitfall("pos_emb", "dpos_emb = dx.mean(0)\n",
            "pos_emb is added to every example of the batch: its gradient is the sum over the batch (dim 0), not "
            "the mean (the loss's 1/16 is already in dlogits)"),
    Pitfall("wte", """\
dwte = torch.zeros_like(wte)
dwte[idx] += dtok_emb
""", "wrong in the rows of tokens idx holds more than once: dwte[idx] += ... keeps one of the repeated "
        "contributions; accumulate with index_add_ (a scatter-add)"),
)

FORWARD_SLIPS = tuple(
    ForwardSlip(name, f"({x} - {x}.mean(-1, keepdim=True)) * ({x}.var(-1, keepdim=True) + eps) ** -0.5",
                "torch's var divides by C - 1 by default (Bessel's correction); LayerNorm's variance divides by C: "
                "var(-1, keepdim=True, unbiased=False)")
    for name, x in (("xhat1", "x"), ("xhat2", "x1"), ("xhatf", "x2"))
) + (
    ForwardSlip("gelu_inner", "math.sqrt(2 / math.pi) * h + 0.044715 * h**3",
                "operator precedence: sqrt(2/pi) multiplies the whole (h + 0.044715 * h**3)"),
)

EXERCISE = Exercise(
    name="transformer-block",
    summary="a one-block transformer: embeddings, LayerNorm, attention, GELU MLP, residuals, padded cross-entropy",
    setup_code=SETUP,
    forward_code=FORWARD,
    parameters=(
        "wte", "wpe", "ln1_w", "ln1_b", "W_qkv", "b_qkv", "W_attn_proj", "b_attn_proj", "ln2_w", "ln2_b",
        "W_fc", "b_fc", "W_mlp_proj", "b_mlp_proj", "lnf_w", "lnf_b", "W_head",
    ),
    gradients=(
        "logits", "lnf", "W_head", "lnf_w", "lnf_b", "xhatf", "x2", "mlp_out", "gelu", "W_mlp_proj", "b_mlp_proj",
        "gelu_tanh", "gelu_inner", "h", "ln2", "W_fc", "b_fc", "ln2_w", "ln2_b", "xhat2", "x1", "attn_out", "y",
        "W_attn_proj", "b_attn_proj", "yh", "att", "v", "scores", "q", "k", "qkv", "ln1", "W_qkv", "b_qkv",
        "ln1_w", "ln1_b", "xhat1", "x", "tok_emb", "pos_emb", "wte", "wpe",
    ),
    solution_code=SOLUTION,
    page="exercises/transformer-block.md",
    pitfalls=PITFALLS,
    forward_slips=FORWARD_SLIPS,
    constants=("B", "T", "C", "n_head", "head_size", "vocab_size", "eps"),
)
