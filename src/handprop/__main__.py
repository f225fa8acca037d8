"""`python -m handprop` and the `handprop` console script: Ctrl-C while torch loads is one line, not a traceback."""

import os
import signal
import sys
from contextlib import contextmanager


@contextmanager
def exit_on_interrupt():
    """While active, Ctrl-C ends the process at once with one line and status 130.

    Used while the command's modules are imported: nothing is written yet, and a KeyboardInterrupt raised inside
    torch's import can be swallowed (the command then runs on) or escape as a traceback.
    """
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield                               # Ctrl-C is ignored (a background job) or someone else handles it
        return

    def stop(signum, frame):
        os.write(2, b"handprop: interrupted\n")     # stderr, unbuffered: exit skips every flush
        os._exit(128 + signum)

    signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv=None):
    """Import the command (torch takes seconds to load), then run it; Ctrl-C while it loads exits 130."""
    try:
        with exit_on_interrupt():
            from .cli import main as run_command
        return run_command(argv)
    except KeyboardInterrupt:               # while the flags are parsed, before the command's own handling
        print("handprop: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
