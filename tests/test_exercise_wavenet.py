"""The wavenet exercise beyond what every exercise keeps (test_exercises.py): handprop's layers on its numbers."""

from exercise_checks import relative, solved

from handprop.layers import BatchNorm1d, Embedding, FlattenConsecutive, Linear, Sequential, Tanh
from handprop.losses import CrossEntropy
from handprop.ninja.exercises.wavenet import EXERCISE


def test_the_solution_is_handprops_layers_on_the_same_numbers():
    t, constants, values, solution = solved(EXERCISE)
    eps = constants["eps"]
    model = Sequential([
        Embedding(t["C"]),
        FlattenConsecutive(2), Linear(t["W_1"]), BatchNorm1d(t["bngain_1"], t["bnbias_1"], eps=eps), Tanh(),
        FlattenConsecutive(2), Linear(t["W_2"]), BatchNorm1d(t["bngain_2"], t["bnbias_2"], eps=eps), Tanh(),
        FlattenConsecutive(2), Linear(t["W_3"]), BatchNorm1d(t["bngain_3"], t["bnbias_3"], eps=eps), Tanh(),
        Linear(t["W_out"], t["b_out"]),
    ])
    criterion = CrossEntropy()
    loss = criterion.forward(model.forward(t["Xb"]), t["Yb"])
    model.backward(criterion.backward())
    assert relative(values["loss"], loss) <= 1e-12
    layer_names = {
        "0.weight": "C", "2.weight": "W_1", "3.weight": "bngain_1", "3.bias": "bnbias_1",
        "6.weight": "W_2", "7.weight": "bngain_2", "7.bias": "bnbias_2",
        "10.weight": "W_3", "11.weight": "bngain_3", "11.bias": "bnbias_3", "13.weight": "W_out", "13.bias": "b_out",
    }
    assert set(layer_names) == set(model.grads) and set(layer_names.values()) == set(EXERCISE.parameters)
    for key, name in layer_names.items():
        assert relative(solution["d" + name], model.grads[key]) <= 1e-12, name
