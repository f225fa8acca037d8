"""The models, each built from its ModelConfig as a Sequential of hand-differentiated layers.

Window models (mlp, wavenet) read block_size characters and predict the next one; sequence
models (bigram, rnn, gru, transformer) read a whole item and predict every next character.
Each model owns its init here, in one place.
"""

import math

import torch

from .config import SEQUENCE_KINDS, validate_model
from .errors import UserError
from .layers import (
    GELU,
    BatchNorm1d,
    CausalSelfAttention,
    Dropout,
    Embedding,
    FlattenConsecutive,
    GRUCell,
    LayerNorm,
    Linear,
    LookupLinear,
    Recurrent,
    Residual,
    RNNCell,
    Sequential,
    Tanh,
    TokenPositionEmbedding,
)
from .packing import Layout

TANH_GAIN = 5 / 3           # Kaiming gain for tanh (He et al. 2015; torch.nn.init.calculate_gain)


def hidden_shapes(config):
    """(fan_in, fan_out) of each hidden Linear, and the FlattenConsecutive group in front of it."""
    if config.kind == "mlp":
        first = (config.block_size, config.n_embd * config.block_size, config.n_hidden)
        return [first] + [(1, config.n_hidden, config.n_hidden)] * (config.n_layers - 1)
    deeper = [(2, 2 * config.n_hidden, config.n_hidden)] * (config.n_layers - 1)    # each halves the positions
    return [(2, 2 * config.n_embd, config.n_hidden)] + deeper


def build_model(config, generator=None, dtype=torch.float32, device="cpu"):
    """The network for config, initialised from generator (which also draws the dropout masks)."""
    config = validate_model(config)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=dtype) * scale).to(device)

    def constant(value, *shape):
        return torch.full(shape, value, dtype=dtype, device=device)

    if config.kind in SEQUENCE_KINDS and config.block_size < 1:
        raise UserError(f"{config.kind}'s block size (positions) is set from the corpus before it is built")
    builders = {"mlp": build_mlp, "wavenet": build_mlp, "bigram": build_bigram, "rnn": build_recurrent,
                "gru": build_recurrent, "transformer": build_transformer}
    return builders[config.kind](config, randn, constant, generator)


def build_mlp(config, randn, constant, generator):
    """Lectures 3-5: Embedding, (FlattenConsecutive, Linear, BatchNorm1d, Tanh) per hidden layer, Linear."""
    lecture = config.init == "lecture"
    layers = [Embedding(randn(config.vocab_size, config.n_embd))]
    for i, (group, fan_in, fan_out) in enumerate(hidden_shapes(config)):
        weight = randn(fan_in, fan_out, scale=TANH_GAIN / math.sqrt(fan_in) if lecture else 1.0)
        bias = randn(fan_out, scale=0.1 if lecture else 1.0) if config.hidden_bias else None
        if i == 0 and config.lookup_tables:     # the same init: Embedding, flatten and Linear as one layer
            layers = [LookupLinear(layers[0].weight, weight, bias)]
        else:
            # the first layer flattens the whole context, even one position: (B, 1, C) -> (B, C)
            layers += [FlattenConsecutive(group)] * (i == 0 or group > 1) + [Linear(weight, bias)]
        if config.batchnorm:
            if lecture:  # non-trivial gamma and beta, so a wrong backward cannot hide behind 1 and 0
                gamma, beta = 1 + randn(fan_out, scale=0.1), randn(fan_out, scale=0.1)
            else:
                gamma, beta = constant(1.0, fan_out), constant(0.0, fan_out)
            layers.append(BatchNorm1d(gamma, beta, momentum=config.bn_momentum, bessel=config.bessel))
        layers.append(Tanh())
    out_scale = 0.1 if lecture else 1.0     # a small output layer starts near the uniform guess
    layers.append(Linear(randn(config.n_hidden, config.vocab_size, scale=out_scale),
                         randn(config.vocab_size, scale=out_scale)))
    return Sequential(layers)


