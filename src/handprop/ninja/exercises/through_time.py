"""What the two exercises through time (rnn, gru) share: one step written out T times, and the slips they both invite.

Each exercise keeps its own text: the setup, one time step's forward and backward lines as templates
({t} the step, {s} = t - 1 the one before, {n} = t + 1 the one after), the head and the tail. These
functions write the steps out, sum each weight's gradient over the steps (the last step's share
starts the sum, the earlier ones add to it), and give the slips of a learned start state, a head on
every position, a weight shared by the steps and tanh's derivative, which both cells have.
"""

from ..exercise import Pitfall


def time_steps(T):
    """The step numbers, from the first to the last."""
    return range(1, T + 1)


def unrolled_forward(T, head, step, tail):
    """head, step for each time step, then tail, whose {hs} lists the states h1..hT."""
    body = "".join(step.format(t=t, s=t - 1) for t in time_steps(T))
    return head + body + tail.format(hs=", ".join(f"h{t}" for t in time_steps(T)))


def unrolled_backward(T, head, state, step, first_shares, more_shares, tail):
    """The backward from the last step to the first: state(t) (the step's dh), step, then the weights' shares
    (first_shares at the last step, more_shares before it); tail's {dxs} lists the steps' input gradients dx1..dxT."""
    back = head
    for t in reversed(time_steps(T)):
        shares = first_shares if t == T else more_shares
        back += (state(t) + step + shares).format(t=t, s=t - 1, n=t + 1)
    return back + tail.format(dxs=", ".join(f"dx{t}" for t in time_steps(T)))


def share_lines(shares, op):
    """A line per weight: d<weight> op its share from step {t} ('=' starts the sum, '+=' adds to it)."""
    return "".join(f"d{weight} {op} {share}\n" for weight, share in shares.items())


COPIES_SUMMED = (   # start and bout are copied (over the rows, over the positions): their copies' gradients add
    Pitfall(
        "start", "dstart = dh0.mean(0, keepdim=True)",
        "start is copied to every row of h0 (expand), and the copies' gradients add: dh0.sum(0, keepdim=True); "
        "the loss's mean is already in dlogits, and averaging the copies divides by B once more",
    ),
    Pitfall(
        "bout", "dbout = dlogits.mean((0, 1))",
        "bout is added at every position, and the positions' gradients add: dlogits.sum((0, 1)); the loss's "
        "mean is already in dlogits, and averaging the positions divides by B * T once more",
    ),
)


def tanh_pitfalls(T, out, pre):
    """At every step, tanh's derivative taken from the pre-activation pre{t} instead of the output out{t}."""
    return tuple(Pitfall(
        f"{pre}{t}", f"d{pre}{t} = (1 - {pre}{t}**2) * d{out}{t}",
        f"tanh's derivative is 1 - tanh(x)^2 = 1 - {out}{t}**2: square the output {out}{t}, not the "
        f"pre-activation {pre}{t}",
    ) for t in time_steps(T))


def share_pitfalls(T, shares):
    """Each weight's gradient overwritten by one step's share instead of summed, at every step before the last."""
    return tuple(Pitfall(
        weight, f"d{weight} = {share.format(t=t)}",
        f"this is step {t}'s share only: {weight} is used at every step, so d{weight} sums every step's share; add "
        "each with += instead of overwriting the shares before it",
    ) for weight, share in shares.items() for t in time_steps(T) if t < T)
