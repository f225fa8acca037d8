"""The `handprop` command: one subcommand per job, flags in the spirit of makemore."""

import argparse
import math
import os
import signal
import sys
from dataclasses import fields
from pathlib import Path

import torch

from . import __version__
from .checkpoint import BEST, LATEST, check_same_corpus, load_checkpoint
from .config import DEVICES, ModelConfig, TrainConfig, flagged, format_number
from .data import load_corpus
from .distributed import RankLost, launched
from .errors import UserError
from .evaluation import EVAL_CHUNK, evaluate, format_losses, make_run_splits
from .gradcheck import check_layers
from .ninja.exercises import EXERCISES
from .ninja.grade import did_you_mean, grade_script
from .ninja.solutions import check_report
from .ninja.starter import write_solution, write_starter
from .sample import CHUNK, Sampling, stream_samples
from .settings import DEFAULT_MODEL, PRESETS, Overrides, check_ranks, new_settings, recipe, resumed_settings
from .stops import Interrupted
from .threads import pass_work, use_threads
from .workdir import check_work_dir, saved_run


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line `handprop: error: ...` on stderr and exit status 2 (no usage dump)."""

    def error(self, message):
        self.exit(2, f"handprop: error: {message}\n")


def exercise_name(text):
    """An argparse type: the name of an exercise, or one line naming the close one (`handprop exercise list`)."""
    if text not in EXERCISES:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(EXERCISES)})"
                                         f"{did_you_mean(text)}")
    return text


def bounded(kind, low, high):
    """An argparse type: a finite number of kind (int or float) with low <= value <= high."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"must be between {format_number(low)} and {format_number(high)}, "
                                             f"got {text}")
        return value

    return parse


def parsed(parse):
    """An argparse type from a setting's parse function (config.setting), its ValueError as argparse's error."""

    def parse_flag(text):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse_flag


def add_setting(parser, cls, name, *flags, default=None):
    """A flag for the config field cls.name: its help, type, range and default text all come from the field."""
    f = next(f for f in fields(cls) if f.name == name)
    rules = f.metadata
    shown = default if default is not None else f"default {format_number(f.default)}"
    if rules["choices"] is not None:
        parser.add_argument(*flags, dest=name, default=None, choices=rules["choices"],
                            help=f"{rules['help']} ({shown})")
        return
    if rules["parse"] is not None:
        parser.add_argument(*flags, dest=name, default=None, type=parsed(rules["parse"]), metavar=rules["metavar"],
                            help=f"{rules['help']} ({shown}; {rules['span']})")
        return
    kind = type(f.default)
    span = f"{format_number(rules['low'])} to {format_number(rules['high'])}"
    parser.add_argument(*flags, dest=name, default=None, type=bounded(kind, rules["low"], rules["high"]),
                        metavar="N" if kind is int else "X", help=f"{rules['help']} ({shown}; {span})")


def add_best(p):
    p.add_argument("--best", action="store_true",
                   help=f"use {BEST} (lowest val loss at a save) instead of the latest {LATEST}")


def chosen_checkpoint(args):
    return load_checkpoint(Path(args.work_dir) / (BEST if args.best else LATEST), resolve_device(args.device))


def add_device(p):
    p.add_argument("--device", default="cpu", choices=DEVICES, help="where the tensors live (default cpu)")


