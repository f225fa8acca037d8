"""A model's losses on whole splits, and BatchNorm's statistics set from the whole training split."""

from .data import SPLIT_NAMES, form_named, make_splits
from .layers import BatchNorm1d, eval_mode
from .losses import IGNORED

EVAL_CHUNK = 4096           # positions per forward pass when evaluating: small enough to stay in cache


def split_loss(model, examples):
    """Mean cross-entropy over every scored position of a whole split (data.Examples), in chunks, in evaluation mode."""
    criterion = examples.form.criterion()
    total, count = 0.0, 0
    with eval_mode(model):
        for Xc, Yc in examples.chunks(EVAL_CHUNK):
            scored = int((Yc != IGNORED).sum())     # every window; the unpadded positions of sequences
            total += criterion.forward(model.forward(Xc), Yc).item() * scored
            count += scored
    return total / count


def make_run_splits(corpus, model_config, vocab=None, device="cpu"):
    """The splits in the form the model reads (sequences padded to the longest item + 1)."""
    positions = model_config.block_size or None     # 0: a sequence model made to fit the longest item
    return make_splits(corpus, positions, vocab=vocab, device=device, form=form_named(model_config.form))


def evaluate(model, splits):
    """{'train': loss, 'val': loss, 'test': loss} on the full splits."""
    return {name: split_loss(model, splits.tensors[name]) for name in SPLIT_NAMES}


def format_losses(losses):
    """'train loss 2.0713 | val loss 2.1096 | test loss 2.1127', always in that order."""
    return " | ".join(f"{name} loss {losses[name]:.4f}" for name in SPLIT_NAMES)


def recalibrate_batchnorm(model, examples):
    """Set every BatchNorm's running mean and (n-1) variance to exact statistics over the inputs of examples.

    As at the end of the lecture's exercise 4: the momentum estimates lag the weights, so
    after training each BatchNorm is re-estimated in order, the earlier ones already fixed.
    """
    with eval_mode(model):
        for k, layer in enumerate(model.layers):
            if not isinstance(layer, BatchNorm1d):
                continue
            n, total, total_sq = 0, 0.0, 0.0
            for h, _ in examples.chunks(EVAL_CHUNK):
                for earlier in model.layers[:k]:
                    h = earlier.forward(h)
                h = h.reshape(-1, h.shape[-1]).double()            # (N, C), float64 sums
                n, total, total_sq = n + h.shape[0], total + h.sum(0), total_sq + (h * h).sum(0)
            mean = total / n
            layer.running_mean.copy_(mean)
            layer.running_var.copy_((total_sq - n * mean * mean) / (n - 1))
