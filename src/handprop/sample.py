"""Batched generation: every sample advances one character per forward pass.

Window models see the last block_size characters; sequence models read from the start token on,
one position per step, keeping what they need in a cache (a transformer's keys and values, a
recurrent layer's hidden state), so a new character costs one position, not the whole prefix.
"""

import torch

from .errors import UserError
from .layers import eval_mode


@torch.inference_mode()
def generate(model, vocab, block_size, num, generator, max_length, prefix=""):
    """num strings, each prefix + sampled characters until the boundary token (or max_length)."""
    device = model.parameters()["0.weight"].device
    start = ([0] * block_size + vocab.encode(prefix))[-block_size:]
    context = torch.tensor(start, device=device).repeat(num, 1)          # (num, block_size)
    sampled = torch.zeros(num, max_length, dtype=torch.long, device=device)  # 0 pads after the end
    running = torch.ones(num, dtype=torch.bool, device=device)
    with eval_mode(model):                  # running statistics are used, never updated
        for t in range(max_length):
            probs = torch.softmax(model.forward(context), dim=1)           # (num, V)
            ix = torch.multinomial(probs, 1, generator=generator).squeeze(1) * running
            sampled[:, t] = ix
            running &= ix != 0
            if not running.any():
                break
            context = torch.cat([context[:, 1:], ix[:, None]], dim=1)
    return [prefix + vocab.decode([i for i in row if i != 0]) for row in sampled.tolist()]


@torch.inference_mode()
def generate_sequences(model, vocab, num, generator, max_length, prefix="", cached=True):
    """generate() for sequence models; cached=False recomputes the whole prefix for each character (to compare)."""
    device = next(iter(model.parameters().values())).device
    start = torch.tensor([0] + vocab.encode(prefix), device=device).repeat(num, 1)     # (num, 1 + len(prefix))
    sampled = torch.zeros(num, max_length, dtype=torch.long, device=device)  # 0 pads after the end
    running = torch.ones(num, dtype=torch.bool, device=device)
    with eval_mode(model):                  # dropout off, nothing updated
        cache = model.new_cache()
        inputs = start
        for t in range(max_length):
            if cached:                      # feed only what the cache has not seen: the start, then one character
                for i in range(inputs.shape[1]):
                    logits = model.step(inputs[:, i : i + 1], cache)                # (num, 1, V)
            else:
                logits = model.forward(torch.cat([start, sampled[:, :t]], dim=1))   # (num, 1 + t, V)
            probs = torch.softmax(logits[:, -1], dim=1)                             # (num, V)
            ix = torch.multinomial(probs, 1, generator=generator).squeeze(1) * running
            sampled[:, t] = ix
            running &= ix != 0
            if not running.any():
                break
            inputs = ix[:, None]                                                    # (num, 1)
    return [prefix + vocab.decode([i for i in row if i != 0]) for row in sampled.tolist()]


def positions_left(spec, prefix):
    """How many characters a model can sample after prefix (None: no limit); only a transformer has a limit."""
    if spec.model_config.kind != "transformer":
        return None
    return spec.model_config.block_size - 1 - len(prefix)   # the start token and every character take a position


def sample_items(model, spec, num, generator, max_length=None, prefix=""):
    """num samples from a trained model of spec (a RunSpec), each at most max_length characters after prefix."""
    limit = positions_left(spec, prefix)
    default = 2 * spec.longest_item if limit is None else min(2 * spec.longest_item, limit)
    max_length = max_length or default
    if limit is not None and max_length > limit:
        raise UserError(f"this transformer has {spec.model_config.block_size} positions: after the prefix "
                        f"{prefix!r} it can sample at most {max(limit, 0)} characters, not {max_length}")
    if max_length < 1:
        raise UserError(f"the prefix {prefix!r} leaves no position to sample in")
    if spec.model_config.form == "sequences":
        return generate_sequences(model, spec.vocab, num, generator, max_length, prefix)
    return generate(model, spec.vocab, spec.model_config.block_size, num, generator, max_length, prefix)
