"""Exercise `gru`: makemore's GRU cell (reset gate, candidate state, update gate) over T steps, by hand.

With xh = [x_t, h_{t-1}]: r = sigmoid(xh @ Wr + br), hreset = r * h_{t-1},
hbar = tanh([x_t, hreset] @ Whbar + bhbar), z = sigmoid(xh @ Wz + bz),
h_t = (1 - z) * h_{t-1} + z * hbar; a linear head on every step's h_t and the cross-entropy.
The forward is unrolled, one line per intermediate and step; the state h_{t-1} reaches step t
four ways (both gates through xh, the reset, the direct (1 - z) path), and the head a fifth.
STEP and BACK_STEP hold one step; through_time.py writes them out T times.
"""

from ..exercise import Exercise, ForwardSlip, Pitfall
from .through_time import (
    COPIES_SUMMED,
    share_lines,
    share_pitfalls,
    tanh_pitfalls,
    time_steps,
    unrolled_backward,
    unrolled_forward,
)

T = 3   # time steps: the forward is STEP written out T times

SETUP = f"""\
g = torch.Generator().manual_seed(2147483647)
words = ["bo", "al", "jo", "ed", "ty", "lu"]  # six names from names.txt, T - 1 letters each: none is padded
B, T = len(words), {T}  # batch size, time steps
n_embd, n_hidden, vocab_size = 8, 12, 27  # embedding size, hidden state size, '.' and a..z
# makemore's sequences: x is '.' then the name, y the name then '.'
ix = [[ord(ch) - ord("a") + 1 for ch in w] for w in words]  # a..z are 1..26, '.' is 0
Xb = torch.tensor([[0] + w for w in ix])  # (B, T) inputs
Yb = torch.tensor([w + [0] for w in ix])  # (B, T) targets
C = torch.randn(vocab_size, n_embd, generator=g)  # (vocab_size, n_embd)
Wr = torch.randn(n_embd + n_hidden, n_hidden, generator=g) / (n_embd + n_hidden)**0.5  # (n_embd + n_hidden, n_hidden)
br = torch.randn(n_hidden, generator=g) * 0.1  # (n_hidden,) reset gate
Whbar = torch.randn(n_embd + n_hidden, n_hidden, generator=g) / (n_embd + n_hidden)**0.5  # candidate state
bhbar = torch.randn(n_hidden, generator=g) * 0.1  # (n_hidden,)
Wz = torch.randn(n_embd + n_hidden, n_hidden, generator=g) / (n_embd + n_hidden)**0.5  # update gate
bz = torch.randn(n_hidden, generator=g) * 0.1  # (n_hidden,)
start = torch.randn(1, n_hidden, generator=g) * 0.1  # (1, n_hidden) the learned state before the first character
Wout = torch.randn(n_hidden, vocab_size, generator=g) * 0.1  # (n_hidden, vocab_size)
bout = torch.randn(vocab_size, generator=g) * 0.1  # (vocab_size,)
"""

FORWARD_HEAD = """\
emb = C[Xb]  # (B, T, n_embd)
h0 = start.expand(B, n_hidden)  # (B, n_hidden) every row starts from the same learned state
"""

STEP = """\
x{t} = emb[:, {s}]  # (B, n_embd) the character read at step {t}
xh{t} = torch.cat([x{t}, h{s}], 1)  # (B, n_embd + n_hidden)
rpre{t} = xh{t} @ Wr + br  # (B, n_hidden)
r{t} = torch.sigmoid(rpre{t})  # (B, n_hidden) reset gate
hreset{t} = r{t} * h{s}  # (B, n_hidden) the previous state, reset
xhr{t} = torch.cat([x{t}, hreset{t}], 1)  # (B, n_embd + n_hidden)
hbarpre{t} = xhr{t} @ Whbar + bhbar  # (B, n_hidden)
hbar{t} = torch.tanh(hbarpre{t})  # (B, n_hidden) candidate state
zpre{t} = xh{t} @ Wz + bz  # (B, n_hidden)
z{t} = torch.sigmoid(zpre{t})  # (B, n_hidden) update gate
h{t} = (1 - z{t}) * h{s} + z{t} * hbar{t}  # (B, n_hidden) the state after step {t}
"""

FORWARD_TAIL = """\
hs = torch.stack([{hs}], 1)  # (B, T, n_hidden)
logits = hs @ Wout + bout  # (B, T, vocab_size)
loss = F.cross_entropy(logits.view(B * T, vocab_size), Yb.view(B * T))  # scalar: the mean over all B * T positions
"""

BACK_HEAD = """\
# cross-entropy, the mean over all B * T positions: (softmax - one_hot) / (B * T)
dlogits = (F.softmax(logits, 2) - F.one_hot(Yb, vocab_size)) / (B * T)
# logits = hs @ Wout + bout: one head for every position, so its gradients sum over B and T
dhs = dlogits @ Wout.T
dWout = hs.view(B * T, n_hidden).T @ dlogits.view(B * T, vocab_size)
dbout = dlogits.sum((0, 1))
"""

LAST_STATE = """\
# step {t}, the last: h{t} feeds the head only
dh{t} = dhs[:, {s}]
"""

