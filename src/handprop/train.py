"""The run: prepare (the data, a new or resumed run), the loop (autograd off throughout), finish (BatchNorm's
statistics, the final losses, the last save). Evaluation, the work directory, the log and stops have modules of
their own."""

import json
import math
import signal
import sys
import time
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
    metadata,
    save_checkpoint,
    tensors_digest,
    write_readable_config,
)
from .compiled import CompiledStep, compile_obstacle, compile_wanted, long_enough
from .diagnostics import NoDiagnostics, start_diagnostics
from .distributed import ALONE, RankLost, World
from .errors import UserError
from .evaluation import evaluate, format_losses, make_run_splits, recalibrate_batchnorm, split_loss
from .layers import BatchNorm1d
from .memory import check_fits
from .models import build_model, count_parameters, describe
from .optim import make_optimizer
from .progress import Log, Progress, wall_time
from .race import faster
from .settings import fit_to_corpus
from .step import EagerStep, schedule_for
from .stops import Interrupted, interruption, resume_hint, signal_handler, stop_at_once, stop_requests, stopped
from .threads import KEPT, OnePerCount, choose_threads, line_to, step_work
from .workdir import owned, saving

# the dtype each TrainConfig.dtype multiplies the training step's matrix products in (Layer.multiply_in)
PRODUCTS_IN = {"float32": None, "bf16": torch.bfloat16}


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
        return Checkpoint(self.spec, self.model, self.step, self.best_val, finished, losses, numbers, tensors,
                          self.generator.get_state(), self.world.size)

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
    generator.set_state(checkpoint.batch_generator)
    optimizer = make_optimizer(config.optimizer, checkpoint.model.parameters(), config.weight_decay)
    tensors = {k: v.to(config.device) for k, v in checkpoint.optimizer_tensors.items()}
    optimizer.load_state_dict(tensors, checkpoint.optimizer_state)
    spec = replace(checkpoint.spec, train_config=config)
    checkpoint.model.use_generator(generator)   # the masks go on from the saved state, as the batches do
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
    model_config = fit_to_corpus(model_config, corpus, splits.vocab)
    check_fits(model_config, config)        # before the model is allocated: one line, not the allocator's traceback
    spec = RunSpec(model_config, config, splits.vocab, corpus.info(), splits.signature(),
                   max(len(item) for item in corpus.items))
    return splits, new_run(spec)


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
        run.model.multiply_in(PRODUCTS_IN[config.dtype])    # in training mode only: evaluation stays float32
        world.check_same(run.digest)
        with owned(work_dir, resume_from, world):   # held to the end: a second train on work_dir is refused
            sizes = " / ".join(f"{examples.scored()}" for examples in splits.tensors.values())
            out.write(f"{corpus.describe()}, vocabulary {splits.vocab.size}, characters to predict "
                      f"train/val/test {sizes}\n")
            warning = splits.form.padding_warning(corpus.items)
            if warning:
                out.write(f"warning: {warning}\n")
            out.write(f"model {describe(run.spec.model_config)}: {count_parameters(run.model)} parameters"
                      + (f", resuming at step {run.step}" if resume_from else "") + "\n")
            if world.size > 1:
                out.write(world.describe(config.batch_size) + "\n")
            out.write(run.threads.describe() + "\n")
            if config.dtype == "bf16":
                out.write("mixed precision: the step's matrix products in bf16; weights, optimiser, the rest of the "
                          "step, evaluation and sampling in float32\n")

            def val_loss():
                return split_loss(run.model, splits.tensors["val"])

            diagnostics = start_diagnostics(run.model, config, work_dir, run.step, val_loss) if world.is_main \
                else NoDiagnostics()
            step = None                     # before the first save: a failed --compile on leaves no run behind
            if wanted:
                step = compiled_step(run, splits.tensors["train"], work_dir, out)
                if step:                    # and a step for each other thread count the run switches to
                    step = OnePerCount(step, lambda: step_for_count(run, splits.tensors["train"], line_to(out)),
                                       run.threads)
            elif config.compile == "auto" and long_enough(config):
                out.write(f"training op by op, not compiled: {obstacle}\n")    # long enough, but it cannot be
            if run.saved_step is None:      # from step 0 on there is always a checkpoint to resume
                run.save_latest(work_dir, val_loss(), diagnostics)
            # the loop, which saves its last step: the trained weights are on disk before the final phase
            try:
                run_steps(run, splits, work_dir, out, diagnostics, val_loss, step)
            except RankLost as e:
                raise RankLost(f"{e} at step {run.step}; the last checkpoint (step {run.saved_step}) is kept in "
                               f"{work_dir}; {resume_hint(work_dir)}") from None
            # finish: exact BatchNorm statistics, the losses on every split, the last save
            losses = finish(run, splits, work_dir, diagnostics, out)
    out.write(wall_time(time.perf_counter() - started, run.step - first_step) + "\n")
    out.write(format_losses(losses) + "\n")
    return run.model, losses


