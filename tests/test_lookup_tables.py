"""The lookup-table first layer (LookupLinear): the same model as the plain layers, faster, and proven like them."""

import json

import pytest
import torch
from cli_runner import run_main
from safetensors import safe_open

from handprop.checkpoint import write_checkpoint
from handprop.gradcheck import compare, layer_cases
from handprop.layers import BatchNorm1d, LookupLinear
from handprop.losses import CrossEntropy
from handprop.models import build_model
from handprop.settings import preset


def twin_models(name, **overrides):
    """The model with lookup tables and the same model from plain layers, one seed, float64."""
    def build(lookup):
        config = preset(name, **overrides, lookup_tables=lookup)
        return build_model(config, torch.Generator().manual_seed(3), dtype=torch.float64), config
    (fast, config), (plain, _) = build(True), build(False)
    return fast, plain, config


def plain_name(name, flattens):
    """The plain model's name for a lookup-table model's parameter: 0.embedding is 0.weight, 0.* the Linear's."""
    index, field = name.split(".", 1)
    if index == "0":
        return "0.weight" if field == "embedding" else f"{1 + flattens}.{field}"
    return f"{int(index) + 1 + flattens}.{field}"   # the lookup layer stands for 2 or 3 plain layers


@pytest.mark.parametrize("name, overrides", [("mlp-fast", {}), ("mlp", {}), ("mlp", {"n_layers": 3}),
                                             ("mlp", {"hidden_bias": False}), ("mlp", {"block_size": 1})],
                         ids=["mlp-fast", "mlp", "3 hidden layers", "no hidden bias", "block size 1"])
def test_the_lookup_model_is_the_plain_model_in_forward_and_every_gradient(name, overrides):
    fast, plain, config = twin_models(name, **overrides)
    g = torch.Generator().manual_seed(4)
    X = torch.randint(0, config.vocab_size, (200, config.block_size), generator=g)    # 200 rows: tokens repeat
    Y = torch.randint(0, config.vocab_size, (200,), generator=g)
    losses, grads = [], []
    for model in (fast, plain):
        criterion = CrossEntropy()
        losses.append(criterion.forward(model.forward(X), Y))
        model.backward(criterion.backward())
        grads.append(model.grads)
    flattens = 1                            # the plain mlp flattens the context before its first Linear
    assert abs(losses[0] - losses[1]) <= 1e-12 * abs(losses[1])
    assert {plain_name(k, flattens) for k in fast.parameters()} == set(plain.parameters())
    for k, p in fast.parameters().items():
        assert torch.equal(p, plain.parameters()[plain_name(k, flattens)]), k          # the same init
        expected = grads[1][plain_name(k, flattens)]
        index, field = plain_name(k, flattens).split(".")
        following = plain.layers[int(index) + 1 : int(index) + 2]            # the layer after it, if any
        if field == "bias" and any(isinstance(layer, BatchNorm1d) for layer in following):
            # a bias in front of BatchNorm: its true gradient is 0, and both round to ~1e-18
            assert grads[0][k].abs().max() <= 1e-15 and expected.abs().max() <= 1e-15
            continue
        assert (grads[0][k] - expected).abs().max() <= 1e-12 * expected.abs().max(), k


def test_the_check_catches_a_lookup_backward_that_drops_repeated_tokens(monkeypatch):
    label, layer, ix, dout = next(c for c in layer_cases(0) if c[0] == "LookupLinear")
    right_backward = LookupLinear.backward

    def last_write_wins(self, dout):        # the Embedding pitfall again: assignment instead of accumulation
        right_backward(self, dout)
        dtables = dout.new_zeros(self.ix.shape[1], self.embedding.shape[0], dout.shape[1])
        for t in range(self.ix.shape[1]):
            dtables[t][self.ix[:, t]] = dout
        self.grads["weight"] = torch.matmul(self.embedding.T, dtables).reshape(self.weight.shape)

    monkeypatch.setattr(LookupLinear, "backward", last_write_wins)
    rows = {r.tensor: r for r in compare(label, layer, ix, dout)}
    assert not rows["dweight"].ok and rows["dbias"].ok


def test_lookup_tables_on_a_model_without_an_mlp_first_layer_is_one_error_line(tmp_path, capsys):
    status, out, err = run_main(["train", "--model", "gru", "--lookup-tables", "-o", tmp_path / "run"], capsys)
    assert status == 2 and err.count("\n") == 1 and "lookup tables" in err and "gru" in err
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_written_before_lookup_tables_existed_loads_as_the_plain_model(tmp_path, capsys):
    work_dir = tmp_path / "run"
    assert run_main(["train", "--max-steps", "20", "-o", work_dir], capsys)[0] == 0
    path = work_dir / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = json.loads(f.metadata()["handprop"]), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    del meta["model_config"]["lookup_tables"]   # as the version before the setting wrote it
    write_checkpoint(path, tensors, meta)
    status, out, err = run_main(["eval", "-o", work_dir], capsys)
    assert status == 0 and "val loss" in out, err


def test_an_mlp_of_one_character_of_context_trains_and_samples(tmp_path, capsys):
    work_dir = tmp_path / "run"
    status, out, err = run_main(["train", "--block-size", "1", "--max-steps", "30", "-o", work_dir], capsys)
    assert status == 0 and "val loss" in out, err
    status, out, err = run_main(["sample", "-o", work_dir, "-n", "5", "--seed", "1"], capsys)
    assert status == 0 and len(out.splitlines()) == 5, err
