"""How many threads a command runs on: decided here, not left at torch's default of one per core.

Every small kernel of a step (Inductor's fused loops, MKL's small matrix products) ends at a
barrier that waits for all its threads, and OpenMP's waiting threads spin. When another process
takes a core, one of the step's threads is descheduled and the others spin at the barrier until
it comes back: measured on 2 cores beside one busy loop, the mlp at 2 threads ran 4-7x slower
and the transformer 7x or more, where one thread lost nothing (docs/performance.md, Threads).

The rule, `--threads auto` (the default):
- A step gains from another thread only when each kernel has the work to share: one thread per
  WORK_PER_THREAD multiply-adds of its average matrix product (counted on one forward pass; the
  backward's products have the same sizes). Measured on 2 idle cores (benchmarks/under_load.py):
  the gru (2.6M a product) runs 1.5x faster on 2 threads, the transformer (4.3M) 1.3x and wavenet
  (1.0M) 1.15x, while the rnn (0.3M), the bigram and the lecture's mlp (0.2M) run slower.
- Never more than the cores this process may use (its CPU affinity, a cgroup's CPU quota) and,
  under torchrun, its rank's share of them; an OMP_NUM_THREADS the user set is obeyed as is.
- A run that would take more than 1 uses them only while other processes leave the cores free:
  every WATCH_SECONDS it reads what the others take (their CPU time in /proc/stat, and how many
  of them are waiting to run, which counts a nice 19 process too) and drops to what is free at
  once (the barrier costs 7x), going back up only after QUIET_READINGS free readings in a row
  (a wrong 1 costs the gru 1.5x, the transformer 1.3x).
Inductor writes the thread count into its kernels, so a compiled run keeps one step per count
(OnePerCount), compiling a second only when the run first switches (and, under --compile auto,
racing it against the eager step again: which is faster depends on the count).
"""

import math
import os
import time
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from .errors import UserError
from .layers import eval_mode
from .packing import capacity, pack

AUTO = "auto"
MOST_THREADS = 1024                 # the largest --threads N
WORK_PER_THREAD = 500_000           # multiply-adds of an average matrix product per thread: wavenet's 1.0M keeps 2 busy
FREE_SHARE = 0.25                   # a core counts as free while other processes take at most this share of it
WATCH_SECONDS = 2.0                 # how often a run that gains from more threads reads the machine's load
QUIET_READINGS = 2                  # free readings in a row before a run takes its threads back
FIRST_READING_SECONDS = 0.1         # the shortest interval a first reading of the load spans


def parse_threads(text):
    """'auto' or a whole number of threads from 1 to MOST_THREADS, as the setting stores it; ValueError if neither."""
    text = str(text).strip().lower()
    if text == AUTO:
        return AUTO
    if not text.isdigit() or not 1 <= int(text) <= MOST_THREADS:
        raise ValueError(f"expected auto or a whole number of threads from 1 to {MOST_THREADS:,}, got {text!r}")
    return str(int(text))


