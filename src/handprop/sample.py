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
    """num strings, each prefix + sampled characters until the boundary token, max_length characters at most."""
    device = model.parameters()["0.weight"].device
    start = ([0] * block_size + vocab.encode(prefix))[-block_size:]   # a long prefix: its last block_size characters
    context = torch.tensor(start, device=device).repeat(num, 1)          # (num, block_size)
    steps = max_length - len(prefix)                                    # the prefix counts toward max_length
    sampled = torch.zeros(num, steps, dtype=torch.long, device=device)  # (num, steps) 0 pads after the end
    running = torch.ones(num, dtype=torch.bool, device=device)
    with eval_mode(model):                  # running statistics are used, never updated
        for t in range(steps):
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
    steps = max_length - len(prefix)                                    # the prefix counts toward max_length
    sampled = torch.zeros(num, steps, dtype=torch.long, device=device)  # (num, steps) 0 pads after the end
    running = torch.ones(num, dtype=torch.bool, device=device)
    with eval_mode(model):                  # dropout off, nothing updated
        cache = model.new_cache()
        inputs = start
        for t in range(steps):
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


def longest_sample(spec):
    """The most characters a sample of this model may have (None: no limit); only a transformer has a limit."""
    if spec.model_config.kind != "transformer":
        return None
    return spec.model_config.block_size - 1     # the start token and every character but the last take a position


def sample_items(model, spec, num, generator, max_length=None, prefix=""):
    """num samples from a trained model of spec (a RunSpec), each at most max_length characters, prefix included."""
    limit = longest_sample(spec)
    if max_length is None:                  # room for twice the longest item after the prefix, if the model has it
        max_length = len(prefix) + 2 * spec.longest_item
        max_length = max_length if limit is None else min(max_length, limit)
    elif limit is not None and max_length > limit:
        raise UserError(f"this transformer has {spec.model_config.block_size} positions, so a sample has at "
                        f"most {limit} characters; --max-length {max_length} is longer")
    if max_length <= len(prefix):
        raise UserError(f"--max-length {max_length} leaves no room after the {len(prefix)}-character prefix: it "
                        "counts the whole sample, so make it longer than the prefix")
    if spec.model_config.form == "sequences":
        return generate_sequences(model, spec.vocab, num, generator, max_length, prefix)
    return generate(model, spec.vocab, spec.model_config.block_size, num, generator, max_length, prefix)
