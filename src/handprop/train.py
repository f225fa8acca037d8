"""The training loop (autograd off throughout), evaluation, BatchNorm recalibration, saving."""

import fcntl
import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .checkpoint import (
    BEST,
    CONFIG_JSON,
    LATEST,
    Checkpoint,
    RunSpec,
    check_same_corpus,
    load_checkpoint,
    metadata,
    save_checkpoint,
    tensors_digest,
    write_readable_config,
)
from .compiled import CompiledStep, compile_obstacle, compile_wanted, long_enough
from .data import IGNORED, SPLIT_NAMES, check_sequence_length, make_splits
from .diagnostics import NoDiagnostics, start_diagnostics
from .distributed import ALONE, RankLost, World
from .errors import UserError
from .layers import BatchNorm1d, Dropout, eval_mode, walk
from .losses import CrossEntropy, SequenceCrossEntropy
from .models import build_model, count_parameters, describe
from .optim import clip_grad_norm, make_optimizer, make_schedule
from .threads import KEPT, OnePerCount, choose_threads, line_to, step_work

EVAL_CHUNK = 4096           # examples per forward pass when evaluating: small enough to stay in cache


def loss_for(form):
    """The loss of a data form: the lectures' cross-entropy, or the one that skips padded positions."""
    return CrossEntropy() if form == "windows" else SequenceCrossEntropy()


