"""ModelConfig and TrainConfig: every setting once, with its default, its range and its help.

The command line builds its flags from these fields (cli.py), and a checkpoint's configs are
read back through the same checks (config_from_dict), so a setting is validated the same way
whether it came from a flag or from a file. settings.py works out a run's values from them.
"""

import math
from dataclasses import dataclass, field, fields, replace

from .errors import UserError
from .threads import AUTO, MOST_THREADS, parse_threads

WINDOW_KINDS = ("mlp", "wavenet")                           # read block_size characters, predict the next
SEQUENCE_KINDS = ("bigram", "rnn", "gru", "transformer")    # read a whole item, predict every next character
MODEL_KINDS = WINDOW_KINDS + SEQUENCE_KINDS
INITS = ("lecture", "naive")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine")      # the lectures' single step decay; nanoGPT's warmup then cosine
DEVICES = ("cpu", "cuda")
COMPILE_MODES = ("auto", "on", "off")
DTYPES = ("float32", "bf16")        # the training step's matrix products: float32, or bfloat16 (mixed precision)
AUTO_COMPILE_STEPS = 10_000     # --compile auto compiles runs this long or longer: compiling takes 5-60 s, once


def setting(default, help, low=None, high=None, choices=None, flags=(), commands=("train",), resumable=False,
            parse=None, metavar=None, span=None):
    """A config field: its help text, the values it may take (a range, choices, or a parse function that returns the
    value or raises ValueError, shown as metavar, with span saying what it takes), the flags that set it (none: set
    another way, or not by the user) and the commands that take them, and whether a resumed run may change it."""
    return field(default=default, metadata={"help": help, "low": low, "high": high, "choices": choices,
                                            "flags": flags, "commands": commands, "resumable": resumable,
                                            "parse": parse, "metavar": metavar, "span": span})


def flagged(cls, command="train"):
    """{field name: its flags} for the fields of cls that a flag of the command sets, in field order."""
    return {f.name: f.metadata["flags"] for f in fields(cls)
            if f.metadata["flags"] and command in f.metadata["commands"]}


