"""Data-parallel speed: 1 process against 2 gloo ranks on this machine, same model, same global batch.

Each contender runs train.run_steps' step (step.EagerStep: the global batch drawn, this rank's rows,
hand-written forward and backward, the one-bucket gradient all-reduce, clipping, the recipe's optimiser) for
`--steps` steps, `--repeats` turns, and keeps its best turn. The 2 ranks are real processes joined
on loopback exactly as `torchrun --nproc-per-node 2 -m handprop train` joins them; every process
runs on ONE thread (torch.set_num_threads(1), OMP_NUM_THREADS=1), so 2 ranks use 2 cores against
the single process's 1. Printed per model: steps/s of each and their ratio (>1: 2 ranks are
faster), the share of the 2 ranks' step time spent inside all-reduce calls (the gradient bucket,
and BatchNorm's statistics where the model has any; waiting for the slower rank counts), the
median latency of one tiny all-reduce, and the bytes the gradient all-reduce moves and the FLOPs
of the forward and backward per step.

    python benchmarks/distributed.py [--models mlp transformer] [--steps N] [--repeats 3]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace

import torch
import torch.distributed as dist

from handprop.data import load_corpus
from handprop.distributed import launched
from handprop.models import count_parameters, describe
from handprop.settings import preset, recipe
from handprop.step import EagerStep, schedule_for
from handprop.train import prepare

DEFAULT_STEPS = {"mlp": 2000, "wavenet": 300, "gru": 40, "transformer": 40}   # a turn of a few seconds


class Timed:
    """A function that adds the seconds spent inside it to self.seconds."""

    def __init__(self, fn):
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *args):
        start = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


def matmul_flops(run, tokens):
    """Forward + backward FLOPs of the weight matrices per step: 6 per weight per token (2 forward, 4 backward)."""
    weights = sum(p.numel() for name, p in run.model.parameters().items()
                  if p.ndim == 2 and not name.endswith(("wte", "wpe")) and not name.startswith("0."))
    return 6 * weights * tokens


def steps(run, examples, step, count, schedule):
    """count steps of train.run_steps' step on the global batches it draws."""
    for _ in range(count):
        step(examples.draw(run.spec.train_config.batch_size, run.generator), schedule(run.step))
        run.step += 1


def median_all_reduce_seconds(calls=200):
    """The median time of one all-reduce of a single float: the latency every call pays."""
    tiny, times = torch.zeros(1), []
    for _ in range(calls):
        start = time.perf_counter()
        dist.all_reduce(tiny)
        times.append(time.perf_counter() - start)
    return sorted(times)[calls // 2]


def worker(name, count, repeats):
    """One contender's process (alone, or a rank): its best turn, as one JSON line from rank 0."""
    torch.set_num_threads(1)
    world = launched("cpu")
    bucket = world.all_reduce = Timed(world.all_reduce)
    batchnorm = world.sum_over_ranks = Timed(world.sum_over_ranks) if world.size > 1 else Timed(None)
    with world.joined(), torch.inference_mode():
        model_config = preset(name)
        config = replace(recipe(name), max_steps=(repeats + 1) * count, warmup=0)
        splits, run = prepare(load_corpus(None), model_config, config, None)
        world.attach(run.model, config.batch_size)
        examples, schedule = splits.tensors["train"], schedule_for(config)
        step = EagerStep(run.model, run.optimizer, examples.form.criterion(), examples, config.grad_clip, world)
        steps(run, examples, step, max(1, count // 10), schedule)      # warm up
        turns = []
        for _ in range(repeats):
            if world.size > 1:
                dist.barrier()              # both ranks start the turn together
            bucket.seconds = batchnorm.seconds = 0.0
            start = time.perf_counter()
            steps(run, examples, step, count, schedule)
            elapsed = time.perf_counter() - start
            turns.append((count / elapsed, (bucket.seconds + batchnorm.seconds) / elapsed))
        rate, share = max(turns)
        latency = median_all_reduce_seconds() if world.size > 1 else 0.0
        tokens = round(config.batch_size * examples.scored() / len(examples))    # positions scored, on average
        if world.is_main:
            print(json.dumps({"rate": rate, "share": share, "params": count_parameters(run.model),
                              "flops": matmul_flops(run, tokens), "tokens": tokens,
                              "describe": describe(run.spec.model_config),
                              "all_reduces": (bucket.calls + batchnorm.calls) / (bucket.calls or 1),
                              "latency": latency}))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def contender(name, count, repeats, ranks):
    """Start 1 process or `ranks` ranks on loopback for one model; rank 0's JSON result."""
    argv = [sys.executable, __file__, "--worker", name, "--steps", str(count), "--repeats", str(repeats)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    if ranks > 1:
        port = free_port()
        envs = [env | {"RANK": str(r), "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)} for r in range(ranks)]
    else:
        envs = [{k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}]
    processes = [subprocess.Popen(argv, env=e, stdout=subprocess.PIPE, text=True) for e in envs]
    outputs = [p.communicate()[0] for p in processes]
    if any(p.returncode for p in processes):
        sys.exit(f"a contender for {name} failed")
    return json.loads(outputs[0].strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "transformer"])
    parser.add_argument("--steps", type=int, default=None, help="steps per turn (default: a few seconds' worth)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.repeats)
        return
    print(f"{os.cpu_count()} CPU cores; every process on 1 thread; 2 ranks: gloo on loopback; best of "
          f"{args.repeats} turns")
    for name in args.models:
        count = args.steps or DEFAULT_STEPS.get(name, 200)
        one = contender(name, count, args.repeats, 1)
        two = contender(name, count, args.repeats, 2)
        ratio, reducing = two["rate"] / one["rate"], 1e3 * two["share"] / two["rate"]     # ms a step
        print(f"{name} ({one['describe']}; {one['params']:,} parameters, {one['tokens']} positions a step):\n"
              f"  1 process {one['rate']:,.1f} steps/s, 2 ranks {two['rate']:,.1f} steps/s: {ratio:.2f}x\n"
              f"  all-reduce: {100 * two['share']:.0f}% of the 2 ranks' step time ({reducing:.2f} ms a step), "
              f"{two['all_reduces']:.0f} call(s) a step, gradient bucket {4 * one['params'] / 1e3:,.0f} kB; "
              f"one all-reduce of one float: median {1e6 * two['latency']:,.0f} µs\n"
              f"  forward + backward: {one['flops'] / 1e6:,.1f} MFLOP a step in weight matrices, "
              f"{one['flops'] / (4 * one['params']):,.0f} FLOP per gradient byte")


if __name__ == "__main__":
    main()