STATE = """\
# step {t}: h{t} feeds the head and step {n} four ways: directly (1 - z{n}), the reset r{n} * h{t}, both gates via xh{n}
"""     # then dh{t} as dh_sum(t) writes it

BACK_STEP = """\
# h{t} = (1 - z{t}) * h{s} + z{t} * hbar{t}: d/dz{t} = hbar{t} - h{s}, d/dhbar{t} = z{t}
dz{t} = (hbar{t} - h{s}) * dh{t}
# z{t} = sigmoid(zpre{t}): sigmoid' = z (1 - z), taken from the output z{t}
dzpre{t} = z{t} * (1 - z{t}) * dz{t}
dhbar{t} = z{t} * dh{t}
# hbar{t} = tanh(hbarpre{t}): tanh' = 1 - hbar^2, taken from the output hbar{t}
dhbarpre{t} = (1 - hbar{t}**2) * dhbar{t}
# hbarpre{t} = xhr{t} @ Whbar + bhbar
dxhr{t} = dhbarpre{t} @ Whbar.T
# xhr{t} = [x{t}, hreset{t}]: hreset{t} is the last n_hidden columns
dhreset{t} = dxhr{t}[:, n_embd:]
# hreset{t} = r{t} * h{s} (h{s}'s share goes into dh{s})
dr{t} = h{s} * dhreset{t}
drpre{t} = r{t} * (1 - r{t}) * dr{t}
# xh{t} feeds both gates: rpre{t} = xh{t} @ Wr + br and zpre{t} = xh{t} @ Wz + bz
dxh{t} = drpre{t} @ Wr.T + dzpre{t} @ Wz.T
# x{t} is the first n_embd columns of both xh{t} and xhr{t}
dx{t} = dxh{t}[:, :n_embd] + dxhr{t}[:, :n_embd]
"""

SHARES = {     # each weight's share of its gradient from step {t}, in the order the solution writes them
    "Wr": "xh{t}.T @ drpre{t}", "br": "drpre{t}.sum(0)",
    "Whbar": "xhr{t}.T @ dhbarpre{t}", "bhbar": "dhbarpre{t}.sum(0)",
    "Wz": "xh{t}.T @ dzpre{t}", "bz": "dzpre{t}.sum(0)",
}
FIRST_WEIGHTS = "# the weights are used at every step: this is the first of T shares\n" + share_lines(SHARES, "=")
MORE_WEIGHTS = "# ... and step {t}'s share adds to the others (+=)\n" + share_lines(SHARES, "+=")

BACK_TAIL = """\
# h0 = start expanded over the batch; it feeds step 1 the three ways a state feeds the next step; summed over the rows
dh0 = (1 - z1) * dh1 + r1 * dhreset1 + dxh1[:, n_embd:]
dstart = dh0.sum(0, keepdim=True)
# x_t = emb[:, t - 1]: the steps' inputs, stacked back along T
demb = torch.stack([{dxs}], 1)
# emb = C[Xb]: each row of C collects the gradient of every position that looked it up (a scatter-add)
dC = torch.zeros_like(C).index_add_(0, Xb.view(-1), demb.view(-1, n_embd))
"""

STEP_GRADIENTS = ("h", "z", "zpre", "hbar", "hbarpre", "xhr", "hreset", "r", "rpre", "xh", "x")   # BACK_STEP's order


def state(t):
    """dh{t}, the state's gradient: from the head only at the last step, from the head and the next step's four
    paths before."""
    return LAST_STATE if t == T else STATE + dh_sum(t) + "\n"


def state_paths(t):
    """The four terms of dh{t} (t < T) by name: what each path from h{t} sends back."""
    n = t + 1
    return {
        "head": f"dhs[:, {t - 1}]", "direct": f"(1 - z{n}) * dh{n}",
        "reset": f"r{n} * dhreset{n}", "gates": f"dxh{n}[:, n_embd:]",
    }


def dh_sum(t, path=None, instead=None):
    """dh{t} (t < T) as the sum of its paths; a slip of it with one path left out, or replaced by instead."""
    terms = [instead if name == path else term for name, term in state_paths(t).items()]
    return f"dh{t} = " + " + ".join(term for term in terms if term)


