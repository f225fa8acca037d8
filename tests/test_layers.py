"""Every hand-written backward against its autograd twin and finite differences, in float64."""

import pytest
import torch
import torch.nn.functional as F

from handprop.gradcheck import AUTOGRAD_TOL, FD_TOL, check_layers, compare, layer_cases
from handprop.layers import BatchNorm1d, Embedding, Linear, Sequential


@pytest.mark.parametrize("seed", range(4))
def test_every_layer_and_the_loss_match_autograd_and_finite_differences(seed):
    rows = check_layers(seed)
    bad = [r for r in rows if not r.ok]
    assert not bad, bad
    for r in rows:
        assert r.autograd_maxdiff <= AUTOGRAD_TOL * r.scale and r.fd_relerr <= FD_TOL
    covered = {r.layer.split(" ")[0] for r in rows}
    assert covered == {"Embedding", "Linear", "LookupLinear", "BatchNorm1d", "Tanh", "FlattenConsecutive(2)",
                       "FlattenConsecutive(T)", "CrossEntropy", "Sequential", "LayerNorm", "GELU", "Dropout",
                       "Residual", "TokenPositionEmbedding", "CausalSelfAttention", "Recurrent(RNNCell)",
                       "Recurrent(GRUCell)"}


def test_the_check_catches_a_batchnorm_backward_written_for_the_other_variance(monkeypatch):
    # the fused formula for the biased variance, run against a Bessel-corrected forward
    label, layer, x, dout = next(c for c in layer_cases(0) if c[0] == "BatchNorm1d bessel (B, C)")
    right_backward = BatchNorm1d.backward

    def biased_formula_backward(self, dout):
        self.bessel = False                 # the forward divided by n-1; this backward assumes n
        return right_backward(self, dout)

    monkeypatch.setattr(BatchNorm1d, "backward", biased_formula_backward)
    rows = {r.tensor: r for r in compare(label, layer, x, dout)}
    assert not rows["dx"].ok and rows["dweight"].ok and rows["dbias"].ok


def test_the_check_catches_an_embedding_gradient_that_drops_repeated_indices(monkeypatch):
    label, layer, ix, dout = next(c for c in layer_cases(0) if c[0] == "Embedding")

    def plain_assignment_backward(self, dout):
        dweight = torch.zeros_like(self.weight)
        dweight[self.ix.reshape(-1)] += dout.reshape(-1, self.weight.shape[1])  # the pitfall
        self.grads = {"weight": dweight}

    monkeypatch.setattr(Embedding, "backward", plain_assignment_backward)
    assert not any(r.ok for r in compare(label, layer, ix, dout))


def test_batchnorm_running_statistics_follow_pytorch_momentum_semantics():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64) * 3 + 1
    for bessel in (True, False):
        ones, zeros = torch.ones(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
        bn = BatchNorm1d(ones, zeros, momentum=0.1, bessel=bessel)
        rm, rv = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
        for _ in range(3):
            bn.forward(x)
            F.batch_norm(x, rm, rv, training=True, momentum=0.1)   # PyTorch updates rm, rv in place
        assert torch.allclose(bn.running_mean, rm, rtol=0, atol=1e-14)
        assert torch.allclose(bn.running_var, rv, rtol=0, atol=1e-14)


def test_eval_mode_leaves_running_statistics_alone():
    bn = BatchNorm1d(torch.ones(4), torch.zeros(4)).train(False)
    bn.forward(torch.randn(8, 4) * 5 + 3)
    assert torch.equal(bn.running_mean, torch.zeros(4)) and torch.equal(bn.running_var, torch.ones(4))


def test_a_bias_in_front_of_batchnorm_gets_no_gradient():
    # why the lecture calls b1 useless: BatchNorm subtracts any constant shift right back out
    g = torch.Generator().manual_seed(1)
    f64 = torch.float64
    linear = Linear(torch.randn(6, 5, generator=g, dtype=f64), torch.randn(5, generator=g, dtype=f64))
    model = Sequential([linear, BatchNorm1d(torch.ones(5, dtype=f64) * 1.3, torch.zeros(5, dtype=f64))])
    model.forward(torch.randn(10, 6, generator=g, dtype=torch.float64))
    model.backward(torch.randn(10, 5, generator=g, dtype=torch.float64))
    assert model.grads["0.bias"].abs().max() <= 1e-12 * model.grads["0.weight"].abs().max()
