"""How a run stops: SIGINT and SIGTERM become a flag the loop reads between steps, or a stop at once where
nothing would be lost, and every stop says which checkpoint is kept and how to go on."""

import signal
from contextlib import contextmanager


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped training after a checkpoint was saved; exit with 128 + signal."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


@contextmanager
def signal_handler(handler):
    """While active, handler(signum) runs on SIGINT and SIGTERM instead of their default action."""
    previous = {s: signal.signal(s, lambda signum, frame: handler(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


@contextmanager
def stop_requests():
    """While active, SIGINT and SIGTERM only set a flag, so the loop stops between two steps."""
    requested = []
    with signal_handler(requested.append):
        yield requested


def resume_hint(work_dir):
    return f"continue with: handprop train --resume -o {work_dir}"


@contextmanager
def stop_at_once(work_dir, step):
    """While active, SIGINT and SIGTERM stop at once: the checkpoint at step is already saved."""

    def stop(signum):
        name = signal.Signals(signum).name
        raise Interrupted(signum, f"{name} during the final evaluation: the checkpoint at step {step} is kept; "
                                  + resume_hint(work_dir))

    with signal_handler(stop):
        yield


def interruption(error):
    """The Interrupted that error is or was raised from (Inductor wraps what a step of its work raises), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, Interrupted):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__ or getattr(error, "inner_exception", None)
    return None


def stopped(signum, run, work_dir):
    """The Interrupted for a stop that signum asked for, once the run's checkpoint is saved."""
    name = signal.Signals(signum).name
    return Interrupted(signum, f"{name} at step {run.step}: checkpoint saved; {resume_hint(work_dir)}")