def allowed_cores(quota_file="/sys/fs/cgroup/cpu.max"):
    """Cores this process may run on: its CPU affinity (taskset, a scheduler's cpuset), at most a cgroup's quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path(quota_file).read_text().split()[:2]
    except (OSError, ValueError):
        return cores                        # no cgroup v2 quota file here
    if quota == "max":
        return cores
    return max(1, min(cores, math.ceil(int(quota) / int(period))))


def local_ranks(environ):
    """How many processes of a torchrun launch run on this machine (1 alone)."""
    try:
        return max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        raise UserError(f"LOCAL_WORLD_SIZE must be a whole number (torchrun sets it), got "
                        f"{environ['LOCAL_WORLD_SIZE']!r}") from None


def environment_threads(environ, ranks):
    """OMP_NUM_THREADS as a count where the user set it, else None.

    torchrun sets OMP_NUM_THREADS=1 itself for several ranks on a machine when it is unset, so there
    a 1 is taken as torchrun's and the ranks share the cores instead.
    """
    text = environ.get("OMP_NUM_THREADS", "").strip()
    if not text or (ranks > 1 and text == "1"):
        return None
    first = text.split(",")[0].strip()      # OpenMP allows a list, one count per nesting level
    if not first.isdigit() or int(first) < 1:
        raise UserError(f"OMP_NUM_THREADS must be a whole number of threads, got {text!r} (or unset it: handprop "
                        "chooses with --threads)")
    return int(first)


class MatrixProducts(TorchFunctionMode):
    """While active, counts the matrix products torch is asked for and their multiply-adds (torch's own counter,
    FlopCounterMode, costs every command a second to import the compiler)."""

    # where the right operand is among the arguments
    RIGHT = {"__matmul__": 1, "matmul": 1, "mm": 1, "bmm": 1, "addmm": 2, "baddbmm": 2, "__rmatmul__": 0}

    def __init__(self):
        super().__init__()
        self.work, self.products = 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        place = self.RIGHT.get(getattr(func, "__name__", ""))
        if place is not None:               # (..., n, k) @ (..., k, m): n*m outputs of k multiply-adds each
            right = args[place]
            self.work += out.numel() * (right.shape[-2] if right.dim() > 1 else right.shape[0])
            self.products += 1
        return out


def forward_products(model, X):
    """The matrix products of one forward pass of model over X, in evaluation mode (nothing is updated; the same
    products as in training): (their multiply-adds, how many there are)."""
    with eval_mode(model), MatrixProducts() as counter:
        model.forward(X)
    return counter.work, counter.products


def step_work(model, examples, batch_size):
    """The multiply-adds of a training step's average matrix product: a forward pass over a batch as wide as the
    split's widest (every batch of the compiled step), or over the rows a packed batch computes (packing.py); the
    backward's two products for each forward one (dX = dY W^T, dW = X^T dY) have its size."""
    rows = torch.zeros(batch_size, dtype=torch.long, device=examples.stream.device)     # any rows, padded to the width
    X, Y = examples.batch(rows, padded_to=examples.width)
    if model.packs:                         # any cells: the products' sizes depend on how many only
        X, Y = pack(X, Y, torch.arange(capacity(examples, batch_size), device=X.device))
    work, products = forward_products(model, X)
    return work // max(1, products)


