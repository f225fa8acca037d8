"""Exercise `rnn`: makemore's tanh RNN over T steps, backpropagation through time by hand.

h_t = tanh([x_t, h_{t-1}] @ Wxh + bh) from a learned start state, a linear head on every
step's h_t, and the cross-entropy over the positions that are not padding. The forward is
unrolled, one line per intermediate and step, so every step's gradients have names: dh3 is
the gradient of the state after step 3, carried back from the head and from step 4.
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

T = 4   # time steps: the forward is STEP written out T times

SETUP = f"""\
g = torch.Generator().manual_seed(2147483647)
words = ["ava", "bo", "mia", "al", "zoe", "jo"]  # six names from names.txt, at most T - 1 letters each
B, T = len(words), {T}  # batch size, time steps
n_embd, n_hidden, vocab_size = 8, 12, 27  # embedding size, hidden state size, '.' and a..z
# makemore's sequences: x is '.' then the name, y the name then '.'; after the end x is 0 and y is -1 (padding)
ix = [[ord(ch) - ord("a") + 1 for ch in w] for w in words]  # a..z are 1..26, '.' is 0
Xb = torch.tensor([[0] + w + [0] * (T - 1 - len(w)) for w in ix])  # (B, T) inputs
Yb = torch.tensor([w + [0] + [-1] * (T - 1 - len(w)) for w in ix])  # (B, T) targets, -1 ignored by the loss
C = torch.randn(vocab_size, n_embd, generator=g)  # (vocab_size, n_embd)
Wxh = torch.randn(n_embd + n_hidden, n_hidden, generator=g) / (n_embd + n_hidden)**0.5  # (n_embd + n_hidden, n_hidden)
bh = torch.randn(n_hidden, generator=g) * 0.1  # (n_hidden,)
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
hpre{t} = xh{t} @ Wxh + bh  # (B, n_hidden)
h{t} = torch.tanh(hpre{t})  # (B, n_hidden) the state after step {t}
"""

FORWARD_TAIL = """\
hs = torch.stack([{hs}], 1)  # (B, T, n_hidden)
logits = hs @ Wout + bout  # (B, T, vocab_size)
loss = F.cross_entropy(logits.view(B * T, vocab_size), Yb.view(B * T), ignore_index=-1)  # scalar, padding ignored
"""

BACK_HEAD = """\
# cross-entropy, the mean over the counted positions: (softmax - one_hot) / their number, 0 where the target is -1
dlogits = (F.softmax(logits, 2) - F.one_hot(Yb.clamp(min=0), vocab_size)) * (Yb >= 0).unsqueeze(2) / (Yb >= 0).sum()
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
# step {t}: h{t} feeds the head and step {n} (as the h part of xh{n}): backprop through time adds the two
dh{t} = dhs[:, {s}] + dxh{n}[:, n_embd:]
"""

BACK_STEP = """\
# h{t} = tanh(hpre{t}): tanh' = 1 - tanh^2, taken from the output h{t}
dhpre{t} = (1 - h{t}**2) * dh{t}
# hpre{t} = xh{t} @ Wxh + bh
dxh{t} = dhpre{t} @ Wxh.T
# xh{t} = [x{t}, h{s}]: the first n_embd columns are x{t}'s (h{s}'s, the rest, go into dh{s})
dx{t} = dxh{t}[:, :n_embd]
"""

SHARES = {"Wxh": "xh{t}.T @ dhpre{t}", "bh": "dhpre{t}.sum(0)"}     # each weight's share from step {t}
FIRST_WEIGHTS = "# Wxh and bh are used at every step: this is the first of T shares\n" + share_lines(SHARES, "=")
MORE_WEIGHTS = "# ... and step {t}'s share adds to the others (+=)\n" + share_lines(SHARES, "+=")

BACK_TAIL = """\
# h0 = start expanded over the batch: what step 1 sends back to its state, summed over the rows
dh0 = dxh1[:, n_embd:]
dstart = dh0.sum(0, keepdim=True)
# x_t = emb[:, t - 1]: the steps' inputs, stacked back along T
demb = torch.stack([{dxs}], 1)
# emb = C[Xb]: each row of C collects the gradient of every position that looked it up (a scatter-add)
dC = torch.zeros_like(C).index_add_(0, Xb.view(-1), demb.view(-1, n_embd))
"""


def state(t):
    """dh{t}, the state's gradient: from the head only at the last step, from the head and the next step before."""
    return LAST_STATE if t == T else STATE


def pitfalls():
    """The slips of backprop through time, at every step where a learner can make them."""
    late = [t for t in time_steps(T) if t < T]    # the steps whose state also feeds a later step
    return (
        *COPIES_SUMMED,
        Pitfall(
            "logits",
            "dlogits = (F.softmax(logits, 2) - F.one_hot(Yb.clamp(min=0), vocab_size)) * (Yb >= 0).unsqueeze(2)"
            " / (B * T)",
            "the loss is the mean over the counted positions only (targets -1 are padding): divide by their "
            "number, (Yb >= 0).sum(), not by B * T",
        ),
        *tanh_pitfalls(T, "h", "hpre"),
        *(Pitfall(
            f"h{t}", f"dh{t} = dhs[:, {t - 1}]",
            f"h{t} also feeds step {t + 1} (it is the h part of xh{t + 1}): backprop through time adds the "
            f"gradient step {t + 1} sends back, dxh{t + 1}[:, n_embd:], to the head's dhs[:, {t - 1}]",
        ) for t in late),
        *(Pitfall(
            f"h{t}", f"dh{t} = dhs[:, {t - 1}] + dxh{t + 1}[:, :n_hidden]",
            f"xh{t + 1} = [x{t + 1}, h{t}] puts x first: h{t}'s part of dxh{t + 1} is its last n_hidden "
            f"columns, dxh{t + 1}[:, n_embd:]",
        ) for t in late),
        *(Pitfall(
            f"x{t}", f"dx{t} = dxh{t}[:, n_hidden:]",
            f"xh{t} = [x{t}, h{t - 1}] puts x first: x{t}'s part of dxh{t} is its first n_embd columns, "
            f"dxh{t}[:, :n_embd]",
        ) for t in time_steps(T)),
        *share_pitfalls(T, SHARES),
    )


EXERCISE = Exercise(
    name="rnn",
    summary="makemore's tanh RNN over T steps: backprop through time, dh carried back, weights summed over steps",
    setup_code=SETUP,
    forward_code=unrolled_forward(T, FORWARD_HEAD, STEP, FORWARD_TAIL),
    parameters=("C", "Wxh", "bh", "start", "Wout", "bout"),
    gradients=(
        "logits", "hs", "Wout", "bout",
        *(name for t in reversed(time_steps(T)) for name in (f"h{t}", f"hpre{t}", f"xh{t}", f"x{t}")),
        "Wxh", "bh", "h0", "start", "emb", "C",
    ),
    solution_code=unrolled_backward(T, BACK_HEAD, state, BACK_STEP, FIRST_WEIGHTS, MORE_WEIGHTS, BACK_TAIL),
    page="exercises/rnn.md",
    pitfalls=pitfalls(),
    forward_slips=tuple(ForwardSlip(
        f"xh{t}", f"torch.cat([h{t - 1}, x{t}], 1)",
        f"makemore's cell reads [x, h], the character first: torch.cat([x{t}, h{t - 1}], 1)",
    ) for t in time_steps(T)),
    constants=("B", "T", "n_embd", "n_hidden", "vocab_size"),
)