@dataclass(frozen=True)
class ModelConfig:
    kind: str = setting("mlp", "architecture: mlp, wavenet (context windows); bigram, rnn, gru, transformer "
                        "(whole items)", choices=MODEL_KINDS)
    vocab_size: int = setting(27, "tokens, the boundary included (set from the corpus)", 2, 1_000_000)
    block_size: int = setting(3, "characters of context; whole-item models: positions, 0 = longest item + 1",
                              0, 1024, flags=("--block-size",))
    n_embd: int = setting(10, "embedding size per character", 1, 4096, flags=("--n-embd",))
    n_hidden: int = setting(200, "units per hidden layer (rnn, gru: the hidden state)", 1, 16384, flags=("--n-hidden",))
    n_layers: int = setting(1, "hidden layers or transformer blocks (wavenet: log2 of the block size)", 1, 64,
                            flags=("--n-layers",))
    n_head: int = setting(4, "attention heads per transformer block (n_embd must be a multiple)", 1, 256,
                          flags=("--n-head",))
    dropout: float = setting(0.0, "transformer dropout probability, in training only", 0.0, 0.9, flags=("--dropout",))
    lookup_tables: bool = setting(False, "mlp: the embedding and the first Linear as per-position lookup tables "
                                  "(the same function; far faster when the batch is much larger than the vocabulary)")
    hidden_bias: bool = setting(True, "a bias in the hidden Linear layers (the lecture's exercise 4 keeps b1)")
    batchnorm: bool = setting(True, "a BatchNorm1d after each hidden Linear")
    bessel: bool = setting(True, "BatchNorm normalises with the n-1 variance (lecture) instead of n (PyTorch)")
    bn_momentum: float = setting(0.001, "BatchNorm running-statistics momentum", 0.0, 1.0)
    init: str = setting("lecture", "lecture: Kaiming with gain 5/3, a small output layer; naive: unit randn",
                        choices=INITS, flags=("--init",))

    @property
    def form(self):
        """How the model reads the data: 'windows' of block_size characters, or whole-item 'sequences'."""
        return "sequences" if self.kind in SEQUENCE_KINDS else "windows"


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = setting(200_000, "optimisation steps", 1, 10**9, flags=("--max-steps",), resumable=True)
    batch_size: int = setting(32, "examples per step, drawn with replacement", 1, 10**6, flags=("-b", "--batch-size"))
    lr: float = setting(0.1, "learning rate before the decay", 1e-9, 100.0, flags=("-l", "--lr"))
    schedule: str = setting("step", "learning rate: step (the lectures: lr, then lr/10 from --lr-decay-at) or "
                            "cosine (linear warmup, then cosine decay to --min-lr)", choices=SCHEDULES,
                            flags=("--schedule",))
    lr_decay_at: float = setting(0.5, "step schedule: fraction of the steps after which lr drops 10x", 0.0, 1.0,
                                 flags=("--lr-decay-at",))
    warmup: int = setting(0, "cosine schedule: steps of linear warmup", 0, 10**9, flags=("--warmup",))
    min_lr: float = setting(0.0, "cosine schedule: the learning rate at the last step", 0.0, 100.0, flags=("--min-lr",))
    grad_clip: float = setting(0.0, "clip the gradients' global L2 norm to this; 0 does not clip", 0.0, 1e6,
                               flags=("--grad-clip",))
    optimizer: str = setting("sgd", "update rule: sgd (the lecture) or adamw", choices=OPTIMIZERS,
                             flags=("--optimizer",))
    weight_decay: float = setting(0.0, "AdamW's decoupled weight decay (adamw only)", 0.0, 1.0,
                                  flags=("-w", "--weight-decay"))
    seed: int = setting(2147483647, "seeds the init and the batch order (the lecture's generator seed)", 0, 2**63 - 1,
                        flags=("--seed",))
    device: str = setting("cpu", "where the tensors live", choices=DEVICES, resumable=True)
    compile: str = setting("auto", "the training step compiled into fused C++ by Inductor: on, always (never "
                           "overridden); off, op by op; auto: a run of "
                           f"{AUTO_COMPILE_STEPS:,} steps or more is compiled, raced against op by op for under a "
                           "second at each thread count, and trains with the faster", choices=COMPILE_MODES,
                           flags=("--compile",), resumable=True)
    dtype: str = setting("float32", "the training step's matrix products: float32, or bf16 (mixed precision: "
                         "bfloat16 operands, float32 weights, optimiser and the rest; transformer only); evaluation "
                         "and sampling stay float32", choices=DTYPES, flags=("--dtype",))
    log_every: int = setting(10_000, "steps between log lines when the output is not a terminal", 1, 10**9,
                             flags=("--log-every",), resumable=True)
    save_every: int = setting(10_000, "steps between checkpoints (latest, and best by val loss)", 1, 10**9,
                              flags=("--save-every",), resumable=True)
    threads: str = setting(AUTO, "threads for tensor operations: N, or auto: 1, or more for a step with the work for "
                           "them while other processes leave the cores free (docs/performance.md, Threads)",
                           flags=("--threads",), commands=("train", "sample", "eval", "check", "grade"),
                           resumable=True, parse=parse_threads, metavar="N|auto", span=f"1 to {MOST_THREADS:,}")
    diagnostics_every: int = setting(0, "steps between recorded statistics; 0 records none", 0, 10**9, resumable=True)
    tensorboard: bool = setting(False, "also log the recorded statistics as TensorBoard events", resumable=True)


def check_field(config, f):
    """One field's value against its type and its range or choices; UserError names the setting."""
    value, rules, kind = getattr(config, f.name), f.metadata, type(f.default)
    name = f.name.replace("_", "-")
    number = kind in (int, float) and not isinstance(value, bool) and isinstance(value, (int, float))
    if not (isinstance(value, kind) or (kind is float and number)):
        raise UserError(f"{name} must be a {kind.__name__}, got {value!r}")
    if rules["choices"] is not None and value not in rules["choices"]:
        raise UserError(f"{name} must be one of {', '.join(rules['choices'])}, got {value!r}")
    if rules["parse"] is not None:
        try:
            rules["parse"](value)
        except ValueError as e:
            raise UserError(f"{name}: {e}") from None
    if rules["low"] is not None and not (math.isfinite(value) and rules["low"] <= value <= rules["high"]):
        raise UserError(f"{name} must be between {format_number(rules['low'])} and {format_number(rules['high'])}, "
                        f"got {value}")


