"""Dropout's noise (noise.py): uniform in [0, 1) on a grid of 2**-16, every level alike, decided by the generator."""

import pytest
import torch

from handprop.layers import Dropout
from handprop.noise import LEVELS, uniform_noise


def test_the_noise_takes_every_level_of_the_grid_and_nothing_else():
    noise = uniform_noise((2_000_000,), torch.Generator().manual_seed(1), torch.float64, "cpu")
    assert noise.min() >= 0.0 and noise.max() < 1.0
    levels = noise * LEVELS
    assert torch.equal(levels, levels.round())                  # on the grid
    counts = torch.bincount(levels.long(), minlength=LEVELS)
    assert counts.shape[0] == LEVELS and (counts > 0).all()     # 2M draws leave a level out with probability 1e-9
    assert abs(noise.mean().item() - 0.5) < 5 * (1 / 12 / 2e6) ** 0.5     # within 5 standard errors of 1/2


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_dropout_drops_with_the_probability_asked(p):
    x = torch.ones(1000, 1000)
    layer = Dropout(p, torch.Generator().manual_seed(2))
    layer.train()
    dropped = (layer.forward(x) == 0).double().mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5 + 1 / LEVELS


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 5)])     # counts that are not multiples of 4 too
def test_the_noise_depends_only_on_the_generator_state_and_advances_it_by_one_draw_per_four(shape):
    first, second = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = uniform_noise(shape, first, torch.float32, "cpu")
    b = uniform_noise(shape, second, torch.float32, "cpu")
    assert a.shape == shape and torch.equal(a, b)
    assert torch.equal(uniform_noise(shape, first, torch.float32, "cpu"), uniform_noise(shape, second, torch.float32,
                                                                                          "cpu"))
    third = torch.Generator().manual_seed(3)
    for _ in range(2):
        torch.randint(-(2**63), 2**63 - 1, ((a.numel() + 3) // 4,), generator=third, dtype=torch.int64)
    assert torch.equal(first.get_state(), third.get_state())
