"""The progress line's eta stays steady through a stall and follows a lasting change of pace (issue 18, 13)."""

import io
import re

from handprop.progress import SPEED_MEMORY, Progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def eta(line):
    return float(re.search(r"eta ([\d,]+)s", line).group(1).replace(",", ""))


def run(progress, clock, step, steps, seconds_per_step, every=100):
    """Take steps at a pace, printing every `every` steps as the log does; returns (the step reached, its eta)."""
    for _ in range(steps // every):
        clock.now += every * seconds_per_step
        step += every
        progress.update(step, 2.0, 0.1)
    return step, eta(progress.stream.getvalue().splitlines()[-1])


def test_a_stall_barely_moves_the_eta_and_a_lasting_slowdown_takes_over():
    clock, out = Clock(), io.StringIO()
    progress = Progress(10**7, 100, out, clock=clock)
    step, steady = run(progress, clock, 0, 200_000, 1e-3)        # 200 s at 1,000 steps a second
    assert abs(steady - (10**7 - step) * 1e-3) / steady < 1e-6
    clock.now += 10.0                                           # a 10 s stall in 100 steps (another job, a save)
    step += 100
    progress.update(step, 2.0, 0.1)
    after_stall = eta(out.getvalue().splitlines()[-1])
    assert steady < after_stall < 1.3 * steady   # measured over that line alone, the eta would be 100x the steady one
    step, recovered = run(progress, clock, step, 100_000, 1e-3)
    assert recovered < 1.1 * (10**7 - step) * 1e-3
    step, slower = run(progress, clock, step, int(6 * SPEED_MEMORY / 2e-3), 2e-3)   # half the pace, for 6 memories
    assert abs(slower - (10**7 - step) * 2e-3) / slower < 0.01


def test_the_first_line_is_the_plain_average():
    clock, out = Clock(), io.StringIO()
    progress = Progress(1000, 100, out, clock=clock)
    clock.now = 0.5
    progress.update(100, 2.0, 0.1)
    assert "200 steps/s | eta 4s" in out.getvalue()