def build_bigram(config, randn, constant, generator):
    """makemore's first model: a V x V table whose row for the current character is the next one's logits."""
    return Sequential([Embedding(constant(0.0, config.vocab_size, config.vocab_size))])


def linear(randn, constant, fan_in, fan_out, bias=True):
    """A Linear with weights of std 1/sqrt(fan_in) (PyTorch's default scale) and zero bias."""
    weight = randn(fan_in, fan_out, scale=1 / math.sqrt(fan_in))
    return Linear(weight, constant(0.0, fan_out) if bias else None)


def build_recurrent(config, randn, constant, generator):
    """makemore's RNN / GRU: Embedding, a cell run over time from a learned start state, Linear to the logits."""
    C, H = config.n_embd, config.n_hidden
    if config.kind == "rnn":
        cell = RNNCell(randn(C + H, H, scale=1 / math.sqrt(C + H)), constant(0.0, H))
    else:
        gates = [t for _ in range(3) for t in (randn(C + H, H, scale=1 / math.sqrt(C + H)), constant(0.0, H))]
        cell = GRUCell(*gates)              # update gate z, reset gate r, candidate hbar
    return Sequential([
        Embedding(randn(config.vocab_size, C)),             # (B, T) -> (B, T, C)
        Recurrent(cell, constant(0.0, H)),                  # (B, T, C) -> (B, T, H)
        linear(randn, constant, H, config.vocab_size),      # (B, T, H) -> (B, T, V)
    ])


def build_transformer(config, randn, constant, generator):
    """GPT-2 as in makemore and nanoGPT: token + position embeddings, pre-LayerNorm blocks, a last LayerNorm."""
    C, V, p = config.n_embd, config.vocab_size, config.dropout
    std, proj_std = 0.02, 0.02 / math.sqrt(2 * config.n_layers)    # GPT-2: residual projections scaled down
    layout = Layout()       # packed rows or the (B, T) grid, set by the embedding each forward (packing.py)

    def layer_norm():
        return LayerNorm(constant(1.0, C), constant(0.0, C))

    def block():
        attention = CausalSelfAttention(Linear(randn(C, 3 * C, scale=std), constant(0.0, 3 * C)),
                                        Linear(randn(C, C, scale=proj_std), constant(0.0, C)), config.n_head, layout)
        mlp = [Linear(randn(C, 4 * C, scale=std), constant(0.0, 4 * C)), GELU(),
               Linear(randn(4 * C, C, scale=proj_std), constant(0.0, C))]
        return [Residual(Sequential([layer_norm(), attention, Dropout(p, generator, layout)])),
                Residual(Sequential([layer_norm(), *mlp, Dropout(p, generator, layout)]))]

    return Sequential([
        TokenPositionEmbedding(randn(V, C, scale=std), randn(config.block_size, C, scale=std), layout),  # (B, T, C)
        Dropout(p, generator, layout),
        *[layer for _ in range(config.n_layers) for layer in block()],
        layer_norm(),
        Linear(randn(C, V, scale=std)),                     # (B, T, C) -> (B, T, V), no bias as in GPT-2
    ])


def describe(config):
    """One line naming the architecture, e.g. 'mlp, 5 hidden layers of 100, block 3, n_embd 10'."""
    if config.kind == "bigram":
        return f"bigram, a {config.vocab_size} x {config.vocab_size} table of logits"
    if config.kind in ("rnn", "gru"):
        return f"{config.kind}, hidden state {config.n_hidden}, n_embd {config.n_embd}"
    if config.kind == "transformer":
        return (f"transformer, {config.n_layers} blocks of {config.n_head} heads, n_embd {config.n_embd}, "
                f"{config.block_size} positions, dropout {config.dropout:g}")
    layers = len(hidden_shapes(config))
    return (f"{config.kind}, {layers} hidden layer{'s' if layers > 1 else ''} of {config.n_hidden}"
            f"{'' if config.batchnorm else ' (no BatchNorm)'}, block {config.block_size}, n_embd {config.n_embd}"
            + (", first layer as lookup tables" if config.lookup_tables else ""))


def count_parameters(model):
    return sum(p.numel() for p in model.parameters().values())
