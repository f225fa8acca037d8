"""Batched generation: every sample advances one character per forward pass."""

import torch

from .errors import UserError
from .layers import eval_mode


@torch.inference_mode()
def generate(model, vocab, block_size, num, generator, max_length, prefix=""):
    """num strings, each prefix + sampled characters until the boundary token, max_length characters at most."""
    if max_length <= len(prefix):
        raise UserError(f"--max-length {max_length} leaves no room after the {len(prefix)}-character prefix: it "
                        "counts the whole sample, so make it longer than the prefix")
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
