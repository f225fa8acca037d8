"""Packed batches: a transformer computes only the positions that have a target, not the padding.

A batch of names padded to its longest is mostly padding: 32 names of about 7 positions each fill
some 230 of a 32 x 16 grid's 512 cells. Every layer of a transformer but attention works on each
position alone (Linear, LayerNorm, GELU, dropout, the loss), so those layers can run on the real
positions only, stacked into rows (N, C). Attention puts the rows back on the (B, T) grid, where
each position attends to the ones before it; a real position never sees padding (padding comes
after an item's end), so packing changes no value the loss depends on, only the work done.

    X, Y = pack(X, Y, index)        # X a Packed, Y (N,): what forward_backward takes

Proven in tests/test_packing.py: a packed step's loss and every gradient equal the padded step's
(float64).
"""

import math
from dataclasses import dataclass

import torch

from .losses import IGNORED

# a compiled step holds this many standard deviations of real positions above their mean: for 64 names, 496 rows, and
# 1 batch in 2,800 has more (measured), which the eager step takes; each deviation more costs every step 2% more rows
SPARE_DEVIATIONS = 3


@dataclass
class Packed:
    """A padded batch by the positions a model computes: index (N,) holds their flat positions b * T + t in the
    tokens' (B, T) grid, in order; the grid's other cells are never computed."""

    tokens: torch.Tensor    # (B, T) token indices, padded
    index: torch.Tensor     # (N,) flat grid positions of the rows, increasing

    @property
    def positions(self):
        """(N,) each row's position t in its item."""
        return self.index % self.tokens.shape[1]

    def to_rows(self, grid):
        """(B, T, ...) -> (N, ...): the rows' cells of the grid."""
        return grid.reshape(-1, *grid.shape[2:])[self.index]

    def to_grid(self, rows):
        """(N, ...) -> (B, T, ...): the rows on the grid, zero in every other cell."""
        B, T = self.tokens.shape
        grid = rows.new_zeros(B * T, *rows.shape[1:]).index_copy_(0, self.index, rows)
        return grid.view(B, T, *rows.shape[1:])

    def grid_shape(self, rows):
        """The shape (B, T, ...) the rows (N, ...) fill on the grid."""
        return (*self.tokens.shape, *rows.shape[1:])


class Layout:
    """How the activations of one forward pass are laid out, shared by a transformer's layers: packed (a Packed,
    set by the token embedding when it is given one) or the (B, T) grid (None). Attention and dropout read it."""

    packed = None

    def to_grid(self, x):
        """(N, ...) rows or a (B, T, ...) grid -> the (B, T, ...) grid."""
        return x if self.packed is None else self.packed.to_grid(x)

    def to_rows(self, x):
        """A (B, T, ...) grid -> the rows the layers between compute: (N, ...) packed, else the grid itself."""
        return x if self.packed is None else self.packed.to_rows(x)

    def grid_shape(self, x):
        """The shape x has on the grid."""
        return x.shape if self.packed is None else self.packed.grid_shape(x)


def real_positions(Y):
    """(N,) the flat positions of a (B, T) batch's targets that count (not IGNORED padding), in order."""
    return (Y.reshape(-1) != IGNORED).nonzero()[:, 0]


def pack(X, Y, index):
    """The batch X, Y (B, T) as the rows at index (N,): (Packed X, their targets (N,))."""
    return Packed(X, index), Y.reshape(-1)[index]


def capacity(examples, batch_size):
    """The rows a compiled step holds: the mean real positions of batch_size items of the split plus
    SPARE_DEVIATIONS standard deviations of their sum (a batch with more takes the eager step), at most the grid."""
    positions = (examples.bounds[1:] - examples.bounds[:-1]).double()     # (items,) characters + the end token
    mean, std = positions.mean().item(), positions.std(correction=0).item()
    spare = batch_size * mean + SPARE_DEVIATIONS * math.sqrt(batch_size) * std
    return min(batch_size * examples.width, 8 * math.ceil(spare / 8))


def fixed_positions(Y, rows):
    """(rows,) the real positions of the (B, T) batch Y, then padding cells to fill rows (their targets are IGNORED:
    they take no part in the loss and get zero gradient); None where the batch has more real positions than rows."""
    counted = Y.reshape(-1) != IGNORED                   # (B * T,)
    real, padding = counted.nonzero()[:, 0], (~counted).nonzero()[:, 0]
    if real.shape[0] > rows:
        return None
    return torch.cat([real, padding[: rows - real.shape[0]]]).sort().values
