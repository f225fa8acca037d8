"""Every backprop-ninja exercise by its CLI name, in the order `handprop exercise list` shows them."""

from .attention import EXERCISE as ATTENTION
from .gru import EXERCISE as GRU
from .layernorm import EXERCISE as LAYERNORM
from .mlp import EXERCISE as MLP
from .rnn import EXERCISE as RNN
from .transformer_block import EXERCISE as TRANSFORMER_BLOCK
from .wavenet import EXERCISE as WAVENET

EXERCISES = {
    exercise.name: exercise for exercise in (MLP, WAVENET, LAYERNORM, ATTENTION, TRANSFORMER_BLOCK, RNN, GRU)
}
