"""Properties of the data layer that must hold for any corpus (hypothesis)."""

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from handprop.data import Corpus, Vocab, build_examples, make_splits, split_items

# items are non-blank single lines of any characters (what load_corpus can hand on)
item = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r\x00"), min_size=1, max_size=12).filter(str.strip)
items = st.lists(item, min_size=10, max_size=60)


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


@settings(max_examples=50)
@given(items, st.integers(1, 9))
def test_context_windows_never_cross_item_boundaries(corpus_items, block_size):
    splits = make_splits(Corpus(corpus_items, 0, "", ""), block_size)
    vocab = splits.vocab
    for split_items_, (X, Y) in zip((splits.train_items, splits.val_items, splits.test_items), splits.tensors.values()):
        row = 0
        for text in split_items_:
            padded = [0] * block_size + vocab.encode(text) + [0]   # the item alone, between boundaries
            for j in range(len(text) + 1):
                assert X[row].tolist() == padded[j : j + block_size]
                assert Y[row].item() == padded[j + block_size]
                row += 1
        assert row == X.shape[0] == Y.shape[0]
