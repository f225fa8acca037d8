"""Dropout's uniform noise, drawn four values to a 64-bit draw of the generator.

torch.rand takes one draw of the generator (a Mersenne twister, one value at a time on the CPU)
for every value: a transformer step's 9 dropout masks of 64 x 16 x 64 cells cost about 2 ms that
way, an eighth of its compiled step. A mask needs far less than float32's 24 bits: here each 64-bit
draw gives four 16-bit values, so the noise lies on a grid of 2**-16 in [0, 1) and dropout's p is
met to within 2**-16 (p = 0.3 drops with probability 19661 / 65536 = 0.300003), for about a third of
the cost. The noise depends only on the generator's state, as torch.rand's does (tested on the CPU).
"""

import math

import torch

LEVELS = 2**16          # values of the noise, evenly spaced in [0, 1)
PER_DRAW = 4            # 16-bit values in one 64-bit draw


def uniform_noise(shape, generator, dtype, device):
    """(shape) uniform noise in [0, 1) on a grid of 1/LEVELS, from generator (advanced by one 64-bit draw per 4)."""
    count = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, (-(-count // PER_DRAW),), generator=generator, dtype=torch.int64,
                          device=device)                                # every 64-bit pattern (but one) alike
    halves = words.view(torch.int16)[:count].reshape(shape)             # (shape) in [-32768, 32767]
    return halves.to(dtype).add_(LEVELS // 2).mul_(1.0 / LEVELS)
