"""Properties of the data layer that must hold for any corpus (hypothesis)."""

import random
from collections import Counter
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handprop import data
from handprop.data import (
    SEQUENCES,
    Corpus,
    Vocab,
    build_examples,
    encode_splits,
    make_splits,
    split_items,
    split_lists,
    split_order,
)
from handprop.errors import UserError

# items are non-blank single lines of any characters (what load_corpus can hand on)
item = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r\x00"),
               min_size=1, max_size=12).filter(str.strip)
items = st.lists(item, min_size=10, max_size=60)
long_item = st.builds(lambda text, n: (text * 1000)[:n], item, st.integers(900, 1000))    # a line near the limit


@given(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1))
def test_any_text_round_trips_through_encode_and_decode(text):
    vocab = Vocab.from_items([text])
    encoded = vocab.encode(text)
    assert vocab.decode(encoded) == text
    assert all(1 <= i < vocab.size for i in encoded)         # 0 stays the boundary


@given(items, st.integers(0, 2**32))
def test_splits_are_disjoint_and_cover_the_data(corpus_items, seed):
    train, val, test = split_items(corpus_items, seed)
    assert Counter(train) + Counter(val) + Counter(test) == Counter(corpus_items)   # duplicates kept, none lost
    assert len(train) == int(0.8 * len(corpus_items)) and len(train) + len(val) == int(0.9 * len(corpus_items))
    assert train and val and test


@given(items, st.integers(0, 2**32))
def test_the_split_order_is_the_permutation_random_shuffle_applies(corpus_items, seed):
    shuffled = list(corpus_items)
    random.Random(seed).shuffle(shuffled)
    parts = split_order(len(corpus_items), seed)
    assert [item for part in split_lists(corpus_items, parts) for item in part] == shuffled
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(corpus_items)))   # each item once


@settings(max_examples=50)
@given(st.lists(item | long_item, min_size=10, max_size=60), st.integers(0, 2**32), st.integers(1, 70))
def test_each_stream_is_its_splits_items_between_boundaries(corpus_items, seed, block):
    vocab = Vocab.from_items(corpus_items)
    with mock.patch.object(data, "ENCODE_ITEMS", block):    # items encoded at a time: blocks end anywhere
        streams = encode_splits(corpus_items, split_order(len(corpus_items), seed), vocab)
    for split_items_, (stream, bounds) in zip(split_items(corpus_items, seed), streams, strict=True):
        tokens = [[0] + vocab.encode(text) for text in split_items_] + [[0]]
        assert stream.tolist() == [t for item_tokens in tokens for t in item_tokens]
        assert bounds.tolist() == [sum(map(len, tokens[:k])) for k in range(len(tokens))]


@settings(max_examples=50)
@given(items, st.integers(1, 9))
def test_context_windows_never_cross_item_boundaries(corpus_items, block_size):
    splits = make_splits(Corpus(corpus_items, 0, "", ""), block_size)
    vocab = splits.vocab
    split_lists = (splits.train_items, splits.val_items, splits.test_items)
    for split_items_, (X, Y) in zip(split_lists, splits.tensors.values(), strict=True):
        row = 0
        for text in split_items_:
            padded = [0] * block_size + vocab.encode(text) + [0]   # the item alone, between boundaries
            for j in range(len(text) + 1):
                assert X[row].tolist() == padded[j : j + block_size]
                assert Y[row].item() == padded[j + block_size]
                row += 1
        assert row == X.shape[0] == Y.shape[0]


@settings(max_examples=50)
@given(items, st.integers(0, 4))
def test_sequences_are_each_item_between_boundaries_shifted_by_one(corpus_items, extra):
    longest = max(len(text) for text in corpus_items)
    block_size = None if extra == 0 else longest + extra        # any model, or one with room to spare
    splits = make_splits(Corpus(corpus_items, 0, "", ""), block_size, form=SEQUENCES)
    vocab, T = splits.vocab, longest + 1                        # rows hold the longest item and its end token
    split_lists = (splits.train_items, splits.val_items, splits.test_items)
    for split_items_, (X, Y) in zip(split_lists, splits.tensors.values(), strict=True):
        assert X.shape == Y.shape == (len(split_items_), T)     # one width for every split
        windows = build_examples(split_items_, vocab, 1)[1]
        assert int((Y != -1).sum()) == windows.shape[0]         # the positions the windows score, no more, no less
        for row, text in enumerate(split_items_):
            n, x, y = len(text), X[row].tolist(), Y[row].tolist()
            assert y[: n + 1] == vocab.encode(text) + [0]       # its characters, then the end token
            assert x[: n + 1] == [0] + y[:n]                    # the targets are the inputs shifted by one
            assert x[n + 1 :] == [0] * (T - n - 1) and y[n + 1 :] == [-1] * (T - n - 1)   # padding: 0 in, ignored out


@settings(max_examples=25)
@given(items, st.integers(1, 15))
def test_sequences_refuse_any_block_size_too_short_for_the_longest_item(corpus_items, shortfall):
    longest = max(len(text) for text in corpus_items)
    too_short = longest + 1 - shortfall
    with pytest.raises(UserError, match=f"has {longest} characters.*at least {longest + 1}.*got {too_short}$"):
        make_splits(Corpus(corpus_items, 0, "", ""), too_short, form=SEQUENCES)
