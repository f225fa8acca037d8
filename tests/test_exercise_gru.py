"""The `gru` exercise beyond what every exercise keeps (test_exercises.py): its solution equal to handprop's
Recurrent(GRUCell) layer."""

from exercise_checks import recurrent_layers, relative, solved

from handprop.layers import GRUCell
from handprop.ninja.exercises.gru import EXERCISE

CELL_NAMES = {"Wz": "weight_z", "bz": "bias_z", "Wr": "weight_r", "br": "bias_r", "Whbar": "weight_hbar",
              "bhbar": "bias_hbar"}     # the exercise's parameter names -> GRUCell's


def test_solution_equals_the_recurrent_layer():
    """The same numbers through Embedding, Recurrent(GRUCell), Linear and SequenceCrossEntropy, forward and back."""
    tensors, _, values, mine = solved(EXERCISE)
    hs, loss, recurrent, gradients = recurrent_layers(tensors, GRUCell(*(tensors[name] for name in CELL_NAMES)))
    assert relative(hs, values["hs"]) < 1e-12 and relative(loss, values["loss"]) < 1e-12
    gradients |= {f"d{name}": recurrent.grads[f"cell.{cell_name}"] for name, cell_name in CELL_NAMES.items()}
    for name, layer_grad in gradients.items():
        assert relative(mine[name], layer_grad) < 1e-12, name