def split_loss(model, examples):
    """Mean cross-entropy over every scored position of a whole split (data.Examples), in chunks, in evaluation mode."""
    criterion = loss_for(examples.form)
    total, count = 0.0, 0
    chunk = EVAL_CHUNK if examples.form == "windows" else max(1, EVAL_CHUNK // examples.width)  # positions a pass
    with eval_mode(model):
        for Xc, Yc in examples.chunks(chunk):
            scored = int((Yc != IGNORED).sum())     # every window; the unpadded positions of sequences
            total += criterion.forward(model.forward(Xc), Yc).item() * scored
            count += scored
    return total / count


def make_run_splits(corpus, model_config, vocab=None, device="cpu"):
    """The splits in the form the model reads; a sequence model's positions must fit the longest item."""
    if model_config.form == "windows":
        return make_splits(corpus, model_config.block_size, vocab=vocab, device=device)
    splits = make_splits(corpus, None, vocab=vocab, device=device, form="sequences")   # padded to longest + 1
    if model_config.block_size:
        check_sequence_length(max(len(item) for item in corpus.items), model_config.block_size)
    return splits


def evaluate(model, splits):
    """{'train': loss, 'val': loss, 'test': loss} on the full splits."""
    return {name: split_loss(model, splits.tensors[name]) for name in SPLIT_NAMES}


def recalibrate_batchnorm(model, examples):
    """Set every BatchNorm's running mean and (n-1) variance to exact statistics over the inputs of examples.

    As at the end of the lecture's exercise 4: the momentum estimates lag the weights, so
    after training each BatchNorm is re-estimated in order, the earlier ones already fixed.
    """
    with eval_mode(model):
        for k, layer in enumerate(model.layers):
            if not isinstance(layer, BatchNorm1d):
                continue
            n, total, total_sq = 0, 0.0, 0.0
            for h, _ in examples.chunks(EVAL_CHUNK):
                for earlier in model.layers[:k]:
                    h = earlier.forward(h)
                h = h.reshape(-1, h.shape[-1]).double()            # (N, C), float64 sums
                n, total, total_sq = n + h.shape[0], total + h.sum(0), total_sq + (h * h).sum(0)
            mean = total / n
            layer.running_mean.copy_(mean)
            layer.running_var.copy_((total_sq - n * mean * mean) / (n - 1))


class Log:
    """A text stream that goes quiet when its reader goes away (`handprop train | head`): the run matters more."""

    def __init__(self, stream, open=True):
        self.stream, self.open = stream, open   # open=False: silent from the start (ranks other than 0)

    def write(self, text):
        if self.open:
            try:
                self.stream.write(text)
                self.stream.flush()
            except BrokenPipeError:
                self.open = False

    def isatty(self):
        return self.stream.isatty()


class Progress:
    """Step, loss, learning rate and speed: one updating line on a terminal, else a line every log_every steps."""

    def __init__(self, max_steps, log_every, stream=None, start_step=0):
        self.max_steps, self.log_every = max_steps, log_every
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.last_time, self.last_step, self.last_draw = time.perf_counter(), start_step, 0.0
        self.val = None                         # val loss at the latest checkpoint, shown once known

    def due(self, step):
        """Whether update() should print at this step (the last step always prints)."""
        if step == self.max_steps:
            return True
        return time.perf_counter() - self.last_draw > 0.2 if self.tty else step % self.log_every == 0

    def update(self, step, loss, lr):
        now = time.perf_counter()
        speed = (step - self.last_step) / max(now - self.last_time, 1e-9)
        eta = (self.max_steps - step) / max(speed, 1e-9)
        line = (f"step {step:>{len(str(self.max_steps))}}/{self.max_steps} | loss {loss:.4f} | lr {lr:g} | "
                f"{speed:,.0f} steps/s | eta {eta:,.0f}s")
        if self.val is not None:
            line += f" | val {self.val:.4f} at the last save"
        if self.tty:                            # speed averaged since the run (re)started
            self.stream.write("\r" + line + "\033[K" + ("\n" if step == self.max_steps else ""))
        else:
            self.stream.write(line + "\n")
            self.last_time, self.last_step = now, step   # speed since the previous line
        self.last_draw = now


def check_work_dir(work_dir):
    """Before anything is read: -o must name a directory (or nothing yet) that no other handprop train is using."""
    work_dir = Path(work_dir)
    if work_dir.exists() and not work_dir.is_dir():
        raise UserError(f"{work_dir} is a file, not a directory: -o names the directory a run is saved in")
    if work_dir.is_dir():
        with locked(work_dir):
            pass


@contextmanager
def locked(work_dir):
    """While active, no other handprop train can lock work_dir (an flock on the directory, freed on any exit)."""
    fd = os.open(work_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another handprop train is using {work_dir}; wait for it to end, or choose another -o "
                            "(eval, sample and diagnose may read it meanwhile)") from None
        yield
    finally:
        os.close(fd)


@contextmanager
def claimed(work_dir, resume_from):
    """While active, this process alone trains in work_dir, whose run is still the one this command read."""
    with locked(work_dir):
        latest = Path(work_dir) / LATEST
        if resume_from is None and latest.exists():
            raise UserError(f"{work_dir} already holds a run (another handprop train saved it meanwhile); continue it "
                            "with --resume, or choose another -o")
        if resume_from is not None and metadata(load_checkpoint(latest)) != metadata(resume_from):
            raise UserError(f"the run in {work_dir} was saved by another handprop train after this one read it; "
                            "run the command again")
        yield


def check_writable(work_dir):
    """Create work_dir if needed and prove a file can be written there, before any training."""
    work_dir = Path(work_dir)
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        probe = work_dir / f".handprop-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output directory {work_dir}: {e.strerror}") from None


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


@contextmanager
def saving(work_dir, run):
    """Turns a failed write (no permission, a full disk) into one UserError that says which checkpoint is kept."""
    try:
        yield
    except OSError as e:
        kept = (f"the last good checkpoint (step {run.saved_step}) is kept" if run.saved_step is not None
                else "no checkpoint to resume was saved")
        raise UserError(f"cannot save in {work_dir}: {e.strerror or e}; {kept}") from None


