"""Named model configurations, each built as a Sequential of hand-differentiated layers."""

import math
from dataclasses import dataclass, fields, replace

import torch

from .errors import UserError
from .layers import BatchNorm1d, Embedding, FlattenConsecutive, Linear, Sequential, Tanh

TANH_GAIN = 5 / 3           # Kaiming gain for tanh (He et al. 2015; torch.nn.init.calculate_gain)


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "mlp"               # 'mlp': Embedding, Flatten, n_layers x (Linear, BatchNorm, Tanh), Linear
                                    # 'wavenet': pairs merged by FlattenConsecutive(2) until one position is left
    vocab_size: int = 27            # set from the corpus
    block_size: int = 3             # characters of context
    n_embd: int = 10                # embedding dimension per character
    n_hidden: int = 200             # units per hidden layer
    n_layers: int = 1               # hidden blocks for 'mlp' (wavenet: log2(block_size))
    hidden_bias: bool = True        # the lecture's exercise 4 keeps b1 in front of BatchNorm (12297 params)
    batchnorm: bool = True          # False drops every BatchNorm1d (the lecture's story before BatchNorm)
    bessel: bool = True             # BatchNorm variance: n-1 (lecture) or n (PyTorch) to normalise
    bn_momentum: float = 0.001      # running-statistics momentum (the lecture's exercise 4)
    init: str = "lecture"           # 'lecture': Kaiming 5/3 and a small output layer; 'naive': unit randn


PRESETS = {
    "mlp": ModelConfig(),                                                   # lecture part 4, exercise 4
    "mlp-part3": ModelConfig(hidden_bias=False),                            # lecture part 3: 12097 params
    "deep": ModelConfig(n_hidden=100, n_layers=5, hidden_bias=False),       # part 3's deeper net
    "wavenet": ModelConfig(kind="wavenet", block_size=8, n_embd=24, n_hidden=128, hidden_bias=False),  # part 5
}


def config_from_dict(d):
    """A ModelConfig from saved JSON; unknown or missing fields are an error, not a guess."""
    names = {f.name for f in fields(ModelConfig)}
    if not isinstance(d, dict) or set(d) != names:
        raise UserError("checkpoint's model config does not match this version of handprop")
    return validate_config(ModelConfig(**d))


def validate_config(config):
    """Reject configurations that cannot be built."""
    if config.kind not in ("mlp", "wavenet"):
        raise UserError(f"unknown model kind {config.kind!r} (choose mlp or wavenet)")
    if config.init not in ("lecture", "naive"):
        raise UserError(f"unknown init {config.init!r} (choose lecture or naive)")
    if config.kind == "wavenet" and (config.block_size < 2 or config.block_size & (config.block_size - 1)):
        raise UserError(f"wavenet needs a block size that is a power of two >= 2, got {config.block_size}")
    return config


def hidden_shapes(config):
    """(fan_in, fan_out) of each hidden Linear, and the FlattenConsecutive group in front of it."""
    if config.kind == "mlp":
        first = (config.block_size, config.n_embd * config.block_size, config.n_hidden)
        return [first] + [(1, config.n_hidden, config.n_hidden)] * (config.n_layers - 1)
    depth = int(math.log2(config.block_size))
    return [(2, 2 * config.n_embd, config.n_hidden)] + [(2, 2 * config.n_hidden, config.n_hidden)] * (depth - 1)


def build_model(config, generator=None, dtype=torch.float32, device="cpu"):
    """The network for config, initialised from generator (the lecture's init or the naive one)."""
    config = validate_config(config)
    lecture = config.init == "lecture"

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=dtype) * scale).to(device)

    layers = [Embedding(randn(config.vocab_size, config.n_embd))]
    for group, fan_in, fan_out in hidden_shapes(config):
        if group > 1:
            layers.append(FlattenConsecutive(group))
        weight = randn(fan_in, fan_out, scale=TANH_GAIN / math.sqrt(fan_in) if lecture else 1.0)
        bias = randn(fan_out, scale=0.1 if lecture else 1.0) if config.hidden_bias else None
        layers.append(Linear(weight, bias))
        if config.batchnorm:
            if lecture:  # non-trivial gamma and beta, so a wrong backward cannot hide behind 1 and 0
                gamma, beta = 1 + randn(fan_out, scale=0.1), randn(fan_out, scale=0.1)
            else:
                gamma, beta = torch.ones(fan_out, dtype=dtype, device=device), torch.zeros(fan_out, dtype=dtype, device=device)
            layers.append(BatchNorm1d(gamma, beta, momentum=config.bn_momentum, bessel=config.bessel))
        layers.append(Tanh())
    out_scale = 0.1 if lecture else 1.0     # a small output layer starts near the uniform guess
    layers.append(Linear(randn(config.n_hidden, config.vocab_size, scale=out_scale), randn(config.vocab_size, scale=out_scale)))
    return Sequential(layers)


def describe(config):
    """One line naming the architecture, e.g. 'mlp, 5 hidden layers of 100, block 3, n_embd 10'."""
    layers = len(hidden_shapes(config))
    return (f"{config.kind}, {layers} hidden layer{'s' if layers > 1 else ''} of {config.n_hidden}"
            f"{'' if config.batchnorm else ' (no BatchNorm)'}, block {config.block_size}, n_embd {config.n_embd}")


def count_parameters(model):
    return sum(p.numel() for p in model.parameters().values())


def preset(name, **overrides):
    """A named config with some fields replaced (None means keep the preset's value)."""
    if name not in PRESETS:
        raise UserError(f"unknown model {name!r} (choose from {', '.join(PRESETS)})")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