def run_steps(run, splits, work_dir, out, diagnostics, val_loss, step=None):
    """The optimisation loop from run.step to max_steps, saving every save_every steps, at the last, and to stop;
    step: the run's step (step.py's call), compiled or eager; None: the eager step on run.world's ranks."""
    config = run.spec.train_config
    schedule = schedule_for(config)
    examples = splits.tensors["train"]
    step = step or EagerStep(run.model, run.optimizer, examples.form.criterion(), examples, config.grad_clip,
                             run.world, diagnostics)
    progress = Progress(config.max_steps, config.log_every, out, start_step=run.step)
    with stop_requests() as stop:
        while run.step < config.max_steps:
            run.threads.watch(run.step)     # fewer threads while other processes take cores, more once they leave
            lr = schedule(run.step)
            diagnostics.begin(run.step)
            # the global batch's rows, the same on every rank; the step, summed over the ranks with any stop request
            loss, agreed = step(examples.draw(config.batch_size, run.generator), lr, bool(stop))
            if not math.isfinite(loss):     # the batch's loss, read on the host, is checked and logged
                raise UserError(f"the loss became {loss} at step {run.step}: the learning rate ({lr:g}) is probably "
                                f"too high; the last good checkpoint (step {run.saved_step}) is kept in {work_dir}")
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
    """The run's compiled step (compiled.py) for the threads torch runs on now, under --compile auto the eager one
    where a short race finds that faster (chosen_step); None where compiling failed under auto (the eager step then)."""
    config = run.spec.train_config
    out.write("compiling the training step (once: 5 s to a minute) ... ")
    step = None                             # the compiled step, once compiled

    def stop(signum):                       # at once: a compile can take a minute, and nothing is lost
        kept = (f"the checkpoint at step {run.saved_step} is kept; {resume_hint(work_dir)}"
                if run.saved_step is not None else "nothing was saved yet")
        doing = "racing the compiled step against op by op" if step else "compiling the training step"
        raise Interrupted(signum, f"{signal.Signals(signum).name} while {doing}: {kept}")

    try:
        with signal_handler(stop):
            step = new_compiled_step(run, examples)
            out.write(f"done in {step.seconds:.0f} s\n")
            return chosen_step(run, examples, step, line_to(out))
    except Exception as e:                  # no C++ compiler, an older torch: the eager step does the same arithmetic
        interrupted = interruption(e)       # the stop, perhaps wrapped by Inductor in its own error
        if interrupted:
            if step is None:                # the log's line "compiling ..." ends
                out.write("stopped\n")
            raise Interrupted(interrupted.signum, str(interrupted).splitlines()[0]) from None
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if config.compile == "on":
            raise UserError(f"could not compile the training step ({reason}); train with --compile off") from None
        out.write(f"{'the compiled step ' if step else ''}failed ({reason}): training op by op\n")
        return None


def step_for_count(run, examples, say):
    """The step for a thread count the run first switches to (threads.OnePerCount): the step compiled for it, or under
    --compile auto the eager one where a short race at this count finds that faster (chosen_step); say(line) reports
    the compiling and the race."""
    step = new_compiled_step(run, examples)
    count = torch.get_num_threads()
    say(f"compiled the training step for {count} thread{'s' * (count > 1)} in {step.seconds:.0f} s")
    return chosen_step(run, examples, step, say)


def chosen_step(run, examples, compiled, say):
    """The step a compiled run takes on the threads torch runs on now: compiled under --compile on, never overridden;
    under auto, compiled or the eager step, whichever a short race of the two on the run's own tensors finds faster
    (race.py: the run is left as it was), say(line) getting both rates.

    The eager step made here hands the layers its batches' noise source (Layer.take_noise_from) for the rest of
    the run, which the compiled step then draws through too: each of its draws is already of the split's full width,
    the source's own shape, so it draws the very noise it draws without one."""
    config = run.spec.train_config
    if config.compile != "auto":
        return compiled
    eager = EagerStep(run.model, run.optimizer, examples.form.criterion(), examples, config.grad_clip)
    step, line = faster(compiled, eager, lambda: examples.draw(config.batch_size, run.generator),
                        schedule_for(config)(run.step), run.optimizer, run.generator, torch.get_num_threads())
    say(line)
    return step


def new_compiled_step(run, examples):
    """The run's step over examples compiled (compiled.CompiledStep) for the threads torch runs on now."""
    config = run.spec.train_config
    return CompiledStep(run.model, run.optimizer, examples.form.criterion(), examples, config.batch_size,
                        config.grad_clip)


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
