"""Named model configurations, each built as a Sequential of hand-differentiated layers."""

import math

import torch

from .config import ModelConfig, preset_config, validate_model
from .errors import UserError
from .layers import BatchNorm1d, Embedding, FlattenConsecutive, Linear, Sequential, Tanh

TANH_GAIN = 5 / 3           # Kaiming gain for tanh (He et al. 2015; torch.nn.init.calculate_gain)


PRESETS = {
    "mlp": ModelConfig(),                                                   # lecture part 4, exercise 4
    "mlp-part3": ModelConfig(hidden_bias=False),                            # lecture part 3: 12097 params
    "deep": ModelConfig(n_hidden=100, n_layers=5, hidden_bias=False),       # part 3's deeper net
    "wavenet": ModelConfig(kind="wavenet", block_size=8, n_embd=24, n_hidden=128, n_layers=3,   # part 5
                           hidden_bias=False),
}


def hidden_shapes(config):
    """(fan_in, fan_out) of each hidden Linear, and the FlattenConsecutive group in front of it."""
    if config.kind == "mlp":
        first = (config.block_size, config.n_embd * config.block_size, config.n_hidden)
        return [first] + [(1, config.n_hidden, config.n_hidden)] * (config.n_layers - 1)
    return [(2, 2 * config.n_embd, config.n_hidden)] + [(2, 2 * config.n_hidden, config.n_hidden)] * (config.n_layers - 1)


def build_model(config, generator=None, dtype=torch.float32, device="cpu"):
    """The network for config, initialised from generator (the lecture's init or the naive one)."""
    config = validate_model(config)
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
                gamma = torch.ones(fan_out, dtype=dtype, device=device)
                beta = torch.zeros(fan_out, dtype=dtype, device=device)
            layers.append(BatchNorm1d(gamma, beta, momentum=config.bn_momentum, bessel=config.bessel))
        layers.append(Tanh())
    out_scale = 0.1 if lecture else 1.0     # a small output layer starts near the uniform guess
    layers.append(Linear(randn(config.n_hidden, config.vocab_size, scale=out_scale),
                         randn(config.vocab_size, scale=out_scale)))
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
    return validate_model(preset_config(PRESETS[name], **overrides))