def pitfalls():
    """The slips of the GRU's backward through time, at every step where a learner can make them."""
    late = [t for t in time_steps(T) if t < T]    # the steps whose state also feeds a later step
    return (
        *COPIES_SUMMED,
        *(Pitfall(
            f"hbar{t}", f"dhbar{t} = (1 - z{t}) * dh{t}",
            f"z and 1 - z are swapped: h{t} = (1 - z{t}) * h{t - 1} + z{t} * hbar{t} weights the candidate by z{t} "
            "(PyTorch's nn.GRU has them the other way round; makemore's cell, this one, does not)",
        ) for t in time_steps(T)),
        *(Pitfall(
            f"z{t}", f"dz{t} = (h{t - 1} - hbar{t}) * dh{t}",
            f"the sign is swapped: h{t} = (1 - z{t}) * h{t - 1} + z{t} * hbar{t}, so dh{t}/dz{t} = hbar{t} - h{t - 1} "
            "(PyTorch's nn.GRU mixes the other way round)",
        ) for t in time_steps(T)),
        *(Pitfall(
            f"{gate}pre{t}", f"d{gate}pre{t} = {gate}pre{t} * (1 - {gate}pre{t}) * d{gate}{t}",
            f"sigmoid's derivative is s (1 - s) with s = sigmoid(x), the output: {gate}{t} * (1 - {gate}{t}), not "
            f"the pre-activation {gate}pre{t}",
        ) for gate in ("z", "r") for t in time_steps(T)),
        *tanh_pitfalls(T, "hbar", "hbarpre"),
        *(Pitfall(
            f"r{t}", f"dr{t} = h{t} * dhreset{t}",
            f"hreset{t} = r{t} * h{t - 1} resets the previous state h{t - 1}, not the new h{t}: dr{t} = h{t - 1} * "
            f"dhreset{t}",
        ) for t in time_steps(T)),
        *(Pitfall(
            f"x{t}", f"dx{t} = dxh{t}[:, :n_embd]",
            f"x{t} is read twice, in xh{t} (both gates) and in xhr{t} (the candidate): add dxhr{t}[:, :n_embd] too",
        ) for t in time_steps(T)),
        *(Pitfall(
            f"h{t}", f"dh{t} = dhs[:, {t - 1}]",
            f"h{t} also feeds step {t + 1}: backprop through time adds what step {t + 1} sends back to it, "
            f"(1 - z{t + 1}) * dh{t + 1} + r{t + 1} * dhreset{t + 1} + dxh{t + 1}[:, n_embd:], to the head's "
            f"dhs[:, {t - 1}]",
        ) for t in late),
        *(Pitfall(
            f"h{t}", dh_sum(t, "direct"),
            f"the direct path is missing: h{t + 1} = (1 - z{t + 1}) * h{t} + ... passes h{t} straight on, so "
            f"dh{t} gets (1 - z{t + 1}) * dh{t + 1}",
        ) for t in late),
        *(Pitfall(
            f"h{t}", dh_sum(t, "direct", f"z{t + 1} * dh{t + 1}"),
            f"z and 1 - z are swapped: h{t + 1} = (1 - z{t + 1}) * h{t} + z{t + 1} * hbar{t + 1} keeps "
            f"1 - z{t + 1} of h{t}, so the direct path sends (1 - z{t + 1}) * dh{t + 1}",
        ) for t in late),
        *(Pitfall(
            f"h{t}", dh_sum(t, "reset"),
            f"the path through the reset is missing: hreset{t + 1} = r{t + 1} * h{t}, so dh{t} gets "
            f"r{t + 1} * dhreset{t + 1}",
        ) for t in late),
        *(Pitfall(
            f"h{t}", dh_sum(t, "gates"),
            f"the path through the gates is missing: h{t} is the h part of xh{t + 1}, which both gates read, so "
            f"dh{t} gets dxh{t + 1}[:, n_embd:]",
        ) for t in late),
        *(Pitfall(
            f"h{t}", dh_sum(t, "gates", f"dxh{t + 1}[:, :n_hidden]"),
            f"xh{t + 1} = [x{t + 1}, h{t}] puts x first: h{t}'s part of dxh{t + 1} is its last n_hidden "
            f"columns, dxh{t + 1}[:, n_embd:]",
        ) for t in late),
        *(Pitfall(
            f"hreset{t}", f"dhreset{t} = dxhr{t}[:, :n_hidden]",
            f"xhr{t} = [x{t}, hreset{t}] puts x first: hreset{t}'s part of dxhr{t} is its last n_hidden "
            f"columns, dxhr{t}[:, n_embd:]",
        ) for t in time_steps(T)),
        *share_pitfalls(T, SHARES),
    )


EXERCISE = Exercise(
    name="gru",
    summary="makemore's GRU over T steps: reset, candidate and update gates, the state's four paths back in time",
    setup_code=SETUP,
    forward_code=unrolled_forward(T, FORWARD_HEAD, STEP, FORWARD_TAIL),
    parameters=("C", *SHARES, "start", "Wout", "bout"),
    gradients=(
        "logits", "hs", "Wout", "bout",
        *(f"{name}{t}" for t in reversed(time_steps(T)) for name in STEP_GRADIENTS),
        *SHARES, "h0", "start", "emb", "C",
    ),
    solution_code=unrolled_backward(T, BACK_HEAD, state, BACK_STEP, FIRST_WEIGHTS, MORE_WEIGHTS, BACK_TAIL),
    page="exercises/gru.md",
    pitfalls=pitfalls(),
    forward_slips=tuple(ForwardSlip(
        f"h{t}", f"z{t} * h{t - 1} + (1 - z{t}) * hbar{t}",
        f"z and 1 - z are swapped: makemore's cell keeps 1 - z of the old state, (1 - z{t}) * h{t - 1} + "
        f"z{t} * hbar{t} (PyTorch's nn.GRU has them the other way round)",
    ) for t in time_steps(T)),
    constants=("B", "T", "n_embd", "n_hidden", "vocab_size"),
)
