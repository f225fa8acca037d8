"""What a run will hold in memory, estimated from its configs before anything is allocated.

A model too large for the machine should be one error line with the estimate, not an allocator's
traceback minutes later. The estimate counts what training keeps at once: the weights, their gradients,
the optimiser's state, and what one batch's forward pass keeps for the backward. It leaves out smaller
things (the corpus, temporaries), so a run it refuses would not have fit.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import format_number
from .errors import UserError
from .models import hidden_shapes

BYTES = 4                   # float32, the type every run trains in
ADAMW_BUFFERS = 4           # AdamW's flat m, v, gradient and update buffers, each as large as the parameters
CGROUP = Path("/sys/fs/cgroup")    # this process's cgroup v2 directory, where a container's memory limit is read
STATE = {"sgd": "the weights and gradients", "adamw": "the weights, gradients and AdamW's buffers"}


def parameter_count(config):
    """The number of parameters build_model(config) makes, counted from the config alone."""
    V, C, H, L = config.vocab_size, config.n_embd, config.n_hidden, config.n_layers
    if config.kind == "bigram":
        return V * V
    if config.kind in ("rnn", "gru"):
        gates = 1 if config.kind == "rnn" else 3
        return V * C + gates * ((C + H) * H + H) + H + H * V + V       # embedding, cell, start state, output
    if config.kind == "transformer":
        block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
        return V * C + config.block_size * C + L * block + 2 * C + C * V
    hidden = sum(fan_in * fan_out + fan_out * (config.hidden_bias + 2 * config.batchnorm)
                 for _, fan_in, fan_out in hidden_shapes(config))
    return V * C + hidden + H * V + V


def activations_per_example(config):
    """Numbers one example's forward pass keeps for the backward, at the least."""
    V, C, H, T = config.vocab_size, config.n_embd, config.n_hidden, config.block_size
    if config.kind == "bigram":
        return T * 2 * V                                    # logits and probabilities
    if config.kind in ("rnn", "gru"):
        per_step = 2 * H if config.kind == "rnn" else 8 * H   # each step's cache
        return T * (C + per_step + 2 * V)
    if config.kind == "transformer":
        attention = 2 * config.n_head * T                   # each position's scores and softmax, per head
        return T * (2 * C + config.n_layers * (16 * C + attention) + 2 * V)
    total = 2 * V
    for i, (_, fan_in, fan_out) in enumerate(hidden_shapes(config)):
        rows = 1 if config.kind == "mlp" else T >> (i + 1)  # wavenet halves its positions at each layer
        total += rows * (fan_in + 3 * fan_out)              # a Linear's input, then BatchNorm's and tanh's outputs
    return total


@dataclass(frozen=True)
class Footprint:
    """A run's memory, estimated: its parameters, and bytes for weights and state and for activations."""

    parameters: int
    state_bytes: int        # weights, gradients and the optimiser's buffers
    activation_bytes: int   # what one batch's forward keeps for the backward

    @property
    def total(self):
        return self.state_bytes + self.activation_bytes


def footprint(model_config, train_config):
    """The memory a run of these configs holds while it trains."""
    parameters = parameter_count(model_config)
    copies = 2 + (ADAMW_BUFFERS if train_config.optimizer == "adamw" else 0)     # weights and gradients, then state
    activations = activations_per_example(model_config) * train_config.batch_size
    return Footprint(parameters, parameters * copies * BYTES, activations * BYTES)


def available_memory(device):
    """Bytes free for a new run on device: the GPU's free memory, or the machine's available memory within the
    container's limit (None where neither can be told)."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    free = [n for n in (meminfo_available(), cgroup_room(CGROUP)) if n is not None]
    return min(free) if free else None


def meminfo_available():
    """What Linux says a new process can use without swapping (MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def cgroup_room(cgroup):
    """The room left under a cgroup v2 memory limit (a container's), or None where there is no limit to read."""
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        used = int((cgroup / "memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def size_text(nbytes):
    """Bytes as people read them: 1.5 GB, 300 MB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes / 1e3:,.0f} kB"


def check_fits(model_config, train_config):
    """Refuse, before anything is allocated, a run that would not fit in the memory available."""
    estimate = footprint(model_config, train_config)
    available = available_memory(train_config.device)
    if available is None or estimate.total <= available:
        return
    raise UserError(f"this run needs about {size_text(estimate.total)} of memory ({format_number(estimate.parameters)}"
                    f" parameters: {size_text(estimate.state_bytes)} for {STATE[train_config.optimizer]}, "
                    f"{size_text(estimate.activation_bytes)} for a batch's "
                    f"activations), but {size_text(available)} is available on {train_config.device}: choose a smaller"
                    " model (--n-embd, --n-hidden, --n-layers, --block-size) or batch (-b)")
