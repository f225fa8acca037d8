"""Batched generation: every sample advances one character per forward pass."""

import torch

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
