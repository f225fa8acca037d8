"""Cross-entropy on logits, with the fused backward of the lecture's exercise 2."""

import torch

IGNORED = -1                # the target of a padding position (data.py's sequences): it has no loss


class CrossEntropy:
    """Mean negative log-likelihood of the targets under softmax(logits)."""

    def forward(self, logits, targets):
        # logits (B, V), targets (B,) class indices
        log_probs = torch.log_softmax(logits, dim=1)            # (B, V), max-shifted inside: no overflow
        self.probs = log_probs.exp()                            # (B, V), kept for backward
        self.targets = targets
        return -log_probs.gather(1, targets[:, None]).mean()    # scalar

    def backward(self, dloss=1.0):
        # dlogits = (softmax(logits) - onehot(targets)) / B, times the upstream dloss
        B = self.targets.shape[0]
        minus_one = self.probs.new_full((B, 1), -1.0)
        dlogits = self.probs.scatter_add(1, self.targets[:, None], minus_one)  # probs - onehot
        return dlogits * (dloss / B)


class SequenceCrossEntropy:
    """Mean negative log-likelihood over the positions whose target is not IGNORED (padding).

    Logits (B, T, V) with targets (B, T), or any (..., V) with (...): F.cross_entropy(ignore_index=-1)
    on the flattened positions. Padded positions take no part in the mean and get zero gradient.
    """

    def forward(self, logits, targets):
        self.shape = logits.shape                                       # (B, T, V)
        flat_targets = targets.reshape(-1)                              # (N,)
        self.counted = flat_targets != IGNORED                     # (N,) bool
        self.count = self.counted.sum().to(logits.dtype)               # a tensor (no host sync on a GPU), in float
        self.targets = torch.where(self.counted, flat_targets, 0)      # (N,) any valid index where ignored
        log_probs = torch.log_softmax(logits.reshape(-1, self.shape[-1]), dim=1)   # (N, V)
        self.probs = log_probs.exp()                                    # (N, V), kept for backward
        nll = -log_probs.gather(1, self.targets[:, None])[:, 0]         # (N,)
        return torch.where(self.counted, nll, 0.0).sum() / self.count   # scalar

    def backward(self, dloss=1.0):
        # dlogits = (softmax(logits) - onehot(targets)) / count on counted rows, 0 on ignored rows, times dloss
        minus_one = self.probs.new_full((self.probs.shape[0], 1), -1.0)
        dlogits = self.probs.scatter_add(1, self.targets[:, None], minus_one)    # (N, V) probs - onehot
        row_scale = self.counted * (dloss / self.count)                 # (N,) 1/count, or 0 where ignored
        return (dlogits * row_scale[:, None]).reshape(self.shape)