def build_parser():
    parser = Parser(prog="handprop", description="Character-level language models with every gradient written by hand.",
                    epilog="`handprop COMMAND --help` lists a command's flags")
    parser.add_argument("--version", action="version", version=f"handprop {__version__}")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND", parser_class=Parser)

    t = sub.add_parser("train", help="train a model on a file of items, one per line")
    t.add_argument("-i", "--input-file", default=None,
                   help="UTF-8 text, one item per line; - reads standard input (default: bundled names.txt)")
    t.add_argument("-o", "--work-dir", default="out", help="where checkpoints are saved (default out)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run saved in the work dir exactly where it stopped (there must be one; a larger "
                        "--max-steps extends a finished one)")
    t.add_argument("--model", default=None, choices=list(PRESETS), help="named configuration (default mlp: lecture 4, "
                   "exercise 4)")
    for name, flags in flagged(TrainConfig).items():
        value = format_number(getattr(recipe(DEFAULT_MODEL), name))
        by_recipe = len({getattr(recipe(model), name) for model in PRESETS}) > 1     # else the field's own default
        add_setting(t, TrainConfig, name, *flags,
                    default=f"default: the model's recipe; {DEFAULT_MODEL}'s is {value}" if by_recipe else None)
    for name, flags in flagged(ModelConfig).items():
        add_setting(t, ModelConfig, name, *flags, default="default: the model's")
    t.add_argument("--no-batchnorm", action="store_true", help="leave out every BatchNorm1d")
    t.add_argument("--lookup-tables", action="store_true", help="mlp: compute the embedding and the first Linear as "
                   "per-position lookup tables (the same function; far faster for batches much larger than the "
                   "vocabulary)")
    t.add_argument("--bn-variance", default=None, choices=["bessel", "biased"],
                   help="BatchNorm normalises with n-1 (lecture) or n (PyTorch)")
    t.add_argument("--diagnostics", action="store_true",
                   help="record statistics, then write figures and report.html to the work dir")
    add_setting(t, TrainConfig, "diagnostics_every", "--diagnostics-every", default="default max-steps/100 with "
                "--diagnostics, else 0: none")
    t.add_argument("--tensorboard", action="store_true",
                   help="log losses and statistics for TensorBoard in the work dir "
                        "(pip install 'handprop[tensorboard]')")
    add_device(t)
    t.set_defaults(run=run_train)

    s = sub.add_parser("sample", help="generate new items from a trained model")
    s.add_argument("-o", "--work-dir", default="out", help="the trained model's directory (default out)")
    s.add_argument("-n", "--num-samples", type=bounded(int, 1, 10**6), default=20, metavar="N",
                   help="how many (default 20; 1 to 1,000,000)")
    s.add_argument("--seed", type=bounded(int, 0, 2**63 - 1), default=None, metavar="N",
                   help=f"fixes the samples (default: random; 0 to {format_number(2**63 - 1)})")
    s.add_argument("--prefix", default="", help="every sample starts with this text")
    s.add_argument("--max-length", type=bounded(int, 1, 10**4), default=None, metavar="N",
                   help="characters at most in a sample, the prefix included (default: the prefix plus twice the "
                        "longest training item; 1 to 10,000)")
    s.add_argument("--temperature", type=bounded(float, 0.01, 100.0), default=1.0, metavar="X",
                   help="divides the logits: below 1 sharper and nearer the most likely character, above 1 more "
                        "random (default 1; 0.01 to 100)")
    s.add_argument("--top-k", type=bounded(int, 1, 10**6), default=None, metavar="N",
                   help="draw only among the k most likely characters, k at most the vocabulary's size; 1 is "
                        "greedy (default: all; 1 to 1,000,000)")
    add_best(s)
    add_device(s)
    s.set_defaults(run=run_sample)

    e = sub.add_parser("eval", help="loss of a trained model on the full train/val/test splits")
    e.add_argument("-o", "--work-dir", default="out", help="the trained model's directory (default out)")
    e.add_argument("-i", "--input-file", default=None,
                   help="the corpus; - reads standard input (default: the file it was trained on)")
    add_best(e)
    add_device(e)
    e.set_defaults(run=run_eval)

    c = sub.add_parser("check", help="prove every hand-written gradient against autograd (the lecture's exercises, "
                       "every layer)")
    c.set_defaults(run=run_check)

    g = sub.add_parser("grade", help="run a learner's backprop-ninja script or notebook and grade the gradients it "
                       "writes")
    g.add_argument("solution", help="a Python script or Jupyter notebook that leaves the exercise's names behind "
                   "(for mlp: C, W1, ..., Xb, Yb, dlogprobs, ..., dC)")
    g.add_argument("--exercise", type=exercise_name, metavar="NAME",
                   help="the exercise it is (default: the one its marker line names, else the one whose names it "
                        "defines; see handprop exercise list)")
    g.add_argument("--timeout", type=bounded(float, 1, 86400), default=120.0, metavar="S",
                   help="stop a file that runs longer than this many seconds (default 120)")
    g.set_defaults(run=run_grade)

    x = sub.add_parser("exercise", help="backprop-ninja exercises: list them, start one, or write its worked solution")
    actions = x.add_subparsers(dest="action", required=True, metavar="{list,start,solution}")
    actions.add_parser("list", help="one line per exercise: its name, then what it covers").set_defaults(
        run=run_exercise_list)
    for action, what, run in (("start", "a starter: a notebook (.ipynb) or a script (.py) with a blank for every "
                                        "gradient", run_exercise_start),
                              ("solution", "handprop's worked solution, a script (.py)", run_exercise_solution)):
        a = actions.add_parser(action, help=f"write {what}")
        a.add_argument("name", type=exercise_name, metavar="NAME", help="the exercise (handprop exercise list)")
        a.add_argument("-o", "--output", required=True, metavar="FILE", help="the file to write; never overwritten")
        a.set_defaults(run=run)

    d = sub.add_parser("diagnose", help="figures and report.html of a run trained with --diagnostics")
    d.add_argument("-o", "--work-dir", default="out", help="the run's directory, where they are written (default out)")
    add_device(d)
    d.set_defaults(run=run_diagnose)
    for command, p in sub.choices.items():  # the settings other commands take too: each field names its commands
        if command != "train":
            for name, flags in flagged(TrainConfig, command).items():
                add_setting(p, TrainConfig, name, *flags)
    return parser


