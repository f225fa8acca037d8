"""The training loop (autograd off throughout), evaluation, BatchNorm recalibration, saving."""

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .checkpoint import save_checkpoint, write_readable_config
from .data import make_splits, sample_batch
from .diagnostics import FILENAME as DIAGNOSTICS_FILE, Diagnostics, open_summary_writer
from .errors import UserError
from .layers import BatchNorm1d
from .losses import CrossEntropy
from .models import build_model, count_parameters
from .optim import lecture_lr, make_optimizer

EVAL_CHUNK = 32768          # examples per forward pass when evaluating a whole split


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
    diagnostics_every: int = 0      # steps between recorded statistics (diagnostics.py); 0 records none
    tensorboard: bool = False       # with diagnostics_every: also log them as TensorBoard events in work_dir


@contextmanager
def eval_mode(model):
    """Evaluation mode for the block (BatchNorm uses and keeps its running statistics)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def split_loss(model, X, Y):
    """Mean cross-entropy over a whole split, in chunks, in evaluation mode."""
    criterion, total = CrossEntropy(), 0.0
    with eval_mode(model):
        for i in range(0, X.shape[0], EVAL_CHUNK):
            loss = criterion.forward(model.forward(X[i : i + EVAL_CHUNK]), Y[i : i + EVAL_CHUNK])
            total += loss.item() * X[i : i + EVAL_CHUNK].shape[0]
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


class Progress:
    """Step, loss, learning rate and speed: one updating line on a terminal, else a line every log_every steps."""

    def __init__(self, max_steps, log_every, stream=None, start_step=0):
        self.max_steps, self.log_every = max_steps, log_every
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.last_time, self.last_step, self.last_draw = time.perf_counter(), start_step, 0.0

    def due(self, step):
        """Whether update() would print at this step (so the caller reads the loss only then)."""
        if step == self.max_steps:
            return True
        return time.perf_counter() - self.last_draw > 0.2 if self.tty else step % self.log_every == 0

    def update(self, step, loss, lr):
        now = time.perf_counter()
        speed = (step - self.last_step) / max(now - self.last_time, 1e-9)
        eta = (self.max_steps - step) / max(speed, 1e-9)
        line = f"step {step:>{len(str(self.max_steps))}}/{self.max_steps} | loss {loss:.4f} | lr {lr:g} | {speed:,.0f} steps/s | eta {eta:,.0f}s"
        if self.tty:
            self.stream.write("\r" + line + "\033[K" + ("\n" if step == self.max_steps else ""))
        else:
            self.stream.write(line + "\n")
            self.last_time, self.last_step = now, step   # speed since the previous line
        self.stream.flush()
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


def train(corpus, model_config, config, work_dir, out=None):
    """Train model_config on corpus by hand-written backprop; save and return the final losses."""
    out = out or sys.stdout
    check_writable(work_dir)
    splits = make_splits(corpus, model_config.block_size, device=config.device)
    model_config = replace(model_config, vocab_size=splits.vocab.size)
    generator = torch.Generator().manual_seed(config.seed)
    sizes = " / ".join(f"{X.shape[0]}" for X, _ in splits.tensors.values())
    with torch.inference_mode():            # no graph is ever recorded: every gradient is by hand
        model = build_model(model_config, generator, device=config.device)
        out.write(f"{len(corpus.items)} items, vocabulary {splits.vocab.size}, examples train/val/test {sizes}\n")
        out.write(f"model {model_config.kind}: {count_parameters(model)} parameters\n")
        optimizer = make_optimizer(config.optimizer, model.parameters(), config.weight_decay)
        criterion = CrossEntropy()
        progress = Progress(config.max_steps, config.log_every, out)
        Xtr, Ytr = splits.tensors["train"]
        diagnostics = None
        if config.diagnostics_every:
            writer = open_summary_writer(work_dir) if config.tensorboard else None
            val_loss = lambda: split_loss(model, *splits.tensors["val"])
            diagnostics = Diagnostics(model, config.diagnostics_every, config.max_steps, val_loss, writer)
        for step in range(config.max_steps):
            recording = diagnostics is not None and diagnostics.begin(step)
            Xb, Yb = sample_batch(Xtr, Ytr, config.batch_size, generator)
            loss = criterion.forward(model.forward(Xb), Yb)
            model.backward(criterion.backward())
            lr = lecture_lr(step, config.max_steps, config.lr, config.lr_decay_at)
            if recording:
                diagnostics.before_update()
            optimizer.step(model.grads, lr)
            if diagnostics is not None:
                diagnostics.after_update(step, loss)
            if progress.due(step + 1):
                progress.update(step + 1, loss.item(), lr)
        recalibrate_batchnorm(model, Xtr)
        losses = evaluate(model, splits)
    meta = {
        "model_config": asdict(model_config),
        "train_config": asdict(config),
        "vocab": list(splits.vocab.chars),
        "step": config.max_steps,
        "losses": losses,
        "corpus": {"path": corpus.path, "sha256": corpus.sha256, "items": len(corpus.items)},
        "split_signature": splits.signature(),
        "longest_item": max(len(item) for item in corpus.items),
    }
    save_checkpoint(Path(work_dir) / "model.safetensors", model, meta)
    write_readable_config(Path(work_dir) / "config.json", meta)
    if diagnostics is not None:
        diagnostics.finish(Path(work_dir) / DIAGNOSTICS_FILE)
    out.write(format_losses(losses) + "\n")
    return model, losses


def format_losses(losses):
    return " | ".join(f"{name} loss {value:.4f}" for name, value in losses.items())
