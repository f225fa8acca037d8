"""Helpers the tests share: the lectures' batch draw on whole tensors, and sampling to a list of strings."""

import torch

from handprop.sample import as_list, decode_lines, sample_sequences, sample_windows


def sample_batch(X, Y, batch_size, generator):
    """A minibatch of rows drawn uniformly with replacement, as in the lectures (windows or sequences)."""
    ix = torch.randint(0, X.shape[0], (batch_size,), generator=generator).to(X.device)
    return X[ix], Y[ix]                     # windows (B, block_size), (B,); sequences (B, T), (B, T)


def generate(model, vocab, block_size, num, generator, max_length, prefix=""):
    """num strings from a window model, each prefix + sampled characters until the boundary token."""
    sampled = sample_windows(model, vocab, block_size, num, generator, max_length, prefix)
    return as_list(decode_lines(vocab, prefix, sampled))


def generate_sequences(model, vocab, num, generator, max_length, prefix="", cached=True):
    """generate() for sequence models; cached=False recomputes the whole prefix for each character (to compare)."""
    sampled = sample_sequences(model, vocab, num, generator, max_length, prefix, cached)
    return as_list(decode_lines(vocab, prefix, sampled))