def resolve_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA device here")
    return name


def overrides(args, device):
    """What the train command's flags ask for: the settings they set, and nothing else."""
    model = {name: getattr(args, name) for name in flagged(ModelConfig)}
    model["batchnorm"] = False if args.no_batchnorm else None
    model["lookup_tables"] = True if args.lookup_tables else None
    model["bessel"] = None if args.bn_variance is None else args.bn_variance == "bessel"
    train = {name: getattr(args, name) for name in flagged(TrainConfig)} | {"device": device}
    train |= {"diagnostics_every": args.diagnostics_every, "tensorboard": args.tensorboard or None}
    return Overrides(args.model, {k: v for k, v in model.items() if v is not None},
                     {k: v for k, v in train.items() if v is not None}, args.diagnostics)


def run_train(args):
    device = resolve_device(args.device)
    world = launched(device)                # alone, or a rank of a torchrun launch
    if world.is_main:                       # the others would race it for the directory's lock
        check_work_dir(args.work_dir)
    checkpoint = saved_run(args.work_dir, args.resume, device)
    if checkpoint is None:
        settings = new_settings(overrides(args, device))
        corpus = load_corpus(args.input_file)
    else:
        settings = resumed_settings(overrides(args, device), checkpoint, args.work_dir)
        corpus = trained_corpus(checkpoint.spec, args.input_file)
        if checkpoint.finished and settings.train_config.max_steps == checkpoint.step:
            print(f"{args.work_dir} holds a finished run ({checkpoint.step} steps): {format_losses(checkpoint.losses)}"
                  f"; to train it further, resume with a larger --max-steps")
            return
    check_ranks(settings.train_config, world.size, resumed=checkpoint is not None)
    world.check_batch(settings.train_config.batch_size)
    if world.is_main:
        for note in settings.notes:
            print(note)
    # imported here: eval and sample never need the training loop, nor the compiler it brings in
    from .train import train
    with world.joined():                    # every rank has read and checked its inputs before rank 0 writes
        train(corpus, settings.model_config, settings.train_config, args.work_dir, resume_from=checkpoint,
              world=world)
    if args.diagnostics and world.is_main:
        draw_report(args.work_dir, device)