def format_number(x):
    """A value as people write it: 1,000,000,000 and 0.001, never 1e+09; anything else as str()."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, float) and x.is_integer():
        x = int(x)                          # 1e6 reads 1,000,000
    return f"{x:,}" if isinstance(x, int) else f"{x:g}"


def wavenet_depth(block_size):
    """How many times FlattenConsecutive(2) halves block_size down to one position."""
    return block_size.bit_length() - 1


def validate_model(config):
    """Every field in range, and the combinations a model can be built from; returns config."""
    for f in fields(config):
        check_field(config, f)
    if config.kind in WINDOW_KINDS and config.block_size < 1:
        raise UserError(f"{config.kind} needs a --block-size of at least 1, got {config.block_size} (0 means the "
                        "longest item + 1, for whole-item models only)")
    if config.lookup_tables and config.kind != "mlp":
        raise UserError(f"lookup tables replace an mlp's first layer; {config.kind} has none to replace (leave out "
                        "--lookup-tables)")
    if config.kind == "transformer" and config.n_embd % config.n_head:
        raise UserError(f"the transformer's n_embd ({config.n_embd}) must be a multiple of its heads ({config.n_head})")
    if config.kind == "wavenet":
        if config.block_size < 2 or config.block_size & (config.block_size - 1):
            raise UserError(f"wavenet needs a block size that is a power of two >= 2, got {config.block_size}")
        if config.n_layers != wavenet_depth(config.block_size):
            raise UserError(f"wavenet's depth is set by its block size: block {config.block_size} gives "
                            f"{wavenet_depth(config.block_size)} hidden layers, not {config.n_layers} (--n-layers "
                            "is for mlp; change --block-size instead)")
    return config


def validate_train(config, model_config):
    """Every field in range, and the settings that would silently do nothing or break; returns config."""
    for f in fields(config):
        check_field(config, f)
    if config.weight_decay and config.optimizer != "adamw":
        raise UserError(f"weight decay is applied by adamw only; with {config.optimizer} it would do nothing "
                        "(add --optimizer adamw, or -w 0)")
    if config.schedule == "cosine" and config.warmup >= config.max_steps:
        raise UserError(f"--warmup {config.warmup} leaves no steps to decay over (max-steps {config.max_steps}): "
                        "warm up for fewer steps than the run takes")
    if config.schedule == "cosine" and config.min_lr > config.lr:
        raise UserError(f"--min-lr {config.min_lr:g} is above the learning rate {config.lr:g}")
    if config.batch_size < 2 and model_config.batchnorm and model_config.kind in WINDOW_KINDS:
        raise UserError("BatchNorm needs at least 2 examples per batch to estimate a variance; use -b 2 or more, "
                        "or --no-batchnorm")
    return config


def preset_config(base, **overrides):
    """base with some fields replaced (None keeps base's value); a wavenet's depth follows its block size."""
    config = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if config.kind == "wavenet" and overrides.get("n_layers") is None:
        config = replace(config, n_layers=wavenet_depth(config.block_size))
    return config


# settings added after the first checkpoints were written: one that lacks them ran with their default
ADDED_SETTINGS = {"lookup_tables", "compile", "threads", "dtype"}


def config_from_dict(cls, saved, what):
    """A config of class cls from saved JSON, through the same checks as the flags; a bad one is a UserError."""
    names = {f.name for f in fields(cls)}
    if not isinstance(saved, dict) or not names - ADDED_SETTINGS <= set(saved) <= names:
        raise UserError(f"{what}'s {cls.__name__} does not match this version of handprop")
    try:
        return cls(**saved)
    except TypeError as e:
        raise UserError(f"{what}'s {cls.__name__} is unreadable: {e}") from None


def changed_settings(saved, requested, allowed=()):
    """Names of the fields where requested differs from saved, leaving out the allowed ones."""
    return [f.name for f in fields(saved)
            if f.name not in allowed and getattr(saved, f.name) != getattr(requested, f.name)]