@dataclass
class Run:
    """A run in memory: the model, the optimiser and the batch order, and how far it got."""

    spec: RunSpec
    model: object
    optimizer: object
    generator: torch.Generator      # batch order; its state is saved so a resumed run draws the same batches
    step: int = 0                   # optimisation steps done
    best_val: float = math.inf      # lowest val loss at a save, for best.safetensors
    saved_step: int | None = None   # the step of the latest checkpoint on disk
    world: World = ALONE            # the ranks sharing each batch; rank 0 alone writes
    threads: object = KEPT          # threads.Threads: how many the steps run on, watched between steps

    def checkpoint(self, finished=False, losses=None):
        tensors, numbers = self.optimizer.state_dict()
        extra = {f"optim.{k}": v for k, v in tensors.items()} | {"rng.batches": self.generator.get_state()}
        return Checkpoint(self.spec, self.model, self.step, self.best_val, finished, losses, numbers, extra,
                          self.world.size)

    def digest(self):
        """A hash of everything the next step depends on: ranks must start from equal digests."""
        state = self.model.parameters() | self.model.buffers() | {"rng.batches": self.generator.get_state()}
        return tensors_digest(state, json.dumps(metadata(self.checkpoint()), sort_keys=True))

    def save_latest(self, work_dir, val, diagnostics, finished=False, losses=None):
        """The latest checkpoint (and the best one when val beats every earlier save), config.json, diagnostics."""
        work_dir = Path(work_dir)
        if not self.world.is_main:          # the same state as rank 0, nothing written
            self.best_val, self.saved_step = min(self.best_val, val), self.step
            return val
        with saving(work_dir, self):
            if val < self.best_val:
                self.best_val = val
                save_checkpoint(work_dir / BEST, self.checkpoint(finished, losses))
            checkpoint = self.checkpoint(finished, losses)
            save_checkpoint(work_dir / LATEST, checkpoint)
            self.saved_step = self.step
            write_readable_config(work_dir / CONFIG_JSON, checkpoint)
            if finished:                    # the diagnostics beside the checkpoint they belong to
                diagnostics.finish(work_dir)
            else:
                diagnostics.save(work_dir)
        return val


def new_run(spec):
    config = spec.train_config
    generator = torch.Generator().manual_seed(config.seed)
    model = build_model(spec.model_config, generator, device=config.device)
    optimizer = make_optimizer(config.optimizer, model.parameters(), config.weight_decay)
    return Run(spec, model, optimizer, generator)


def resumed_run(checkpoint, config):
    """The saved run, going on under config (which may differ only in RESUME_MAY_CHANGE)."""
    generator = torch.Generator()
    generator.set_state(checkpoint.extra["rng.batches"])
    optimizer = make_optimizer(config.optimizer, checkpoint.model.parameters(), config.weight_decay)
    tensors = {k.removeprefix("optim."): v.to(config.device) for k, v in checkpoint.extra.items()
               if k.startswith("optim.")}
    optimizer.load_state_dict(tensors, checkpoint.optimizer_state)
    spec = replace(checkpoint.spec, train_config=config)
    for layer in walk(checkpoint.model):
        if isinstance(layer, Dropout):
            layer.generator = generator     # the masks go on from the saved state, as the batches do
    return Run(spec, checkpoint.model, optimizer, generator, checkpoint.step, checkpoint.best_val, checkpoint.step)


def prepare(corpus, model_config, config, resume_from):
    """The splits and the run (new, or continued from a checkpoint); checks every input, writes nothing."""
    vocab = None
    if resume_from is not None:
        check_same_corpus(resume_from.spec, corpus)
        vocab = resume_from.spec.vocab
    splits = make_run_splits(corpus, model_config, vocab, config.device)
    if resume_from is not None:
        if splits.signature() != resume_from.spec.split_signature:
            raise UserError("the data split differs from the one this run started with")
        return splits, resumed_run(resume_from, config)
    model_config = replace(model_config, vocab_size=splits.vocab.size)
    if model_config.block_size == 0:        # a sequence model: as many positions as the longest item needs
        model_config = replace(model_config, block_size=splits.tensors["train"].width)
    spec = RunSpec(model_config, config, splits.vocab, corpus.info(), splits.signature(),
                   max(len(item) for item in corpus.items))
    return splits, new_run(spec)


@contextmanager
def owned(work_dir, resume_from, world):
    """While active, rank 0 (or the only process) has work_dir, writable and claimed; other ranks write nothing."""
    if not world.is_main:
        yield
        return
    check_writable(work_dir)
    with claimed(work_dir, resume_from):
        yield


