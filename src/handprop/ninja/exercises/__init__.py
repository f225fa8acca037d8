"""Every backprop-ninja exercise by its CLI name, in the order `handprop exercise list` shows them."""

from .mlp import EXERCISE as MLP

EXERCISES = {exercise.name: exercise for exercise in (MLP,)}
