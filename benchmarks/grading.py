"""Grading time per exercise: `handprop grade` on each worked solution, against running the same file alone.

For every exercise of the registry (or those named), the worked solution (`handprop exercise solution`) is
written to a temporary folder; then, keeping each one's best of `--repeats` turns: (a) the file without its
closing grade(globals()) call run alone as __main__ (learner.run_learner: the setup, the forward and the
solution, every gradient's versions recorded), the baseline; (b) the whole of `handprop grade` in-process
on the file as written (the run, its own grade call, then the forward check, autograd's gradients step by
step, every version graded). The ratio b/a is what grading
adds. Issue 20 asks for at most 10 s for the largest exercise on 2 cores: measure it on a quiet machine.

Threads: torch.set_num_threads(`--threads`, default 1), as `handprop grade` runs on a shared machine.

    python benchmarks/grading.py [mlp attention ...] [--repeats 3] [--threads 1]
"""

import argparse
import io
import tempfile
import time
from pathlib import Path

import torch

from handprop.ninja.exercises import EXERCISES
from handprop.ninja.grade import grade_script
from handprop.ninja.learner import run_learner
from handprop.ninja.starter import write_solution


def best_of(repeats, run):
    """The fastest of repeats calls of run, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(EXERCISES), help="exercises (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="turns each, the best kept (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'exercise':18s} {'run alone':>10s} {'graded':>10s} {'ratio':>7s}")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.names:
            path, bare = Path(folder) / f"{name}.py", Path(folder) / f"{name}_alone.py"
            write_solution(EXERCISES[name], path)
            bare.write_text(path.read_text().rsplit("\nresult = grade(", 1)[0] + "\n")
            grade_script(path, io.StringIO())           # warm: imports, the data the setup reads
            alone = best_of(args.repeats, lambda bare=bare: run_learner(bare))
            graded = best_of(args.repeats, lambda path=path: grade_script(path, io.StringIO()))
            print(f"{name:18s} {alone:9.2f}s {graded:9.2f}s {graded / alone:6.1f}x")


if __name__ == "__main__":
    main()
