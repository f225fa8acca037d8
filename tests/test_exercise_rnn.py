"""The `rnn` exercise beyond what every exercise keeps (test_exercises.py): its padding, and its solution equal to
handprop's Recurrent(RNNCell) layer."""

from exercise_checks import recurrent_layers, relative, solved

from handprop.layers import RNNCell
from handprop.ninja.exercises.rnn import EXERCISE


def test_the_batch_has_padding():
    """What the cross-entropy's pitfall needs to show: ignored targets, so the mean's count is not B * T."""
    tensors, _, _, _ = solved(EXERCISE)
    assert 0 < (tensors["Yb"] == -1).sum() < tensors["Yb"].numel()


def test_solution_equals_the_recurrent_layer():
    """The same numbers through Embedding, Recurrent(RNNCell), Linear and SequenceCrossEntropy, forward and back."""
    tensors, _, values, mine = solved(EXERCISE)
    hs, loss, recurrent, gradients = recurrent_layers(tensors, RNNCell(tensors["Wxh"], tensors["bh"]))
    assert relative(hs, values["hs"]) < 1e-12 and relative(loss, values["loss"]) < 1e-12
    gradients |= {"dWxh": recurrent.grads["cell.weight"], "dbh": recurrent.grads["cell.bias"]}
    for name, layer_grad in gradients.items():
        assert relative(mine[name], layer_grad) < 1e-12, name