def run_diagnose(args):
    draw_report(args.work_dir, resolve_device(args.device))


def draw_report(work_dir, device):
    """Write a run's figures and report.html, and say so."""
    # imported here: matplotlib costs every command ~0.7 s to import, so only drawing pays
    from .report import write_report
    paths = write_report(work_dir, device)
    sys.stdout.write("wrote " + ", ".join(str(p) for p in paths) + "\n")


def run_sample(args):
    checkpoint = chosen_checkpoint(args)
    use_threads(args.threads, pass_work(checkpoint.model, min(args.num_samples, CHUNK)))     # a position a sample
    generator = torch.Generator(device=args.device)
    generator.manual_seed(args.seed) if args.seed is not None else generator.seed()
    sampling = Sampling(args.temperature, args.top_k)
    for lines in stream_samples(checkpoint.model, checkpoint.spec, args.num_samples, generator, args.max_length,
                                args.prefix, sampling):
        sys.stdout.write(lines)             # each chunk as soon as it is drawn: memory stays flat for any -n
        sys.stdout.flush()


def trained_corpus(spec, input_file):
    """The run's corpus: input_file if given, else the file it was trained on if that can be read again."""
    info = spec.corpus
    if input_file is None:
        path = Path(info.path)
        if not info.rereadable or (path.exists() and not path.is_file()):   # reading a pipe again would hang
            raise UserError(f"this run's corpus was read from {info.path}, which cannot be read a second time; "
                            "give the corpus with -i FILE (or -i - to pipe it in again)")
        input_file = path
    corpus = load_corpus(input_file)
    check_same_corpus(spec, corpus)
    return corpus


def run_eval(args):
    checkpoint = chosen_checkpoint(args)
    spec = checkpoint.spec
    corpus = trained_corpus(spec, args.input_file)
    splits = make_run_splits(corpus, spec.model_config, spec.vocab, args.device)
    use_threads(args.threads, pass_work(checkpoint.model, EVAL_CHUNK))
    if not checkpoint.finished:             # not the run's final losses: say which step they are of
        print(f"{BEST if args.best else LATEST} in {args.work_dir} is at step {checkpoint.step} of "
              f"{spec.train_config.max_steps}: the run had not finished when it was saved (it is still training, "
              "or it stopped; handprop train --resume continues it)")
    with torch.inference_mode():
        print(format_losses(evaluate(checkpoint.model, splits)))


def run_check(args):
    use_threads(args.threads, 0)            # float64 proofs on small tensors
    report, ok = check_report(check_layers())
    print(report)
    return 0 if ok else 1


def run_grade(args):
    use_threads(args.threads, 0)            # the exercises' small tensors
    return 0 if grade_script(args.solution, exercise=args.exercise, timeout=args.timeout).ok else 1


def run_exercise_list(args):
    width = max(len(name) for name in EXERCISES)
    for name, exercise in EXERCISES.items():
        print(f"{name:{width}s}  {exercise.summary}")


def run_exercise_start(args):
    write_starter(EXERCISES[args.name], args.output)
    print(f"wrote {args.output}: fill in every TODO, then handprop grade {args.output}")


def run_exercise_solution(args):
    write_solution(EXERCISES[args.name], args.output)
    print(f"wrote {args.output}: handprop grade {args.output} grades it")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:                # bare `handprop`: what it can do, a line each
        parser.print_help()
        return 0
    try:
        status = args.run(args) or 0
        sys.stdout.flush()                  # a closed pipe fails here, inside this try, rather than at exit
        return status
    except UserError as e:
        print(f"handprop: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"handprop: {e}", file=sys.stderr)
        return 128 + e.signum
    except RankLost as e:                   # not the user's doing: exit 1, not 2
        print(f"handprop: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:               # before training started: nothing to save
        print("handprop: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:                 # `handprop sample | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush cannot fail again
        return 128 + signal.SIGPIPE