def wanted_threads(work, cores):
    """How many threads matrix products of work multiply-adds keep busy: one per WORK_PER_THREAD, at most cores, at
    least 1."""
    return max(1, min(cores, work // WORK_PER_THREAD))


class Load:
    """How many cores other processes take, read from /proc/stat against this process's own CPU time.

    Two signals, the larger counts: the others' share of the cores' time since the last reading, and
    how many of the others wait to run right now. A nice 19 process gets little CPU time beside a
    spinning run, yet each time it runs it stalls every barrier: it shows as waiting to run.
    """

    def __init__(self, cpus, proc=Path("/proc"), clock=time.monotonic, own_time=time.process_time):
        self.cpus = {f"cpu{n}" for n in cpus}      # the cores of this process's affinity
        self.proc, self.clock, self.own_time = Path(proc), clock, own_time
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100    # /proc/stat counts in ticks
        self.last = self.reading()

    @classmethod
    def of_this_machine(cls):
        """A Load for this process, or None where /proc/stat cannot be read (not Linux)."""
        try:
            return cls(os.sched_getaffinity(0))
        except (OSError, AttributeError, ValueError):
            return None

    def reading(self):
        """(when, busy seconds of the affinity's cores, this process's CPU seconds, tasks running or waiting)."""
        busy, running = 0.0, 0
        for line in (self.proc / "stat").read_text().splitlines():
            name, *numbers = line.split() or [""]
            if name in self.cpus:           # user nice system idle iowait irq softirq steal ...
                ticks = [int(n) for n in numbers[:8]]
                busy += (sum(ticks) - ticks[3] - ticks[4]) / self.tick
            elif name == "procs_running":
                running = int(numbers[0])
        return self.clock(), busy, self.own_time(), running

    def own_running(self):
        """This process's threads that are running or waiting to run."""
        count = 0
        for stat in (self.proc / "self" / "task").glob("*/stat"):
            try:
                count += stat.read_text().rsplit(")", 1)[1].split()[0] == "R"
            except (OSError, IndexError):
                continue                    # a thread that ended meanwhile
        return count

    def waiting(self):
        """Other tasks running or waiting to run: the fewest of a few looks, so that a passing one (a shell
        command, a kernel thread) is not counted. Each look counts all tasks first, then this process's own: between
        two steps its threads only stop spinning, never start, so a change between the two can only add one, which
        another look will not."""
        looks = []
        for _ in range(3):
            running = self.reading()[3]
            looks.append(running - self.own_running())
        return max(0, min(looks))

    def others(self):
        """Cores' worth the other processes take: their share of the time since the last call (or since this
        Load was made), or how many wait to run now, whichever is more."""
        when, busy, own, _ = self.reading()
        if when - self.last[0] < FIRST_READING_SECONDS:     # too short to tell: wait, then read again
            time.sleep(FIRST_READING_SECONDS - (when - self.last[0]))
            when, busy, own, _ = self.reading()
        then, busy_then, own_then, _ = self.last
        self.last = when, busy, own, 0
        taken = max(0.0, (busy - busy_then) - (own - own_then)) / (when - then)
        return max(taken, float(self.waiting()))


class Threads:
    """The thread count a command runs on, set in torch, with why; watch() may change it between two steps.

    load is None: fixed. Otherwise the count follows the free cores, from 1 up to wanted, as the
    module's docstring says; say(line) reports each change.
    """

    def __init__(self, count, reason, wanted=None, cores=None, load=None, taken=0.0, clock=time.monotonic, say=None):
        self.count, self.reason = count, reason
        self.wanted = wanted or count       # what the step gains from while the cores are free
        self.cores = cores                  # the cores this process may use
        self.taken = taken                  # cores' worth other processes took at the latest reading
        self.load, self.clock, self.say = load, clock, say or (lambda line: None)
        self.next_reading = clock() + WATCH_SECONDS
        self.free_readings = 0              # readings in a row that found more cores free than the count
        torch.set_num_threads(count)

    def describe(self):
        """The log line: how many threads and why."""
        if self.load is None:
            return f"threads: {self.count} ({self.reason})"
        if self.count < self.wanted:
            return (f"threads: {self.count} for now ({self.reason}, but other processes take {self.taken:.1f} of "
                    f"{self.cores} cores; the load is read every {WATCH_SECONDS:g} s)")
        return (f"threads: {self.count} ({self.reason}; fewer while other processes take cores: the load is read "
                f"every {WATCH_SECONDS:g} s)")

    def watch(self, step):
        """Between two steps: every WATCH_SECONDS, read the load and set the count it allows; True if it changed."""
        if self.load is None or self.clock() < self.next_reading:
            return False
        self.taken = self.load.others()
        self.next_reading = self.clock() + WATCH_SECONDS
        allowed = max(1, min(self.wanted, free_cores(self.cores, self.taken)))
        if allowed > self.count:            # back up only once it stays free: a wrong 2 costs far more than a wrong 1
            self.free_readings += 1
            if self.free_readings < QUIET_READINGS:
                return False
        self.free_readings = 0
        if allowed == self.count:
            return False
        why = "the cores are free again" if allowed > self.count else \
            f"other processes take {self.taken:.1f} of {self.cores} cores"
        self.set(allowed, f"from step {step}: {why}")
        return True

    def set(self, count, why):
        self.count = count
        torch.set_num_threads(count)
        self.say(f"threads: {count} {why}")

    def pin(self, count, why):
        """Keep count from now on: the watching stops."""
        self.load = None
        self.set(count, why)


def free_cores(cores, taken):
    """Whole cores left free when other processes take taken cores' worth (a core they barely use counts)."""
    return max(0, math.floor(cores - taken + FREE_SHARE))


def short(work):
    """Multiply-adds as people read them: 1.09M, 317M, 2.5G."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if work >= size:
            return f"{work / size:.3g}{unit}"
    return str(work)


def choose_threads(setting, work, environ=None, cores=None, load=None, say=None):
    """The Threads of a command whose matrix products do work multiply-adds each, under setting ('auto' or 'N').

    cores and load default to this process's (allowed_cores, Load.of_this_machine); tests give their own.
    """
    environ = os.environ if environ is None else environ
    ranks = local_ranks(environ)
    cores = allowed_cores() if cores is None else cores
    share = max(1, cores // ranks)
    if setting != AUTO:
        more = "" if int(setting) <= share else \
            f"; more than the {share} core{'s' * (share > 1)} it may use: expect its barriers to wait"
        return Threads(int(setting), f"--threads {setting}{more}")
    chosen = environment_threads(environ, ranks)
    if chosen is not None:
        return Threads(chosen, f"OMP_NUM_THREADS={environ['OMP_NUM_THREADS']} in the environment")
    wanted = wanted_threads(work, share)
    shared = f"; {ranks} ranks share this machine's {cores} cores" if ranks > 1 else ""
    step = f"auto: matrix products of {short(work)} multiply-adds"
    if wanted_threads(work, MOST_THREADS) == 1:
        return Threads(1, f"{step} gain nothing from a second thread{shared}")
    if wanted == 1:
        where = f"{ranks} ranks share this machine's {cores} cores" if ranks > 1 else "this process may use 1 core"
        return Threads(1, f"{step} would keep {wanted_threads(work, MOST_THREADS)} busy, but {where}")
    reason = f"{step} keep {wanted} busy{shared}"
    load = Load.of_this_machine() if load is None else load
    if load is None:
        return Threads(1, f"{reason}, but the load of this machine cannot be read, and a busy core would stall them")
    taken = load.others()
    return Threads(max(1, min(wanted, free_cores(cores, taken))), reason, wanted, cores, load, taken, say=say)


class Kept:
    """Torch's threads as they are, never watched: what a Run has until train() chooses."""

    def watch(self, step):
        return False


KEPT = Kept()


def line_to(out):
    """say(line) for a log whose last line may be a progress line a terminal redraws: the line goes in its place."""
    return lambda line: out.write(("\r\033[K" if out.isatty() else "") + line + "\n")


def pass_work(model, positions):
    """The multiply-adds of the average matrix product of a pass over positions (eval, sample): each weight matrix
    multiplies every position once."""
    matrices = [p for p in model.parameters().values() if p.dim() == 2]
    return sum(p.numel() for p in matrices) * positions // max(1, len(matrices))


def use_threads(setting, work):
    """Set the threads of a command that runs one pass at a time (eval, sample, check, grade): decided once."""
    return choose_threads(setting or AUTO, work)


class OnePerCount:
    """A compiled run's step per thread count: Inductor writes the count into the kernels it compiles (`#pragma omp
    parallel num_threads(N)`), so a graph compiled for 2 runs 2 threads whatever torch is told later.

    Calls the step for the current count of threads, made with build() the first time that count is taken: the
    graph compiled for it, or under --compile auto whichever of that graph and the eager step a race at this count
    found faster (so the choice is made per count); if build fails, the run stays on the counts it has a step for.
    """

    def __init__(self, first, build, threads):
        self.steps = {threads.count: first}
        self.build, self.threads = build, threads

    def __call__(self, rows, lr, stop=False):
        """step.EagerStep's call, on the step for the threads torch runs on now."""
        if self.threads.count not in self.steps:
            self.compile(self.threads.count)
        return self.steps[self.threads.count](rows, lr, stop)

    def compile(self, count):
        """Make the step for count threads; if that fails, the run keeps a count it has a step for."""
        try:
            self.steps[count] = self.build()
        except Exception as e:              # the first count compiled: a second failing is rare, and not fatal
            kept = next(iter(self.steps))
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            self.threads.pin(kept, f"from now on: compiling the step for {count} failed ({reason})")
