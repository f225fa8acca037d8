"""The `handprop` command: one subcommand per job, flags in the spirit of makemore."""

import argparse
import math
import os
import signal
import sys
from dataclasses import fields, replace
from pathlib import Path

import torch

from .checkpoint import check_same_corpus, load_checkpoint
from .data import load_corpus, make_splits
from .errors import UserError
from .grade import run_script
from .models import PRESETS, config_from_dict, preset
from .ninja import check_report, grade
from .sample import generate
from .train import BEST, LATEST, Interrupted, TrainConfig, evaluate, format_losses, train


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit status 2 (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def bounded(kind, low, high):
    """An argparse type: a finite number of kind (int or float) with low <= value <= high."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}")
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}, got {text}")
        return value

    return parse


def add_best(p):
    p.add_argument("--best", action="store_true", help=f"use {BEST} (lowest val loss at a save) instead of the latest {LATEST}")


def chosen_checkpoint(args):
    return load_checkpoint(Path(args.work_dir) / (BEST if args.best else LATEST), resolve_device(args.device))


def add_device(p):
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the tensors live (default cpu)")


def build_parser():
    parser = Parser(prog="handprop", description="Character-level language models with every gradient written by hand.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    t = sub.add_parser("train", help="train a model on a file of items, one per line")
    t.add_argument("-i", "--input-file", default=None, help="UTF-8 text, one item per line (default: bundled names.txt)")
    t.add_argument("-o", "--work-dir", default="out", help="where checkpoints are saved (default out)")
    t.add_argument("--resume", action="store_true", help="continue the run saved in the work dir, exactly where it stopped")
    t.add_argument("--model", default=None, choices=list(PRESETS), help="named configuration (default mlp: lecture 4, exercise 4)")
    t.add_argument("--max-steps", type=bounded(int, 1, 10**9), default=None, help="optimisation steps (default 200000)")
    t.add_argument("-b", "--batch-size", type=bounded(int, 1, 10**6), default=None, help="examples per step (default 32)")
    t.add_argument("-l", "--lr", type=bounded(float, 1e-9, 100.0), default=None, help="learning rate, /10 at --lr-decay-at (default 0.1)")
    t.add_argument("--lr-decay-at", type=bounded(float, 0.0, 1.0), default=None, help="fraction of the steps after which lr drops 10x (default 0.5)")
    t.add_argument("--optimizer", default=None, choices=["sgd", "adamw"], help="update rule (default sgd)")
    t.add_argument("-w", "--weight-decay", type=bounded(float, 0.0, 1.0), default=None, help="AdamW weight decay (default 0)")
    t.add_argument("--seed", type=bounded(int, 0, 2**63 - 1), default=None, help=f"init and batch order (default {TrainConfig.seed})")
    t.add_argument("--block-size", type=bounded(int, 1, 256), default=None, help="characters of context (default: the model's)")
    t.add_argument("--n-embd", type=bounded(int, 1, 4096), default=None, help="embedding size (default: the model's)")
    t.add_argument("--n-hidden", type=bounded(int, 1, 16384), default=None, help="hidden units per layer (default: the model's)")
    t.add_argument("--n-layers", type=bounded(int, 1, 64), default=None, help="hidden layers of an mlp (default: the model's)")
    t.add_argument("--init", default=None, choices=["lecture", "naive"], help="lecture: Kaiming 5/3 + small output; naive: unit randn")
    t.add_argument("--no-batchnorm", action="store_true", help="leave out every BatchNorm1d")
    t.add_argument("--bn-variance", default=None, choices=["bessel", "biased"], help="BatchNorm normalises with n-1 (lecture) or n (PyTorch)")
    t.add_argument("--save-every", type=bounded(int, 1, 10**9), default=None, help="steps between checkpoints (default 10000)")
    t.add_argument("--log-every", type=bounded(int, 1, 10**9), default=None, help="steps between log lines when not on a terminal (default 10000)")
    t.add_argument("--diagnostics", action="store_true", help="record statistics, then write figures and report.html to the work dir")
    t.add_argument("--diagnostics-every", type=bounded(int, 1, 10**9), default=None, help="steps between recorded statistics (default max-steps/100)")
    t.add_argument("--tensorboard", action="store_true", help="log losses and statistics for TensorBoard in the work dir (pip install 'handprop[tensorboard]')")
    add_device(t)
    t.set_defaults(run=run_train)

    s = sub.add_parser("sample", help="generate new items from a trained model")
    s.add_argument("-o", "--work-dir", default="out", help="the trained model's directory (default out)")
    s.add_argument("-n", "--num-samples", type=bounded(int, 1, 10**6), default=20, help="how many (default 20)")
    s.add_argument("--seed", type=bounded(int, 0, 2**63 - 1), default=None, help="fixes the samples (default: random)")
    s.add_argument("--prefix", default="", help="every sample starts with this text")
    s.add_argument("--max-length", type=bounded(int, 1, 10**4), default=None, help="characters at most (default: twice the longest training item)")
    add_best(s)
    add_device(s)
    s.set_defaults(run=run_sample)

    e = sub.add_parser("eval", help="loss of a trained model on the full train/val/test splits")
    e.add_argument("-o", "--work-dir", default="out", help="the trained model's directory (default out)")
    e.add_argument("-i", "--input-file", default=None, help="the corpus (default: the one it was trained on)")
    add_best(e)
    add_device(e)
    e.set_defaults(run=run_eval)

    c = sub.add_parser("check", help="prove every hand-written gradient against autograd (the lecture's exercises, every layer)")
    c.set_defaults(run=run_check)

    g = sub.add_parser("grade", help="run a learner's backprop-ninja script and grade the gradients it defines")
    g.add_argument("solution", help="a Python script that leaves the lecture's names behind (C, W1, ..., Xb, Yb, dlogprobs, ..., dC)")
    g.set_defaults(run=run_grade)

    d = sub.add_parser("diagnose", help="figures and report.html of a run trained with --diagnostics")
    d.add_argument("-o", "--work-dir", default="out", help="the run's directory, where they are written (default out)")
    add_device(d)
    d.set_defaults(run=run_diagnose)
    return parser


def resolve_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA device here")
    return name


RESULT_SETTINGS = ("max_steps", "batch_size", "lr", "lr_decay_at", "optimizer", "weight_decay", "seed")  # decide the outcome
PACE_SETTINGS = ("log_every", "save_every")    # free to change when resuming


def model_config_from(args, saved=None):
    """The preset with the flags' changes; when resuming, the saved config (flags may only repeat it)."""
    overrides = {
        "block_size": args.block_size, "n_embd": args.n_embd, "n_hidden": args.n_hidden, "n_layers": args.n_layers,
        "init": args.init, "batchnorm": False if args.no_batchnorm else None,
        "bessel": None if args.bn_variance is None else args.bn_variance == "bessel",
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if saved is None:
        return preset(args.model or "mlp", **overrides)
    requested = preset(args.model, **overrides) if args.model else replace(saved, **overrides)
    differing = [f.name for f in fields(saved) if f.name != "vocab_size" and getattr(requested, f.name) != getattr(saved, f.name)]
    if differing:
        raise UserError(f"--resume continues the saved model, but these settings differ from it: {', '.join(differing)}")
    return saved


def train_config_from(args, device, saved=None):
    """TrainConfig from the flags; when resuming, the saved one (only pace and device may change)."""
    given = {k: getattr(args, k) for k in RESULT_SETTINGS if getattr(args, k) is not None}
    pace = {k: getattr(args, k) for k in PACE_SETTINGS if getattr(args, k) is not None} | {"device": device}
    if saved is None:
        return TrainConfig(**given, **pace)
    differing = [k for k, v in given.items() if getattr(saved, k) != v]
    if differing:
        raise UserError(f"--resume continues the saved run, but these settings differ from it: {', '.join(differing)}")
    return replace(saved, **pace)


def diagnostics_settings(args, config):
    """TrainConfig fields from --diagnostics, --diagnostics-every, --tensorboard; none given keeps config's."""
    if not (args.diagnostics or args.tensorboard or args.diagnostics_every):
        return {}                           # a resumed run goes on recording as it did
    every = args.diagnostics_every or max(1, config.max_steps // 100)
    return {"diagnostics_every": every, "tensorboard": args.tensorboard}


def run_train(args):
    device = resolve_device(args.device)
    latest = Path(args.work_dir) / LATEST
    checkpoint = None
    if latest.exists():
        if not args.resume:
            raise UserError(f"{args.work_dir} already holds a run; continue it with --resume, or choose another -o")
        checkpoint = load_checkpoint(latest, device)
        if checkpoint.meta["finished"]:
            print(f"{args.work_dir} holds a finished run ({checkpoint.meta['step']} steps): {format_losses(checkpoint.meta['losses'])}")
            return
    elif args.resume:
        print(f"no checkpoint in {args.work_dir} yet: starting from step 0")
    saved = checkpoint.meta if checkpoint else None
    model_config = model_config_from(args, saved and config_from_dict(saved["model_config"]))
    config = train_config_from(args, device, saved and TrainConfig(**saved["train_config"]))
    config = replace(config, **diagnostics_settings(args, config))
    corpus = load_corpus(args.input_file or (saved["corpus"]["path"] if saved else None))
    train(corpus, model_config, config, args.work_dir, resume_from=checkpoint)
    if args.diagnostics:
        draw_report(args.work_dir, device)


def run_diagnose(args):
    draw_report(args.work_dir, resolve_device(args.device))


def draw_report(work_dir, device):
    """Write a run's figures and report.html, and say so."""
    from .report import write_report       # matplotlib costs every command ~0.7 s to import: only drawing pays
    paths = write_report(work_dir, device)
    sys.stdout.write("wrote " + ", ".join(str(p) for p in paths) + "\n")


def run_sample(args):
    checkpoint = chosen_checkpoint(args)
    generator = torch.Generator(device=args.device)
    generator.manual_seed(args.seed) if args.seed is not None else generator.seed()
    config = checkpoint.meta["model_config"]
    max_length = args.max_length or 2 * checkpoint.meta["longest_item"]
    names = generate(checkpoint.model, checkpoint.vocab, config["block_size"], args.num_samples, generator, max_length, args.prefix)
    sys.stdout.write("".join(name + "\n" for name in names))


def run_eval(args):
    checkpoint = chosen_checkpoint(args)
    corpus = load_corpus(args.input_file or checkpoint.meta["corpus"]["path"])
    check_same_corpus(checkpoint.meta, corpus)
    splits = make_splits(corpus, checkpoint.meta["model_config"]["block_size"], vocab=checkpoint.vocab, device=args.device)
    with torch.inference_mode():
        print(format_losses(evaluate(checkpoint.model, splits)))


def run_check(args):
    report, ok = check_report()
    print(report)
    return 0 if ok else 1


def run_grade(args):
    return 0 if grade(run_script(args.solution)).ok else 1


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except UserError as e:
        print(f"handprop: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"handprop: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:               # before training started: nothing to save
        print("handprop: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:                 # `handprop sample | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush cannot fail again
        return 128 + signal.SIGPIPE
