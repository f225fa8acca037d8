"""ModelConfig and TrainConfig: every setting once, with its default, its range and its help.

The command line builds its flags from these fields (cli.py), and a checkpoint's configs are
read back through the same checks (config_from_dict), so a setting is validated the same way
whether it came from a flag or from a file. RESUME_MAY_CHANGE says which settings a resumed
run may change.
"""

import math
from dataclasses import dataclass, field, fields, replace

from .errors import UserError

MODEL_KINDS = ("mlp", "wavenet")
INITS = ("lecture", "naive")
OPTIMIZERS = ("sgd", "adamw")
DEVICES = ("cpu", "cuda")


def setting(default, help, low=None, high=None, choices=None):
    """A config field with its help text and the values it may take (a range, or choices)."""
    return field(default=default, metadata={"help": help, "low": low, "high": high, "choices": choices})


@dataclass(frozen=True)
class ModelConfig:
    kind: str = setting("mlp", "architecture: mlp (Bengio 2003, the lectures 3-4) or wavenet (lecture 5)",
                        choices=MODEL_KINDS)
    vocab_size: int = setting(27, "tokens, the boundary included (set from the corpus)", 2, 1_000_000)
    block_size: int = setting(3, "characters of context", 1, 256)
    n_embd: int = setting(10, "embedding size per character", 1, 4096)
    n_hidden: int = setting(200, "units per hidden layer", 1, 16384)
    n_layers: int = setting(1, "hidden layers (wavenet: log2 of the block size, set from it)", 1, 64)
    hidden_bias: bool = setting(True, "a bias in the hidden Linear layers (the lecture's exercise 4 keeps b1)")
    batchnorm: bool = setting(True, "a BatchNorm1d after each hidden Linear")
    bessel: bool = setting(True, "BatchNorm normalises with the n-1 variance (lecture) instead of n (PyTorch)")
    bn_momentum: float = setting(0.001, "BatchNorm running-statistics momentum", 0.0, 1.0)
    init: str = setting("lecture", "lecture: Kaiming with gain 5/3, a small output layer; naive: unit randn",
                        choices=INITS)


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = setting(200_000, "optimisation steps", 1, 10**9)
    batch_size: int = setting(32, "examples per step, drawn with replacement", 1, 10**6)
    lr: float = setting(0.1, "learning rate before the decay", 1e-9, 100.0)
    lr_decay_at: float = setting(0.5, "fraction of the steps after which the learning rate drops 10x", 0.0, 1.0)
    optimizer: str = setting("sgd", "update rule: sgd (the lecture) or adamw", choices=OPTIMIZERS)
    weight_decay: float = setting(0.0, "AdamW's decoupled weight decay (adamw only)", 0.0, 1.0)
    seed: int = setting(2147483647, "seeds the init and the batch order (the lecture's generator seed)", 0, 2**63 - 1)
    device: str = setting("cpu", "where the tensors live", choices=DEVICES)
    log_every: int = setting(10_000, "steps between log lines when the output is not a terminal", 1, 10**9)
    save_every: int = setting(10_000, "steps between checkpoints (latest, and best by val loss)", 1, 10**9)
    diagnostics_every: int = setting(0, "steps between recorded statistics; 0 records none", 0, 10**9)
    tensorboard: bool = setting(False, "also log the recorded statistics as TensorBoard events")


# settings a resumed run may change: how often it reports and saves, where it runs, and how far it goes
RESUME_MAY_CHANGE = ("max_steps", "device", "log_every", "save_every", "diagnostics_every", "tensorboard")


def check_field(config, f):
    """One field's value against its type and its range or choices; UserError names the setting."""
    value, meta, kind = getattr(config, f.name), f.metadata, type(f.default)
    name = f.name.replace("_", "-")
    number = kind in (int, float) and not isinstance(value, bool) and isinstance(value, (int, float))
    if not (isinstance(value, kind) or (kind is float and number)):
        raise UserError(f"{name} must be a {kind.__name__}, got {value!r}")
    if meta["choices"] is not None and value not in meta["choices"]:
        raise UserError(f"{name} must be one of {', '.join(meta['choices'])}, got {value!r}")
    if meta["low"] is not None and not (math.isfinite(value) and meta["low"] <= value <= meta["high"]):
        raise UserError(f"{name} must be between {format_number(meta['low'])} and {format_number(meta['high'])}, "
                        f"got {value}")


def format_number(x):
    """A value as people write it: 1,000,000,000 and 0.001, never 1e+09; anything else as str()."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    return f"{x:,}" if isinstance(x, int) else f"{x:g}"


def wavenet_depth(block_size):
    """How many times FlattenConsecutive(2) halves block_size down to one position."""
    return block_size.bit_length() - 1


def validate_model(config):
    """Every field in range, and the combinations a model can be built from; returns config."""
    for f in fields(config):
        check_field(config, f)
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
                        "(add --optimizer adamw, or drop -w)")
    if config.batch_size < 2 and model_config.batchnorm:
        raise UserError("BatchNorm needs at least 2 examples per batch to estimate a variance; use -b 2 or more, "
                        "or --no-batchnorm")
    return config


def preset_config(base, **overrides):
    """base with some fields replaced (None keeps base's value); a wavenet's depth follows its block size."""
    config = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if config.kind == "wavenet" and overrides.get("n_layers") is None:
        config = replace(config, n_layers=wavenet_depth(config.block_size))
    return config


def config_from_dict(cls, saved, what):
    """A config of class cls from saved JSON, through the same checks as the flags; a bad one is a UserError."""
    names = {f.name for f in fields(cls)}
    if not isinstance(saved, dict) or set(saved) != names:
        raise UserError(f"{what}'s {cls.__name__} does not match this version of handprop")
    try:
        return cls(**saved)
    except TypeError as e:
        raise UserError(f"{what}'s {cls.__name__} is unreadable: {e}") from None


def changed_settings(saved, requested, allowed=()):
    """Names of the fields where requested differs from saved, leaving out the allowed ones."""
    return [f.name for f in fields(saved)
            if f.name not in allowed and getattr(saved, f.name) != getattr(requested, f.name)]