def train(corpus, model_config, config, work_dir, resume_from=None, out=None, world=ALONE):
    """Train by hand-written backprop (from scratch or a checkpoint) on world's ranks; save, return (model, losses)."""
    out = Log(out or sys.stdout, open=world.is_main)
    started = time.perf_counter()
    with torch.inference_mode():            # no graph is ever recorded: every gradient is by hand
        # prepare: the data and the run, every input checked before the first file is written
        splits, run = prepare(corpus, model_config, config, resume_from)
        first_step = run.step
        # the compiled step or not, decided (and --compile on's conflicts refused) before anything is written
        obstacle = compile_obstacle(config, world.size, config.diagnostics_every > 0)
        wanted = compile_wanted(config, obstacle)
        run.world = world
        run.threads = choose_threads(config.threads, step_work(run.model, splits.tensors["train"], config.batch_size),
                                     say=line_to(out))
        world.attach(run.model, config.batch_size)
        world.check_same(run.digest)
        with owned(work_dir, resume_from, world):   # held to the end: a second train on work_dir is refused
            sizes = " / ".join(f"{examples.scored()}" for examples in splits.tensors.values())
            out.write(f"{corpus.describe()}, vocabulary {splits.vocab.size}, characters to predict "
                      f"train/val/test {sizes}\n")
            out.write(f"model {describe(run.spec.model_config)}: {count_parameters(run.model)} parameters"
                      + (f", resuming at step {run.step}" if resume_from else "") + "\n")
            if world.size > 1:
                out.write(world.describe(config.batch_size) + "\n")
            out.write(run.threads.describe() + "\n")

            def val_loss():
                return split_loss(run.model, splits.tensors["val"])

            diagnostics = start_diagnostics(run.model, config, work_dir, run.step, val_loss) if world.is_main \
                else NoDiagnostics()
            compiled = None                 # before the first save: a failed --compile on leaves no run behind
            if wanted:
                compiled = compiled_step(run, splits.tensors["train"], work_dir, out)
                if compiled:                # and a graph for each other thread count the run switches to
                    compiled = OnePerCount(compiled, lambda: new_compiled_step(run, splits.tensors["train"]),
                                           run.threads, line_to(out))
            elif config.compile == "auto" and long_enough(config):
                out.write(f"training op by op, not compiled: {obstacle}\n")    # long enough, but it cannot be
            if run.saved_step is None:      # from step 0 on there is always a checkpoint to resume
                run.save_latest(work_dir, val_loss(), diagnostics)
            # the loop, which saves its last step: the trained weights are on disk before the final phase
            try:
                run_steps(run, splits, work_dir, out, diagnostics, val_loss, compiled)
            except RankLost as e:
                raise RankLost(f"{e} at step {run.step}; the last checkpoint (step {run.saved_step}) is kept in "
                               f"{work_dir}; {resume_hint(work_dir)}") from None
            # finish: exact BatchNorm statistics, the losses on every split, the last save
            losses = finish(run, splits, work_dir, diagnostics, out)
    out.write(wall_time(time.perf_counter() - started, run.step - first_step) + "\n")
    out.write(format_losses(losses) + "\n")
    return run.model, losses


def wall_time(seconds, steps):
    """E.g. 'wall time 18 min 7 s for 30000 steps', from the command's start: data, saves and evaluation too."""
    minutes, rest = divmod(round(seconds), 60)
    return f"wall time {f'{minutes} min {rest} s' if minutes else f'{seconds:.1f} s'} for {steps} steps"


