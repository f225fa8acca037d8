"""Packed batches (packing.py): a transformer that computes only the real positions gets the padded batch's loss and
every one of its gradients, in float64; the compiled step's fixed rows and its eager fallback too."""

import pytest
import torch

from handprop.compiled import CompiledStep
from handprop.data import SEQUENCES, Corpus, make_splits
from handprop.losses import IGNORED
from handprop.models import build_model
from handprop.optim import make_optimizer
from handprop.packing import capacity, fixed_positions, pack, real_positions
from handprop.settings import preset
from handprop.step import EagerStep, forward_backward

NAMES = ["ava", "emma", "mia", "zoe", "liam", "noah", "ella", "leo", "ivy", "max", "eva", "kai", "amy", "ben",
         "alexandra", "maximilian", "jo", "christopher"]


@pytest.fixture(scope="module")
def examples():
    return make_splits(Corpus(NAMES * 10, 0, "0" * 64, "<test names>"), None, form=SEQUENCES).tensors["train"]


def transformer(examples, seed=0, dropout=0.2):
    """A two-block transformer in float64 with every parameter moved off its init, and its dropout generator."""
    g = torch.Generator().manual_seed(seed)
    config = preset("transformer", vocab_size=27, block_size=examples.width, n_layers=2, n_embd=16, n_head=2,
                    dropout=dropout)
    model = build_model(config, g, dtype=torch.float64)
    for p in model.parameters().values():
        p += 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype)
    return model, g


def loss_and_grads(examples, batch, index=None, seed=0):
    """forward_backward on the batch, padded (index None) or packed at index, with random upstream dloss."""
    model, g = transformer(examples, seed)
    X, Y = batch
    if index is not None:
        X, Y = pack(X, Y, index)
    loss = forward_backward(model, examples.form.criterion(), X, Y, share=0.7)
    return loss, model.grads


def test_a_packed_batch_has_the_padded_batchs_loss_and_gradients(examples):
    rows = torch.randint(0, len(examples), (24,), generator=torch.Generator().manual_seed(3))
    batch = examples.batch(rows)
    loss, grads = loss_and_grads(examples, batch)
    assert (batch[1] == IGNORED).float().mean() > 0.3        # the batch really is mostly padding
    for index in (real_positions(batch[1]), fixed_positions(batch[1], batch[1].numel() - 5)):
        packed_loss, packed_grads = loss_and_grads(examples, batch, index)
        assert torch.allclose(packed_loss, loss, rtol=1e-12, atol=0)
        assert packed_grads.keys() == grads.keys()
        for name, g in grads.items():
            assert torch.allclose(packed_grads[name], g, rtol=1e-10, atol=1e-14), name
            assert g.abs().max() > 0, name                  # every gradient is exercised


def test_dropout_gives_packed_rows_their_cells_of_the_padded_mask(examples):
    rows = torch.arange(6)
    X, Y = examples.batch(rows)
    model, _ = transformer(examples, dropout=0.5)
    padded = model.forward(X)                               # (B, T, V)
    model, _ = transformer(examples, dropout=0.5)           # the same generator state again
    index = real_positions(Y)
    packed = model.forward(pack(X, Y, index)[0])            # (N, V)
    assert packed.shape == (index.shape[0], padded.shape[-1])
    assert torch.allclose(packed, padded.reshape(-1, padded.shape[-1])[index], rtol=1e-12, atol=1e-14)


def test_fixed_positions_fill_with_padding_or_refuse_a_batch_too_long():
    Y = torch.tensor([[1, 2, 0, IGNORED], [3, 0, IGNORED, IGNORED]])     # 5 real positions of 8
    index = fixed_positions(Y, 7)
    assert index.tolist() == sorted(set(index.tolist())) and len(index) == 7
    assert set(real_positions(Y).tolist()) <= set(index.tolist())
    assert (Y.reshape(-1)[index] == IGNORED).sum() == 2                  # the fillers are padding
    assert fixed_positions(Y, 5).tolist() == real_positions(Y).tolist()
    assert fixed_positions(Y, 4) is None


def test_capacity_holds_a_typical_batch_and_never_exceeds_the_grid(examples):
    lengths = (examples.bounds[1:] - examples.bounds[:-1]).double()
    for batch_size in (1, 8, 32, 1000):
        rows = capacity(examples, batch_size)
        assert batch_size * lengths.mean() < rows <= batch_size * examples.width
        assert rows % 8 == 0 or rows == batch_size * examples.width


def test_the_compiled_step_takes_the_eager_step_for_a_batch_longer_than_its_rows(examples, monkeypatch):
    monkeypatch.setattr("handprop.compiled.capacity", lambda examples, batch_size: 24)    # few rows: some batches
    settings = {"lr": 0.01, "grad_clip": 1.0}                                            # overflow
    runs = []
    for make in ("eager", "compiled"):
        model, _ = transformer(examples, dropout=0.3)
        model.use_generator(torch.Generator().manual_seed(5))     # the dropout masks' generator
        optimizer = make_optimizer("adamw", model.parameters(), 0.1)
        criterion = examples.form.criterion()
        step = (EagerStep(model, optimizer, criterion, examples, settings["grad_clip"]) if make == "eager" else
                CompiledStep(model, optimizer, criterion, examples, 4, settings["grad_clip"]))
        g = torch.Generator().manual_seed(2)
        losses = [step(examples.draw(4, g), settings["lr"])[0] for _ in range(6)]
        runs.append((losses, model.parameters()))
    (eager_losses, eager_params), (losses, params) = runs
    g = torch.Generator().manual_seed(2)
    counts = [int((examples.batch(examples.draw(4, g))[1] != IGNORED).sum()) for _ in range(6)]
    assert min(counts) <= 24 < max(counts)                  # both kinds of batch were taken
    assert losses == pytest.approx(eager_losses, rel=1e-10)
    for name, p in params.items():
        assert torch.allclose(p, eager_params[name], rtol=1e-9, atol=1e-12), name
