"""Steps/s alone and beside one busy process: every model's default step with --threads auto, 1 and 2.

For each model of the README's table, the step `handprop train --model NAME` takes by default (the
compiled step where train compiles it: its recipe's runs are long enough, else op by op; and under
--compile auto, op by op at a thread count where the race finds that faster) is timed in two
windows of `--seconds`: alone, then beside one busy process (`python3 -c "while True: pass"`,
started and stopped here), which starts while the steps go on, as it would beside a real run. The
threads are set three ways: auto (threads.choose_threads on the step's work, watched between steps
as train.run_steps watches them, each thread count's compiled graph built before the clock starts),
and 1 and 2 fixed. This benchmark sets the threads itself: they are its subject. Auto decides as if
OMP_NUM_THREADS were unset (the variable would fix the count).
Prints steps/s alone and beside, beside / alone (the acceptance on 2 cores: at least 0.45, a fair
share of one core of two), and alone / the best of fixed 1 and 2 (the acceptance: no lower, within
the noise of the machine).

    python benchmarks/under_load.py [--models mlp transformer] [--seconds 20]

`--train` times the whole default `handprop train` (or `--model NAME`, `--max-steps N`) alone and
beside a busy process, in child processes without OMP_NUM_THREADS (the acceptance: within 2x):

    python benchmarks/under_load.py --train [--model mlp] [--max-steps N] [--threads auto]
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import torch

from handprop.compiled import compile_obstacle, compile_wanted
from handprop.data import load_corpus
from handprop.settings import PRESETS, preset, recipe
from handprop.step import EagerStep
from handprop.threads import AUTO, OnePerCount, choose_threads, step_work
from handprop.train import chosen_step, new_compiled_step, new_run, prepare, step_for_count

TABLE = ("mlp", "wavenet", "mlp-fast", "bigram", "rnn", "gru", "transformer")  # the README's table of models
SETTINGS = (AUTO, "1", "2")
BUSY = [sys.executable, "-c", "while True: pass"]
WITHOUT_OMP = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


@contextmanager
def busy_process():
    """While active, one pure-Python loop keeps a core busy."""
    loop = subprocess.Popen(BUSY)
    try:
        time.sleep(0.2)                     # running before the window opens
        yield
    finally:
        loop.kill()
        loop.wait()


def default_step(run, examples, threads):
    """The step train takes by default for this run on these threads, and whether it compiled it (under --compile
    auto a thread count may still take the eager step, where the race finds that faster: the log on stderr says);
    every thread count the run may take is compiled and raced now, before any clock starts."""
    config = run.spec.train_config
    if not compile_wanted(config, compile_obstacle(config, 1, False)):
        return EagerStep(run.model, run.optimizer, examples.form.criterion(), examples, config.grad_clip), False
    first = threads.count
    torch.set_num_threads(first)            # Inductor compiles for the threads set now: not the last setting's

    def say(line):
        print(line, file=sys.stderr)
    step = OnePerCount(chosen_step(run, examples, new_compiled_step(run, examples), say),
                       lambda: step_for_count(run, examples, say), threads)
    watched = threads.load is not None
    for count in set(range(1, threads.wanted + 1) if watched else ()) - {first}:
        torch.set_num_threads(count)
        step.compile(count)
    torch.set_num_threads(first)
    return step, True


def window(step, threads, examples, run, seconds):
    """(steps/s, thread counts taken) over seconds of steps, the threads watched between steps and each loss read,
    as in train."""
    batch_size, lr = run.spec.train_config.batch_size, run.spec.train_config.lr
    steps, counts, start = 0, set(), time.perf_counter()
    while time.perf_counter() - start < seconds:
        threads.watch(steps)
        counts.add(threads.count)
        step(examples.draw(batch_size, run.generator), lr)      # the loss read on the host, as in train
        steps += 1
    return steps / (time.perf_counter() - start), counts


def measure(name, corpus, seconds):
    """{setting: (steps/s alone, beside, the thread counts taken alone, beside)}, whether the step is compiled."""
    config = recipe(name)
    splits, first = prepare(corpus, preset(name), config, None)
    examples = splits.tensors["train"]
    work = step_work(first.model, examples, config.batch_size)
    rates = {}
    with torch.inference_mode():
        for setting in SETTINGS:
            run = new_run(first.spec)
            threads = choose_threads(setting, work, environ=WITHOUT_OMP, say=lambda line: None)
            step, compiled = default_step(run, examples, threads)
            window(step, threads, examples, run, min(1.0, seconds))     # warm: caches, the first step's allocations
            alone, alone_counts = window(step, threads, examples, run, seconds)
            with busy_process():
                beside, beside_counts = window(step, threads, examples, run, seconds)
            rates[setting] = alone, beside, alone_counts, beside_counts
            time.sleep(0.5)                 # the busy loop gone before the next setting's first reading
    return rates, compiled


def steps_table(models, seconds):
    corpus = load_corpus()
    print(f"threads set by this benchmark: auto (as train decides, OMP_NUM_THREADS ignored), 1 and 2; "
          f"{len(os.sched_getaffinity(0))} cores; windows of {seconds:g} s alone, then beside {' '.join(BUSY[1:])!r}")
    print("auto (a/b): the thread counts it took alone / beside")
    print("| model | step | threads | alone steps/s | beside steps/s | beside / alone | alone / best of 1 and 2 |")
    print("|---|---|---|---|---|---|---|")
    for name in models:
        rates, compiled = measure(name, corpus, seconds)
        best_fixed = max(rates["1"][0], rates["2"][0])
        for setting, (alone, beside, alone_counts, beside_counts) in rates.items():
            taken = "/".join(str(sorted(counts))[1:-1].replace(", ", "-") for counts in (alone_counts, beside_counts))
            shown = f"auto ({taken})" if setting == AUTO else setting
            print(f"| `{name}` | {'compiled' if compiled else 'op by op'} | {shown} | {alone:,.0f} | {beside:,.0f} | "
                  f"**{beside / alone:.2f}** | {alone / best_fixed:.2f} |", flush=True)


def train_seconds(argv, work_dir):
    """Wall seconds of `handprop train argv` into work_dir (removed first), and its threads lines."""
    shutil.rmtree(work_dir, ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "handprop", "train", "-o", str(work_dir), *argv], env=WITHOUT_OMP,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"handprop train failed: {done.stderr.strip()}")
    return seconds, re.findall(r"^threads: .*$", done.stdout, flags=re.MULTILINE)


def train_times(args):
    argv = (["--model", args.model] if args.model else []) + (["--max-steps", str(args.max_steps)]
                                                              if args.max_steps else []) + ["--threads", args.threads]
    print(f"handprop train {' '.join(argv)}: alone, then beside {' '.join(BUSY[1:])!r} (OMP_NUM_THREADS unset)")
    with tempfile.TemporaryDirectory() as scratch:
        alone, alone_threads = train_seconds(argv, os.path.join(scratch, "alone"))
        with busy_process():
            beside, beside_threads = train_seconds(argv, os.path.join(scratch, "beside"))
    print(f"alone {alone:.1f} s; " + "; ".join(alone_threads))
    print(f"beside {beside:.1f} s; " + "; ".join(beside_threads))
    print(f"beside / alone: **{beside / alone:.2f}x** the time (the acceptance: within 2x)")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(PRESETS), default=list(TABLE),
                   help="the models (default: the README's table)")
    p.add_argument("--seconds", type=float, default=20.0, help="each window, alone and beside (default 20)")
    p.add_argument("--train", action="store_true", help="time handprop train instead of the steps")
    p.add_argument("--model", choices=list(PRESETS), default=None, help="--train: the model (default: train's)")
    p.add_argument("--max-steps", type=int, default=None, help="--train: the steps (default: the recipe's)")
    p.add_argument("--threads", default=AUTO, help="--train: its --threads (default auto)")
    args = p.parse_args()
    if args.train:
        train_times(args)
    else:
        steps_table(args.models, args.seconds)


if __name__ == "__main__":
    main()
