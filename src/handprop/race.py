"""--compile auto's choice: the compiled step or the eager one, whichever a short race on the run itself finds faster.

The compiled step is usually the faster by far (the lecture's mlp: 6x on one thread), but not
always: with 2 threads, Inductor's loops for mlp-fast's lookup tables (scatter-adds over the
batch) split so badly over the threads that the eager step is faster, up to 5x. Which wins
depends on the model, the thread count and the machine, so it is measured rather than predicted:
once the graph is compiled, both steps train the run for a few short rounds, taking turns, and
each one's best round counts. Every tensor the steps update, the optimiser's own numbers (AdamW's
step count) and every generator they draw from (the batches', dropout's) are put back afterwards,
so the run goes on to take exactly the steps it takes under --compile on or off, whichever won.
"""

import time
from contextlib import contextmanager

from .compiled import recorded

ROUNDS = 3              # rounds of the race; each step's best round counts, so a noisy spell costs neither
ROUND_SECONDS = 0.1     # each step's share of a round, at least one step: 0.6 s in all, or 8 steps of a slow model
COMPILED, EAGER = "compiled", "op by op"    # the two contenders, as the log names them


def race(steps, draw, lr, clock=time.perf_counter):
    """{name: steps/s}: the best of ROUNDS rounds of each of steps ({name: step.py's call}) on rows from draw() at lr,
    taking turns (the order alternates from round to round), each after one untimed step (its first call allocates)."""
    for step in steps.values():
        step(draw(), lr)
    best = dict.fromkeys(steps, 0.0)
    for round_ in range(ROUNDS):
        for name in (list(steps) if round_ % 2 == 0 else list(reversed(steps))):
            taken, started = 0, clock()
            while taken == 0 or clock() - started < ROUND_SECONDS:
                steps[name](draw(), lr)
                taken += 1
            best[name] = max(best[name], taken / (clock() - started))
    return best


@contextmanager
def kept(optimizer, generators):
    """While active, steps may train; afterwards the optimiser's state as a checkpoint holds it (the moments, AdamW's
    step count) and each generator's state are as they were (compiled.recorded puts back the other tensors)."""
    tensors, numbers = optimizer.state_dict()
    tensors = {name: tensor.clone() for name, tensor in tensors.items()}
    states = [generator.get_state() for generator in generators]
    try:
        yield
    finally:
        optimizer.load_state_dict(tensors, numbers)
        for generator, state in zip(generators, states, strict=True):
            generator.set_state(state)


def faster(compiled, eager, draw, lr, optimizer, batch_generator, threads):
    """(the faster of compiled (a compiled.CompiledStep) and eager (step.EagerStep) on threads threads, the log line
    saying both rates and the choice), from a race on rows draw() takes from batch_generator at lr, after which the
    run's tensors, optimizer's numbers and generators are as they were."""
    generators = [batch_generator, *(layer.generator for layer, _, _ in compiled.draws)]    # batches, then dropout's
    with kept(optimizer, generators):
        rates = recorded(lambda: race({COMPILED: compiled, EAGER: eager}, draw, lr), compiled.state)
    winner = COMPILED if rates[COMPILED] >= rates[EAGER] else EAGER
    line = (f"--compile auto on {threads} thread{'s' * (threads > 1)}: compiled {rates[COMPILED]:,.0f} steps/s, "
            f"op by op {rates[EAGER]:,.0f} steps/s: training {winner}")
    return (compiled if winner == COMPILED else eager), line
