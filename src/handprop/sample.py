"""Batched generation: every sample advances one character per forward pass, in chunks streamed as they finish.

Window models see the last block_size characters; sequence models read from the start token on,
one position per step, keeping what they need in a cache (a transformer's keys and values, a
recurrent layer's hidden state), so a new character costs one position, not the whole prefix.

stream_samples makes num samples CHUNK at a time and yields each chunk's text as soon as it is
done, so memory stays flat for any num. The chunks draw from one generator in turn: the same
seed, num and chunk size give the same samples, run after run; another chunk size draws others.
"""

from dataclasses import dataclass

import numpy as np
import torch

from .errors import UserError
from .layers import BatchNorm1d, Embedding, FlattenConsecutive, Linear, Sequential, Tanh, eval_mode

CHUNK = 10_000              # samples generated at once: large enough to keep the matrices busy, small for memory
NEWLINE = ord("\n")


@dataclass(frozen=True)
class Sampling:
    """How the next character is drawn from the logits."""

    temperature: float = 1.0    # logits / temperature: below 1 sharper, above 1 flatter
    top_k: int | None = None    # only the k largest logits may be drawn (None: all)


def draw(logits, generator, sampling):
    """One index per row of logits (num, V), drawn from softmax(logits / temperature) over the top_k largest.

    Inverse-CDF sampling: one uniform number per row against the cumulative probabilities, several times
    cheaper than torch.multinomial for a small vocabulary.
    """
    if sampling.temperature != 1.0:
        logits = logits / sampling.temperature
    indices = None
    if sampling.top_k is not None and sampling.top_k < logits.shape[1]:
        logits, indices = torch.topk(logits, sampling.top_k, dim=1)    # (num, k) the k largest and their tokens
    cdf = torch.softmax(logits, dim=1).cumsum_(1)                       # (num, K)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]      # (num, 1)
    ix = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)  # u rounded up to the total: the last
    return ix.squeeze(1) if indices is None else indices.gather(1, ix).squeeze(1)   # (num,)


def decode_lines(vocab, prefix, sampled):
    """Each row of sampled (num, steps), 0 after its end, as prefix + its characters + a newline: one string."""
    code_points = np.array([0] + [ord(c) for c in vocab.chars], dtype="<u4")   # index -> code point; 0: nothing
    rows = code_points[sampled.cpu().numpy()]                                  # (num, steps)
    num = rows.shape[0]
    head = np.broadcast_to(np.array([ord(c) for c in prefix], dtype="<u4"), (num, len(prefix)))
    tail = np.full((num, 1), NEWLINE, dtype="<u4")
    flat = np.concatenate([head, rows, tail], axis=1).ravel()
    return flat[flat != 0].tobytes().decode("utf-32-le")    # a corpus has no NUL, so 0 only ever pads


def as_list(lines):
    """The strings of decode_lines' text, one per line."""
    return lines.split("\n")[:-1]           # items hold no newline (they are lines), so this inverts decode_lines


def folded(linear, norm=None):
    """(weight, bias) of linear followed by norm in evaluation mode as one affine map; norm may be None."""
    weight = linear.weight                                              # (fan_in, fan_out)
    bias = linear.bias if linear.bias is not None else torch.zeros_like(weight[0])
    if norm is None:
        return weight, bias
    scale = norm.weight * (norm.running_var + norm.eps) ** -0.5        # (fan_out,) gamma / std
    return weight * scale, (bias - norm.running_mean) * scale + norm.bias


def from_sigmoid(weight, bias):
    """weight and bias taking s = sigmoid(2z) in place of its tanh(z) = 2s - 1: x W + b = s (2W) + b - sum W."""
    return 2 * weight, bias - weight.sum(0)


def mlp_logits(model):
    """An mlp's evaluation-mode forward (num, block_size) -> (num, V), folded for speed: each BatchNorm into the
    Linear before it, each tanh(z) computed as 2 sigmoid(2z) - 1 (sigmoid is about 3x cheaper than tanh on a CPU)
    with the factors in the weights around it. None unless model is Embedding, [FlattenConsecutive], (Linear,
    [BatchNorm1d], Tanh) at least once, Linear."""
    layers = model.layers if isinstance(model, Sequential) else []
    if len(layers) < 4 or not isinstance(layers[0], Embedding) or not isinstance(layers[-1], Linear):
        return None
    middle = layers[2:-1] if isinstance(layers[1], FlattenConsecutive) else layers[1:-1]
    hidden, pending = [], []                # pending: the Linear (and BatchNorm1d) of the hidden layer being read
    for layer in middle:
        if isinstance(layer, Linear) and not pending or isinstance(layer, BatchNorm1d) and len(pending) == 1:
            pending.append(layer)
        elif isinstance(layer, Tanh) and pending:
            weight, bias = folded(*pending) if not hidden else from_sigmoid(*folded(*pending))
            hidden.append((2 * weight, 2 * bias))                       # the sigmoid's argument is 2z
            pending = []
        else:
            return None
    if pending or not hidden:
        return None
    table, (out_weight, out_bias) = layers[0].weight, from_sigmoid(*folded(layers[-1]))

    def logits(windows):
        x = table[windows].flatten(1)                                   # (num, block_size * n_embd)
        for weight, bias in hidden:
            x = torch.addmm(bias, x, weight).sigmoid_()                 # (num, n_hidden) (tanh + 1) / 2
        return torch.addmm(out_bias, x, out_weight)                     # (num, V)

    return logits


