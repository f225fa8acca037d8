"""Data pipeline: encoding a corpus into token streams against today's list building, on a generated corpus.

Writes `--mb` MB of name-like lines (lowercase words of 2 to 12 letters, names.txt's letter
frequencies) into a temporary directory, loads it (load_corpus, timed) and splits it (split_items,
timed), and then, each in a fresh subprocess so one's peak memory cannot hide the other's:
- streams: data.encode_splits of every split (what make_splits does once the split is drawn);
- lists: data.build_examples of the first `--list-mb` MB of the training split (the old way,
  Python lists of every window; the whole corpus would not fit), scaled per byte.
Prints MB/s of text encoded and peak memory per byte of text, at `--block-size`: the larger of
the process's VmHWM over its resident size before encoding (reset through /proc/self/clear_refs;
it misses memory the allocator reuses) and tracemalloc's peak (numpy's and Python's allocations,
plus the list building's final tensors, which torch allocates untraced).
The two take turns `--repeats` times; each keeps its best. With `--train-steps N` the corpus
then trains the default model N steps through `handprop train` (the wall time is printed).

    python benchmarks/data.py [--mb 200] [--block-size 8] [--train-steps 1000]
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from handprop.data import load_corpus, split_items

MB = 1 << 20
WORKER = r"""
import json, re, sys, time, tracemalloc
from handprop.data import Vocab, build_examples, encode_splits, load_corpus, split_items, split_order
path, how, block_size, list_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
corpus = load_corpus(path)
vocab = Vocab.from_items(corpus.items)
if how == "streams":                        # the whole corpus, every split
    items, parts = corpus.items, split_order(len(corpus.items))
    def encode():
        return encode_splits(items, parts, vocab)
else:                                       # the first list_bytes of the training split: the old way holds it all
    items, total, count = split_items(corpus.items)[0], 0, 0
    while count < len(items) and total < list_bytes:
        total, count = total + len(items[count]) + 1, count + 1
    items = items[:count]
    def encode():
        return build_examples(items, vocab, block_size)
text_bytes = sum(map(len, items)) + len(items)          # characters and a newline each (names are ASCII)
def kb(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read())[1])
open("/proc/self/clear_refs", "w").write("5")           # the peak resident size starts again from here
before = kb("VmRSS")
start = time.perf_counter()
made = encode()
seconds = time.perf_counter() - start
rss = (kb("VmHWM") - before) * 1024
del made
tracemalloc.start()                         # again, traced: numpy's and Python's allocations (not torch's)
made = encode()
traced = tracemalloc.get_traced_memory()[1] + (0 if how == "streams" else made[0].nbytes + made[1].nbytes)
print(json.dumps({"bytes": text_bytes, "seconds": seconds, "peak": max(rss, traced)}))
"""


def write_corpus(path, size):
    """About size bytes of lowercase name-like lines, letters drawn with names.txt's frequencies."""
    text = "".join(load_corpus().items)
    letters = sorted(set(text))
    weights = [text.count(c) for c in letters]
    rng = random.Random(0)
    with open(path, "w") as f:
        written = 0
        while written < size:
            lengths = [rng.randint(2, 12) for _ in range(100_000)]
            chars = rng.choices(letters, weights, k=sum(lengths))
            block, at = [], 0
            for n in lengths:
                block.append("".join(chars[at : at + n]))
                at += n
            chunk = "\n".join(block) + "\n"
            f.write(chunk)
            written += len(chunk)


def measure(path, how, block_size, list_bytes, threads):
    """One encoding in a fresh process: {'bytes', 'seconds', 'peak'}."""
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    result = subprocess.run([sys.executable, "-c", WORKER, str(path), how, str(block_size), str(list_bytes)],
                            capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=200, help="MB of generated text (default 200)")
    p.add_argument("--list-mb", type=int, default=10, help="MB of the training split the old list building encodes")
    p.add_argument("--block-size", type=int, default=8, help="window length for the list building (default 8)")
    p.add_argument("--repeats", type=int, default=2, help="turns each; the best one counts")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process (default 1)")
    p.add_argument("--train-steps", type=int, default=0, help="then train the default model this many steps on it")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "names.txt"
        write_corpus(path, args.mb * MB)
        print(f"generated {path.stat().st_size / MB:.0f} MB of name-like lines; {args.threads} thread(s)")
        start = time.perf_counter()
        corpus = load_corpus(path)
        print(f"load_corpus: {len(corpus.items)} items in {time.perf_counter() - start:.1f} s "
              f"({path.stat().st_size / MB / (time.perf_counter() - start):.0f} MB/s)")
        start = time.perf_counter()
        split_items(corpus.items)
        print(f"split_items: {time.perf_counter() - start:.1f} s")
        del corpus
        best = {}
        for _ in range(args.repeats):
            for how in ("streams", "lists"):
                run = measure(path, how, args.block_size, args.list_mb * MB, args.threads)
                rate, per_byte = run["bytes"] / MB / run["seconds"], run["peak"] / run["bytes"]
                old = best.get(how)
                best[how] = (max(rate, old[0]), min(per_byte, old[1]), run["bytes"]) if old else (rate, per_byte,
                                                                                                   run["bytes"])
        for how, label in (("streams", "token streams (encode_splits)"), ("lists", "lists (build_examples)")):
            rate, per_byte, size = best[how]
            print(f"{label:30s} {size / MB:6.0f} MB of text: {rate:8.1f} MB/s, peak {per_byte:6.2f} bytes per byte")
        print(f"ratio streams/lists: {best['streams'][0] / best['lists'][0]:.0f}x faster, "
              f"{best['lists'][1] / best['streams'][1]:.0f}x less memory per byte (block size {args.block_size}; "
              "the streams' memory does not depend on it)")
        if args.train_steps:
            start = time.perf_counter()
            work_dir = Path(scratch) / "run"
            subprocess.run([sys.executable, "-m", "handprop", "train", "-i", str(path), "-o", str(work_dir),
                            "--max-steps", str(args.train_steps), "--log-every", str(args.train_steps),
                            "--save-every", str(args.train_steps)],
                           env=os.environ | {"OMP_NUM_THREADS": str(args.threads)}, check=True)
            print(f"trained {args.train_steps} steps on {args.mb} MB (load, split, encode, train, evaluate on every "
                  f"split, save) in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
