"""The training loop (autograd off throughout), evaluation, BatchNorm recalibration, saving."""

import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .checkpoint import check_same_corpus, save_checkpoint, write_readable_config
from .data import make_splits, sample_batch
from .diagnostics import start_diagnostics
from .errors import UserError
from .layers import BatchNorm1d, eval_mode
from .losses import CrossEntropy
from .models import build_model, count_parameters, describe
from .optim import lecture_lr, make_optimizer

EVAL_CHUNK = 4096           # examples per forward pass when evaluating: small enough to stay in cache
LATEST, BEST = "model.safetensors", "best.safetensors"  # checkpoint file names in the work directory


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 200_000        # optimisation steps (the lecture's exercise 4)
    batch_size: int = 32            # examples per step, drawn with replacement
    lr: float = 0.1                 # learning rate before the decay
    lr_decay_at: float = 0.5        # fraction of max_steps after which lr is divided by 10
    optimizer: str = "sgd"          # 'sgd' (the lecture) or 'adamw'
    weight_decay: float = 0.0       # AdamW's decoupled weight decay
    seed: int = 2147483647          # init and batch order (the lecture's generator seed)
    device: str = "cpu"             # 'cpu' or 'cuda'
    log_every: int = 10_000         # steps between log lines when output is not a terminal
    save_every: int = 10_000        # steps between checkpoints (latest, and best by val loss)
    diagnostics_every: int = 0      # steps between recorded statistics (diagnostics.py); 0 records none
    tensorboard: bool = False       # with diagnostics_every: also log them as TensorBoard events in work_dir


def split_loss(model, X, Y):
    """Mean cross-entropy over a whole split, in chunks, in evaluation mode."""
    criterion, total = CrossEntropy(), 0.0
    with eval_mode(model):
        for i in range(0, X.shape[0], EVAL_CHUNK):
            Xc, Yc = X[i : i + EVAL_CHUNK], Y[i : i + EVAL_CHUNK]
            total += criterion.forward(model.forward(Xc), Yc).item() * Xc.shape[0]
    return total / X.shape[0]


def evaluate(model, splits):
    """{'train': loss, 'val': loss, 'test': loss} on the full splits."""
    return {name: split_loss(model, X, Y) for name, (X, Y) in splits.tensors.items()}


def recalibrate_batchnorm(model, X):
    """Set every BatchNorm's running mean and (n-1) variance to exact statistics over X.

    As at the end of the lecture's exercise 4: the momentum estimates lag the weights, so
    after training each BatchNorm is re-estimated in order, the earlier ones already fixed.
    """
    with eval_mode(model):
        for k, layer in enumerate(model.layers):
            if not isinstance(layer, BatchNorm1d):
                continue
            n, total, total_sq = 0, 0.0, 0.0
            for i in range(0, X.shape[0], EVAL_CHUNK):
                h = X[i : i + EVAL_CHUNK]
                for earlier in model.layers[:k]:
                    h = earlier.forward(h)
                h = h.reshape(-1, h.shape[-1]).double()            # (N, C), float64 sums
                n, total, total_sq = n + h.shape[0], total + h.sum(0), total_sq + (h * h).sum(0)
            mean = total / n
            layer.running_mean.copy_(mean)
            layer.running_var.copy_((total_sq - n * mean * mean) / (n - 1))


class Log:
    """A text stream that goes quiet when its reader goes away (`handprop train | head`): the run matters more."""

    def __init__(self, stream):
        self.stream, self.open = stream, True

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
        line = f"step {step:>{len(str(self.max_steps))}}/{self.max_steps} | loss {loss:.4f} | lr {lr:g} | {speed:,.0f} steps/s | eta {eta:,.0f}s"
        if self.val is not None:
            line += f" | val {self.val:.4f} at the last save"
        if self.tty:                            # speed averaged since the run (re)started
            self.stream.write("\r" + line + "\033[K" + ("\n" if step == self.max_steps else ""))
        else:
            self.stream.write(line + "\n")
            self.last_time, self.last_step = now, step   # speed since the previous line
        self.last_draw = now


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
def stop_requests():
    """While active, SIGINT and SIGTERM only set a flag, so the loop stops between two steps."""
    requested = []

    def request_stop(signum, frame):
        requested.append(signum)

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def check_same_split(meta, splits):
    """A resumed run must see exactly the split it started with."""
    if splits.signature() != meta["split_signature"]:
        raise UserError("the data split differs from the one this run started with")


@dataclass
class Run:
    """Everything a checkpoint holds to continue a run exactly where it stopped."""

    model: object
    optimizer: object
    generator: torch.Generator      # batch order; its state is saved so a resumed run draws the same batches
    meta: dict                      # configs, vocabulary, corpus and split signatures
    step: int = 0                   # optimisation steps done
    best_val: float = math.inf      # lowest val loss at a save, for best.safetensors

    def save(self, work_dir, name, finished=False, losses=None):
        tensors, numbers = self.optimizer.state_dict()
        extra = {f"optim.{k}": v for k, v in tensors.items()} | {"rng.batches": self.generator.get_state()}
        meta = self.meta | {"step": self.step, "best_val": self.best_val, "optimizer_state": numbers,
                            "finished": finished, "losses": losses}
        save_checkpoint(Path(work_dir) / name, self.model, meta, extra)
        return meta

    def save_latest(self, work_dir, val, finished=False, losses=None):
        """The latest checkpoint, and the best one too when val beats every earlier save; returns its metadata."""
        if val < self.best_val:
            self.best_val = val
            self.save(work_dir, BEST, finished, losses)
        return self.save(work_dir, LATEST, finished, losses)