def run_steps(run, splits, work_dir, out, diagnostics, val_loss, compiled=None):
    """The optimisation loop from run.step to max_steps, saving every save_every steps, at the last, and to stop;
    compiled: the run's CompiledStep, else each step is taken op by op."""
    config = run.spec.train_config
    criterion = loss_for(run.spec.model_config.form)
    schedule = make_schedule(config.schedule, config.max_steps, config.lr, config.lr_decay_at, config.warmup,
                             config.min_lr)
    examples = splits.tensors["train"]
    progress = Progress(config.max_steps, config.log_every, out, start_step=run.step)
    with stop_requests() as stop:
        while run.step < config.max_steps:
            run.threads.watch(run.step)     # fewer threads while other processes take cores, more once they leave
            lr = schedule(run.step)
            diagnostics.begin(run.step)
            if compiled:                    # the same step in one compiled graph: the rows drawn here, as below
                loss, agreed = compiled(examples.draw(config.batch_size, run.generator), lr).item(), bool(stop)
            else:
                # batch: the global batch, the same on every rank; this rank's rows and its weight in the mean loss
                Xb, Yb = examples.sample(config.batch_size, run.generator)
                Xb, Yb, share = run.world.shard(Xb, Yb)
                # forward
                loss = criterion.forward(run.model.forward(Xb), Yb)
                # backward, every gradient by hand; then summed over the ranks with the loss and any stop request
                run.model.backward(criterion.backward(share))
                loss, agreed = run.world.all_reduce(run.model.grads, loss * share, bool(stop))
            if not math.isfinite(loss):     # a host sync: the batch's loss is checked and logged
                raise UserError(f"the loss became {loss} at step {run.step}: the learning rate ({lr:g}) is probably "
                                f"too high; the last good checkpoint (step {run.saved_step}) is kept in {work_dir}")
            if not compiled:
                if config.grad_clip:
                    clip_grad_norm(run.model.grads, config.grad_clip)
                diagnostics.after_backward()
                # update
                run.optimizer.step(run.model.grads, lr)
                diagnostics.after_update(run.step, loss)
            run.step += 1
            # save: every save_every steps, at the last step, and before stopping when asked to (on any rank)
            stopping = run.world.stopping(stop, agreed)     # read once: a signal may land between the two uses below
            if run.step % config.save_every == 0 or run.step == config.max_steps or stopping:
                progress.val = run.save_latest(work_dir, val_loss(), diagnostics)
            # log
            if progress.due(run.step):
                progress.update(run.step, loss, lr)
            if stopping:
                raise stopped(stop[0] if stop else signal.SIGTERM, run, work_dir)   # another rank was asked
        if stop:                            # it came during the last step's save: stop before the final phase
            raise stopped(stop[0], run, work_dir)


def compiled_step(run, examples, work_dir, out):
    """The run's compiled step (compiled.py), or None where compiling failed under --compile auto (the eager step)."""
    config = run.spec.train_config
    out.write("compiling the training step (once: 5 s to a minute) ... ")

    def stop(signum):                       # at once: a compile can take a minute, and nothing is lost
        kept = (f"the checkpoint at step {run.saved_step} is kept; {resume_hint(work_dir)}"
                if run.saved_step is not None else "nothing was saved yet")
        raise Interrupted(signum, f"{signal.Signals(signum).name} while compiling the training step: {kept}")

    try:
        with signal_handler(stop):
            step = new_compiled_step(run, examples)
    except Exception as e:                  # no C++ compiler, an older torch: the eager step does the same arithmetic
        interrupted = interruption(e)       # the stop, perhaps wrapped by Inductor in its own error
        if interrupted:
            out.write("stopped\n")
            raise Interrupted(interrupted.signum, str(interrupted).splitlines()[0]) from None
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if config.compile == "on":
            raise UserError(f"could not compile the training step ({reason}); train with --compile off") from None
        out.write(f"failed ({reason}): training op by op\n")
        return None
    out.write(f"done in {step.seconds:.0f} s\n")
    return step


def new_compiled_step(run, examples):
    """The run's step over examples compiled (compiled.CompiledStep) for the threads torch runs on now."""
    config = run.spec.train_config
    return CompiledStep(run.model, run.optimizer, loss_for(run.spec.model_config.form), examples, config.batch_size,
                        config.grad_clip)


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


def finish(run, splits, work_dir, diagnostics, out):
    """BatchNorm statistics over the whole training split, the final losses, the final save; returns the losses."""
    examples = splits.tensors["train"]
    with stop_at_once(work_dir, run.step):  # long phases on a big corpus: each says what it is doing
        if any(isinstance(layer, BatchNorm1d) for layer in run.model.layers):
            out.write(f"setting BatchNorm statistics from all {len(examples)} training examples\n")
            recalibrate_batchnorm(run.model, examples)
        out.write("evaluating on the full train / val / test splits\n")
        losses = evaluate(run.model, splits)
    with stop_requests() as stop:           # a signal now waits until the final save is complete
        run.save_latest(work_dir, losses["val"], diagnostics, finished=True, losses=losses)
    if stop:
        raise Interrupted(stop[0], f"{signal.Signals(stop[0]).name} during the final save: the run finished and is "
                                   f"saved ({format_losses(losses)})")
    return losses


def format_losses(losses):
    """'train loss 2.0713 | val loss 2.1096 | test loss 2.1127', always in that order."""
    return " | ".join(f"{name} loss {losses[name]:.4f}" for name in SPLIT_NAMES)
