"""LayerNorm over (B, T, C) in seven small steps under a fixed random upstream gradient, then dx in one step.

The layer of a transformer block (Ba et al. 2016): each position's C channels are normalised by
their own mean and biased variance (divided by C, as torch.nn.LayerNorm), then scaled by gamma and
shifted by beta. It is BatchNorm turned sideways: the statistics run over the last dimension, so
its sums are over -1 where the lecture's were over dim 0, and gamma, shared by every position,
sums its gradient over B and T.
"""

from ..exercise import Exercise, ForwardSlip, Fused, Pitfall

SETUP = """\
B, T, C = 4, 5, 8       # batch, positions, channels: LayerNorm normalises each position over its C channels
eps = 1e-5              # added to the variance before the inverse square root
g = torch.Generator().manual_seed(2147483647)
x = 0.5 + 2.0 * torch.randn((B, T, C), generator=g)     # (4, 5, 8): an offset and a spread for the layer to remove
# gamma and beta are not 1 and 0, so a wrong backward cannot hide behind them
gamma = 1.0 + 0.1 * torch.randn(C, generator=g)         # (8,)
beta = 0.1 * torch.randn(C, generator=g)                # (8,)
# a fixed random gradient from above: with all ones, sums of dout hide wrong terms
upstream = torch.randn((B, T, C), generator=g)          # (4, 5, 8)
"""

FORWARD = """\
xmean = 1 / C * x.sum(-1, keepdim=True)                 # (4, 5, 1): each position's mean over its channels
xdiff = x - xmean                                       # (4, 5, 8)
xdiff2 = xdiff**2                                       # (4, 5, 8)
xvar = 1 / C * xdiff2.sum(-1, keepdim=True)             # (4, 5, 1): divides by C, no Bessel (as torch.nn.LayerNorm)
xvar_inv = (xvar + eps) ** -0.5                         # (4, 5, 1)
xhat = xdiff * xvar_inv                                 # (4, 5, 8)
out = gamma * xhat + beta                               # (4, 5, 8)
loss = (out * upstream).sum()                           # (): so dloss/dout is upstream
"""

STEP_BY_STEP = """\
# step 1: backprop through every step
# loss = sum(out * upstream): each entry of out gets its entry of upstream
dout = upstream.clone()
# out = gamma * xhat + beta: gamma and beta (8,) were broadcast over B and T, so sum those back
dgamma = (xhat * dout).sum((0, 1))
dbeta = dout.sum((0, 1))
dxhat = gamma * dout
# xhat = xdiff * xvar_inv: xvar_inv (4, 5, 1) was broadcast over the channels, so sum them back
dxvar_inv = (xdiff * dxhat).sum(-1, keepdim=True)
dxdiff = xvar_inv * dxhat
# d (v + eps)^-1/2 = -1/2 (v + eps)^-3/2
dxvar = -0.5 * (xvar + eps) ** -1.5 * dxvar_inv
# xvar = 1/C * sum over the channels of xdiff2: every channel gets 1/C of its position's gradient
dxdiff2 = 1 / C * torch.ones_like(xdiff2) * dxvar
# xdiff also feeds xdiff2 = xdiff^2
dxdiff += 2 * xdiff * dxdiff2
# xdiff = x - xmean, xmean broadcast over the channels
dxmean = -dxdiff.sum(-1, keepdim=True)
dx = dxdiff.clone()
# x also feeds xmean = 1/C * sum over the channels
dx += 1 / C * dxmean
"""

FUSED = (
    Fused("x", "step 2: LayerNorm backward in one step, from dxhat = gamma * dout", """\
dx = xvar_inv / C * (C * dxhat - dxhat.sum(-1, keepdim=True) - xhat * (dxhat * xhat).sum(-1, keepdim=True))
"""),
)

PITFALLS = (
    Pitfall("gamma", "dgamma = (xhat * dout).sum(0, keepdim=True)\n",
            "gamma (8,) scales every position of every sequence, so its gradient sums over both B and T: "
            "(xhat * dout).sum((0, 1)), back to gamma's shape (8,); the lecture's BatchNorm summed over dim 0 only "
            "because its input had no T"),
    Pitfall("xvar_inv", "dxvar_inv = (xdiff * dxhat).sum(0, keepdim=True)\n",
            "LayerNorm's statistics belong to one position, over its channels: xvar_inv is (4, 5, 1), so sum over "
            "the last dimension, .sum(-1, keepdim=True); summing over dim 0 is BatchNorm's"),
    Pitfall("xvar_inv", "dxvar_inv = (xdiff * dxhat).sum(-1)\n",
            "without keepdim the sum is (4, 5), and the next line's (4, 5, 1) * (4, 5) broadcasts into (4, 5, 5): "
            "keep the summed dimension, .sum(-1, keepdim=True), so it matches xvar_inv (4, 5, 1)"),
    Pitfall("xdiff2", "dxdiff2 = 1 / (C - 1) * torch.ones_like(xdiff2) * dxvar\n",
            "LayerNorm's variance divides by C (the biased variance, as torch.nn.LayerNorm): the lecture's "
            "BatchNorm used n-1 (Bessel's correction), LayerNorm does not"),
    Pitfall("xdiff", "dxdiff = 2 * xdiff * dxdiff2\n",
            "xdiff is read twice, by xdiff2 = xdiff**2 and by xhat = xdiff * xvar_inv: add this branch's gradient "
            "to the one from xhat (+=) instead of overwriting it"),
    Pitfall("x", "dx = dxdiff.clone()\n",
            "x is read twice, by xdiff = x - xmean and by xmean itself: add the mean's share, 1/C * dxmean, to "
            "every channel of its position"),
    Pitfall("x", "dx = gamma * xvar_inv / C * (C * dout - dout.sum(-1, keepdim=True) "
                 "- xhat * (dout * xhat).sum(-1, keepdim=True))\n",
            "this is BatchNorm's one-step formula with gamma taken out of the sums; in BatchNorm gamma is the same "
            "along the summed dimension, here it varies along it (one gamma per channel): sum dxhat = gamma * dout, "
            "not dout"),
    Pitfall("x", "dx = xvar_inv / C * (C * dxhat - dxhat.sum(-1, keepdim=True) "
                 "- C / (C - 1) * xhat * (dxhat * xhat).sum(-1, keepdim=True))\n",
            "the factor n/(n-1) of the lecture's exercise 3 comes from its Bessel-corrected variance; LayerNorm's "
            "variance divides by C, so the last term has no such factor"),
)

FORWARD_SLIPS = (
    ForwardSlip("xvar", "1 / (C - 1) * xdiff2.sum(-1, keepdim=True)",
                "this divides by C-1 (Bessel's correction, as the lecture's BatchNorm); LayerNorm divides by C, as "
                "torch.nn.LayerNorm does"),
)

EXERCISE = Exercise(
    name="layernorm",
    summary="LayerNorm over (B, T, C) in 7 steps under a random upstream gradient, 10 gradients, then dx in one step",
    setup_code=SETUP,
    forward_code=FORWARD,
    parameters=("x", "gamma", "beta"),
    gradients=("out", "gamma", "beta", "xhat", "xvar_inv", "xvar", "xdiff2", "xdiff", "xmean", "x"),
    solution_code=STEP_BY_STEP + "".join(f"\n# {f.title}\n{f.code}" for f in FUSED),
    page="exercises/layernorm.md",
    fused=FUSED,
    pitfalls=PITFALLS,
    forward_slips=FORWARD_SLIPS,
    constants=("B", "T", "C", "eps"),
)