def new_run(model_config, config, meta):
    generator = torch.Generator().manual_seed(config.seed)
    model = build_model(model_config, generator, device=config.device)
    return Run(model, make_optimizer(config.optimizer, model.parameters(), config.weight_decay), generator, meta)


def resumed_run(checkpoint, config):
    generator = torch.Generator()
    generator.set_state(checkpoint.extra["rng.batches"])
    optimizer = make_optimizer(config.optimizer, checkpoint.model.parameters(), config.weight_decay)
    tensors = {k.removeprefix("optim."): v.to(config.device) for k, v in checkpoint.extra.items() if k.startswith("optim.")}
    optimizer.load_state_dict(tensors, checkpoint.meta["optimizer_state"])
    meta = {k: checkpoint.meta[k] for k in ("model_config", "train_config", "vocab", "corpus", "split_signature", "longest_item")}
    return Run(checkpoint.model, optimizer, generator, meta, checkpoint.meta["step"], checkpoint.meta["best_val"])


def train(corpus, model_config, config, work_dir, resume_from=None, out=None):
    """Train by hand-written backprop (from scratch or a checkpoint); save and return (model, losses)."""
    out = Log(out or sys.stdout)
    if resume_from:
        check_same_corpus(resume_from.meta, corpus)
    vocab = resume_from.vocab if resume_from else None
    splits = make_splits(corpus, model_config.block_size, vocab=vocab, device=config.device)
    if resume_from:
        check_same_split(resume_from.meta, splits)
    check_writable(work_dir)                # every input is validated before the first file is written
    model_config = replace(model_config, vocab_size=splits.vocab.size)
    meta = {
        "model_config": asdict(model_config), "train_config": asdict(config), "vocab": list(splits.vocab.chars),
        "corpus": {"path": corpus.path, "sha256": corpus.sha256, "items": len(corpus.items)},
        "split_signature": splits.signature(), "longest_item": max(len(item) for item in corpus.items),
    }
    sizes = " / ".join(f"{X.shape[0]}" for X, _ in splits.tensors.values())
    with torch.inference_mode():            # no graph is ever recorded: every gradient is by hand
        run = resumed_run(resume_from, config) if resume_from else new_run(model_config, config, meta)
        val_loss = lambda: split_loss(run.model, *splits.tensors["val"])
        diagnostics = start_diagnostics(run.model, config, work_dir, run.step, val_loss)
        if not resume_from:                 # from step 0 on there is always a checkpoint to resume
            run.save_latest(work_dir, split_loss(run.model, *splits.tensors["val"]))
        out.write(f"{len(corpus.items)} items, vocabulary {splits.vocab.size}, examples train/val/test {sizes}\n")
        out.write(f"model {describe(model_config)}: {count_parameters(run.model)} parameters"
                  + (f", resuming at step {run.step}" if resume_from else "") + "\n")
        run_steps(run, splits, config, work_dir, out, diagnostics)
        recalibrate_batchnorm(run.model, splits.tensors["train"][0])
        losses = evaluate(run.model, splits)
        final_meta = run.save_latest(work_dir, losses["val"], finished=True, losses=losses)
        if diagnostics is not None:
            diagnostics.finish(work_dir)
    write_readable_config(Path(work_dir) / "config.json", final_meta)
    out.write(format_losses(losses) + "\n")
    return run.model, losses


def run_steps(run, splits, config, work_dir, out, diagnostics=None):
    """The optimisation loop from run.step to config.max_steps, saving every config.save_every steps."""
    criterion = CrossEntropy()
    progress = Progress(config.max_steps, config.log_every, out, start_step=run.step)
    Xtr, Ytr = splits.tensors["train"]
    last_saved = run.step                   # resumed from, or just saved at step 0
    with stop_requests() as stop:
        while run.step < config.max_steps:
            recording = diagnostics is not None and diagnostics.begin(run.step)
            lr = lecture_lr(run.step, config.max_steps, config.lr, config.lr_decay_at)
            Xb, Yb = sample_batch(Xtr, Ytr, config.batch_size, run.generator)
            loss = criterion.forward(run.model.forward(Xb), Yb).item()
            if not math.isfinite(loss):
                raise UserError(f"the loss became {loss} at step {run.step}: the learning rate ({lr:g}) is probably too high; "
                                f"the last good checkpoint (step {last_saved}) is kept in {work_dir}")
            run.model.backward(criterion.backward())
            if recording:
                diagnostics.before_update()
            run.optimizer.step(run.model.grads, lr)
            if diagnostics is not None:
                diagnostics.after_update(run.step, loss)
            run.step += 1
            stopping = bool(stop)               # read once: a signal may land between the two uses below
            if run.step % config.save_every == 0 or stopping:
                progress.val = split_loss(run.model, *splits.tensors["val"])
                run.save_latest(work_dir, progress.val)
                if diagnostics is not None:
                    diagnostics.save(work_dir)      # beside the checkpoint it belongs to
                last_saved = run.step
            if progress.due(run.step):
                progress.update(run.step, loss, lr)
            if stopping:
                name = signal.Signals(stop[0]).name
                raise Interrupted(stop[0], f"{name} at step {run.step}: checkpoint saved; continue with: handprop train --resume -o {work_dir}")


def format_losses(losses):
    return " | ".join(f"{name} loss {value:.4f}" for name, value in losses.items())