@torch.inference_mode()
def sample_windows(model, vocab, block_size, num, generator, max_length, prefix="", sampling=Sampling()):
    """Indices (num, max_length - len(prefix)) drawn by a window model, 0 after each sample's end."""
    device = next(iter(model.parameters().values())).device
    start = ([0] * block_size + vocab.encode(prefix))[-block_size:]   # a long prefix: its last block_size characters
    steps = max_length - len(prefix)                                    # the prefix counts toward max_length
    sampled = torch.zeros(num, steps, dtype=torch.long, device=device)  # (num, steps) 0 pads after the end
    # each running sample's context then what it drew, so step t's context is a view, windows[:, t : t + block_size]
    windows = torch.zeros(num, block_size + steps, dtype=torch.long, device=device)
    windows[:, :block_size] = torch.tensor(start, dtype=torch.long, device=device)
    rows = torch.arange(num, device=device)                             # the sample each running row belongs to
    with eval_mode(model):                  # running statistics are used, never updated
        forward = mlp_logits(model) or model.forward
        for t in range(steps):
            ix = draw(forward(windows[:, t : t + block_size]), generator, sampling)           # (running,)
            sampled[rows, t] = ix
            windows[:, block_size + t] = ix
            running = ix != 0
            if not running.all():           # finished samples leave the batch, so later steps cost less
                keep = running.nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                windows, rows = windows[keep], rows[keep]
    return sampled


@torch.inference_mode()
def sample_sequences(model, vocab, num, generator, max_length, prefix="", cached=True, sampling=Sampling()):
    """Indices drawn by a sequence model (sample_windows' form); cached=False recomputes the whole prefix each step."""
    device = next(iter(model.parameters().values())).device
    start = [0] + vocab.encode(prefix)
    steps = max_length - len(prefix)                                    # the prefix counts toward max_length
    inputs = torch.zeros(num, len(start) + steps, dtype=torch.long, device=device)   # (num, start + steps)
    inputs[:, : len(start)] = torch.tensor(start, dtype=torch.long, device=device)
    sampled = inputs[:, len(start) :]                                   # (num, steps) a view: 0 pads after the end
    running = torch.ones(num, dtype=torch.bool, device=device)
    with eval_mode(model):                  # dropout off, nothing updated
        cache, seen = model.new_cache(), 0  # the cache holds inputs[:, :seen]
        for t in range(steps):
            if cached:                      # feed only what the cache has not seen: the start, then one character
                for i in range(seen, len(start) + t):
                    logits = model.step(inputs[:, i : i + 1], cache)        # (num, 1, V)
                seen = len(start) + t
            else:
                logits = model.forward(inputs[:, : len(start) + t])         # (num, len(start) + t, V)
            ix = draw(logits[:, -1], generator, sampling) * running         # (num,)
            sampled[:, t] = ix
            running &= ix != 0
            if not running.any():
                break
    return sampled


def longest_sample(spec):
    """The most characters a sample of this model may have (None: no limit); only a transformer has a limit."""
    if spec.model_config.kind != "transformer":
        return None
    return spec.model_config.block_size - 1     # the start token and every character but the last take a position


def sample_length(spec, max_length, prefix):
    """The most characters a sample may have, prefix included: max_length, or a default from the training items."""
    limit = longest_sample(spec)
    if limit is not None and len(prefix) >= limit:
        raise UserError(f"this transformer reads {spec.model_config.block_size} positions, so a prefix can hold at "
                        f"most {limit - 1} characters (the start token takes one, a new character another); --prefix "
                        f"has {len(prefix)}")
    if max_length is None:                  # room for twice the longest item after the prefix, if the model has it
        max_length = len(prefix) + 2 * spec.longest_item
        max_length = max_length if limit is None else min(max_length, limit)
    elif limit is not None and max_length > limit:
        raise UserError(f"this transformer has {spec.model_config.block_size} positions, so a sample has at "
                        f"most {limit} characters; --max-length {max_length} is longer")
    if max_length <= len(prefix):
        raise UserError(f"--max-length {max_length} leaves no room after the {len(prefix)}-character prefix: it "
                        "counts the whole sample, so make it longer than the prefix")
    return max_length


def check_sampling(sampling, vocab_size):
    """A temperature above 0 and a top-k within the vocabulary, else a UserError."""
    if not sampling.temperature > 0:
        raise UserError(f"--temperature must be above 0, got {sampling.temperature}")
    if sampling.top_k is not None and not 1 <= sampling.top_k <= vocab_size:
        raise UserError(f"--top-k must be between 1 and the vocabulary's {vocab_size} tokens, got {sampling.top_k}")


def stream_samples(model, spec, num, generator, max_length=None, prefix="", sampling=Sampling(), chunk=CHUNK):
    """num samples of a trained model of spec (a RunSpec) as text, one per line, yielded chunk samples at a time."""
    max_length = sample_length(spec, max_length, prefix)
    vocab = spec.vocab
    check_sampling(sampling, vocab.size)
    vocab.encode(prefix)                    # an unknown character is an error before anything is yielded
    for done in range(0, num, chunk):
        size = min(chunk, num - done)
        sampled = spec.form.generate(model, vocab, spec.model_config.block_size, size, generator, max_length, prefix,
                                     sampling)
        yield decode_lines(vocab, prefix, sampled)


def sample_items(model, spec, num, generator, max_length=None, prefix="", sampling=Sampling()):
    """num samples from a trained model of spec (a RunSpec), each at most max_length characters, prefix included."""
    return as_list("".join(stream_samples(model, spec, num, generator, max_length, prefix, sampling)))
