"""The corpus, the vocabulary and the lectures' split, asserted exactly."""

import hashlib
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import sample_batch

from handprop import data
from handprop.data import (
    MIN_ITEMS,
    SEQUENCES,
    WINDOWS,
    Corpus,
    Vocab,
    build_examples,
    build_sequences,
    bundled_corpus_path,
    encode_splits,
    form_named,
    index_dtype,
    load_corpus,
    make_splits,
    split_items,
    split_order,
)
from handprop.errors import UserError


def test_bundled_corpus_is_the_reference_names_txt():
    raw = bundled_corpus_path().read_bytes()
    assert len(raw) == 228145
    assert hashlib.sha256(raw).hexdigest() == "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"
    corpus = load_corpus()
    assert len(corpus.items) == 32033 and corpus.blank_lines == 0
    assert max(len(w) for w in corpus.items) == 15


def test_vocabulary_is_boundary_then_sorted_letters():
    vocab = Vocab.from_items(load_corpus().items)
    assert vocab.size == 27 and vocab.itos(0) == "." and vocab.itos(1) == "a" and vocab.itos(26) == "z"
    assert vocab.encode("emma") == [5, 13, 13, 1] and vocab.decode([5, 13, 13, 1]) == "emma"


def test_the_lecture_split_exactly():
    train, val, test = split_items(load_corpus().items)
    assert (len(train), len(val), len(test)) == (25626, 3203, 3204)
    assert train[:5] == ["yuheng", "diondre", "xavien", "jori", "juanluis"]
    splits = make_splits(load_corpus(), block_size=3)
    assert [X.shape[0] for X, _ in splits.tensors.values()] == [182625, 22655, 22866]
    assert [Y.shape[0] for _, Y in splits.tensors.values()] == [182625, 22655, 22866]


@pytest.mark.parametrize("block_size", [1, 2, 5, 8, 20])
def test_examples_for_any_block_size(block_size):
    vocab = Vocab.from_items(["ab", "c"])
    X, Y = build_examples(["ab", "c"], vocab, block_size)
    assert X.shape == (5, block_size) and Y.tolist() == [1, 2, 0, 3, 0]
    assert X[0].tolist() == [0] * block_size                    # every item starts from the boundary
    assert X[1, -1].item() == 1 and X[3].tolist() == [0] * block_size  # ...and never sees the previous item
    assert X.dtype == torch.long


def test_crlf_bom_and_blank_lines(tmp_path):
    path = tmp_path / "names.txt"
    path.write_bytes("\ufeffanna\r\n\r\n  \r\nbob\r\nzoë\r\n".encode())
    corpus = load_corpus(path)
    assert corpus.items == ["anna", "bob", "zoë"] and corpus.blank_lines == 2
    assert Vocab.from_items(corpus.items).chars == ("a", "b", "n", "o", "z", "ë")


def test_items_lose_their_surrounding_whitespace_but_the_file_keeps_its_hash(tmp_path):
    raw = " carl\nanna  \n\t bob\t\r\n\u00a0zoë\u00a0\nmary ann\n   \n".encode()
    path = tmp_path / "names.txt"
    path.write_bytes(raw)
    corpus = load_corpus(path)
    assert corpus.items == ["carl", "anna", "bob", "zoë", "mary ann"] and corpus.blank_lines == 1
    assert corpus.sha256 == hashlib.sha256(raw).hexdigest()
    assert Vocab.from_items(corpus.items).chars == (" ", "a", "b", "c", "l", "m", "n", "o", "r", "y", "z", "ë")


def test_a_line_is_measured_without_its_surrounding_whitespace(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("ann\n" + " " * 50 + "x" * 1000 + "\n")
    assert load_corpus(path).items[1] == "x" * 1000
    path.write_text("ann\n" + "x" * 1001 + "\n")
    with pytest.raises(UserError, match="line 2 has 1001 characters"):
        load_corpus(path)


@pytest.mark.parametrize("blank_lines, text", [(0, "12 items"), (1, "12 items (1 blank line skipped)"),
                                               (3, "12 items (3 blank lines skipped)")])
def test_describe_says_how_many_blank_lines_were_skipped(tmp_path, blank_lines, text):
    path = tmp_path / "names.txt"
    path.write_text("\n".join(["a", "bb"] * 6 + [" "] * blank_lines) + "\n")
    corpus = load_corpus(path)
    assert corpus.blank_lines == blank_lines and corpus.describe() == text


def test_min_items_is_the_fewest_the_split_accepts():
    for n in range(1, MIN_ITEMS):
        with pytest.raises(UserError, match=rf"{n} items are too few .* \(need at least {MIN_ITEMS}\)"):
            split_items([str(i) for i in range(n)])
    for n in range(MIN_ITEMS, 300):      # from 10 on, 10% of n is at least 1
        assert all(split_items([str(i) for i in range(n)])), n
    assert MIN_ITEMS == 6                   # what the README and the error promise


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"\n \n\t\n", "empty"),
    (b"ann\xff\xfebob\n", "not valid UTF-8 (byte 3, line 1)"),
    (b"ann\x00bob\n", "NUL"),
])
def test_bad_files_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "input.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_corpus(path)


def test_missing_file_and_unknown_characters(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_corpus(tmp_path / "nope.txt")
    with pytest.raises(UserError, match="'!'"):
        Vocab(("a", "b")).encode("ab!")


def test_sequences_score_exactly_the_positions_the_windows_score():
    windows, sequences = make_splits(load_corpus(), block_size=3), make_splits(load_corpus(), None, form=SEQUENCES)
    assert sequences.signature() == windows.signature() and sequences.train_items == windows.train_items
    assert [X.shape for X, _ in sequences.tensors.values()] == [(25626, 16), (3203, 16), (3204, 16)]  # longest 15 + 1
    assert [int((Y != -1).sum()) for _, Y in sequences.tensors.values()] == [182625, 22655, 22866]
    assert sequences.form is SEQUENCES and windows.form is WINDOWS


def test_a_sequence_is_the_item_between_boundaries_then_padding():
    vocab = Vocab.from_items(["ab", "c"])
    X, Y = build_sequences(["ab", "c"], vocab, 4)
    assert X.tolist() == [[0, 1, 2, 0], [0, 3, 0, 0]] and Y.tolist() == [[1, 2, 0, -1], [3, 0, -1, -1]]
    assert X.dtype == Y.dtype == torch.long


def test_windows_and_sequences_define_the_same_mean_loss():
    # a bigram model (logits from the last character alone) sees the same (context, target) pairs in both forms
    corpus = load_corpus()
    windows, sequences = make_splits(corpus, block_size=1), make_splits(corpus, None, form=SEQUENCES)
    table = torch.randn(27, 27, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for (Xw, Yw), (Xs, Ys) in zip(windows.tensors.values(), sequences.tensors.values(), strict=True):
        by_windows = F.cross_entropy(table[Xw[:, -1]], Yw)
        by_sequences = F.cross_entropy(table[Xs].reshape(-1, 27), Ys.reshape(-1), ignore_index=-1)
        assert abs(by_windows.item() - by_sequences.item()) <= 1e-12


def test_sequences_refuse_a_block_size_shorter_than_the_longest_item():
    with pytest.raises(UserError, match="longest item has 15 characters.*at least 16.*got 12"):
        make_splits(load_corpus(), 12, form=SEQUENCES)
    X, Y = make_splits(load_corpus(), 20, form=SEQUENCES).tensors["val"]   # a model with room to spare
    assert X.shape == Y.shape == (3203, 16)         # rows hold the longest item + 1, not the model's positions
    assert form_named("sequences") is SEQUENCES and form_named("windows") is WINDOWS
    with pytest.raises(UserError, match=r"unknown data form 'tokens' \(choose windows or sequences\)"):
        form_named("tokens")


@pytest.mark.parametrize("form, block_size", [(WINDOWS, 3), (SEQUENCES, None)])
def test_sample_batch_draws_paired_rows_as_the_lectures_do(form, block_size):
    splits = make_splits(Corpus(["anna", "bob", "eve", "zoe", "ada", "ian", "kim", "lea", "max", "ned"], 0, "", ""),
                         block_size, form=form)
    X, Y = splits.tensors["train"]
    Xb, Yb = sample_batch(X, Y, 64, torch.Generator().manual_seed(1))
    ix = torch.randint(0, X.shape[0], (64,), generator=torch.Generator().manual_seed(1))   # the lectures' draw
    assert torch.equal(Xb, X[ix]) and torch.equal(Yb, Y[ix])      # each input row with its own targets
    assert Xb.shape[0] == Yb.shape[0] == 64 and Xb.shape[1:] == X.shape[1:] and Yb.shape[1:] == Y.shape[1:]


ITEMS = ["anna", "zoë", "b", "日本", "carl", "ë", "emma", "bob"]     # characters beyond one byte of UTF-8 too


@pytest.mark.parametrize("block_size", [1, 2, 3, 8, 20])
def test_the_token_stream_gives_exactly_the_listed_windows_and_sequences(block_size):
    vocab = Vocab.from_items(ITEMS)
    splits = make_splits(Corpus(ITEMS, 0, "", ""), block_size, seed=7)
    for items, examples in zip((splits.train_items, splits.val_items, splits.test_items), splits.tensors.values(),
                               strict=True):
        X, Y = build_examples(items, vocab, block_size)
        assert len(examples) == X.shape[0] == examples.scored()
        assert all(torch.equal(a, b) for a, b in zip(examples, (X, Y), strict=True))
        ix = torch.randint(0, len(examples), (50,), generator=torch.Generator().manual_seed(1))
        assert all(torch.equal(a, b) for a, b in zip(examples.batch(ix), (X[ix], Y[ix]), strict=True))
    sequences = make_splits(Corpus(ITEMS, 0, "", ""), None, seed=7, form=SEQUENCES)
    for items, examples in zip((sequences.train_items, sequences.val_items, sequences.test_items),
                               sequences.tensors.values(), strict=True):
        X, Y = build_sequences(items, vocab, 5)                 # the longest item, zoë or carl, + 1
        assert all(torch.equal(a, b) for a, b in zip(examples, (X, Y), strict=True))
        assert examples.scored() == int((Y != -1).sum())


def test_the_stream_is_a_byte_a_character_whatever_the_block_size():
    sizes = {}
    for block_size in (3, 8, 64):
        train = make_splits(load_corpus(), block_size).tensors["train"]
        sizes[block_size] = (train.stream.numel() * train.stream.element_size()
                             + train.bounds.numel() * train.bounds.element_size())
        assert train.stream.dtype == torch.uint8 and train.bounds.dtype == torch.int32
    assert sizes[3] == sizes[8] == sizes[64] == (182625 + 1) + (25626 + 1) * 4


def test_positions_are_four_bytes_while_they_fit():
    assert index_dtype(2**31 - 1) == np.int32 and index_dtype(2**31) == np.int64


def reference_stream(items, vocab):
    """The token stream of items in their order, built one token at a time: [0, c1..cn, 0, ...], and its boundaries."""
    stream, bounds = [0], [0]
    for item in items:
        stream += vocab.encode(item) + [0]
        bounds.append(len(stream) - 1)
    return stream, bounds


def random_corpus(n, seed):
    """n items of latin, latin-1, CJK and astral characters; every 97th is 1000 characters long, the most allowed."""
    rng = random.Random(seed)
    alphabet = "abcdefgh xyzéëßø日本語\U0001f600\U00020000"
    return [rng.choice("ab") + "".join(rng.choices(alphabet, k=999 if i % 97 == 0 else rng.choice([0, 1, 4, 12])))
            for i in range(n)]


@pytest.mark.parametrize("corpus_items, block", [
    (load_corpus().items, data.ENCODE_ITEMS),
    (load_corpus().items, 1000),
    (random_corpus(300, 0), 1),
    (random_corpus(300, 0), 7),
    (random_corpus(70000, 1), data.ENCODE_ITEMS),           # more items than a block
    ([chr(0x100 + i) for i in range(400)] * 3, 64),         # 401 tokens: two bytes each
    (["", "ab", "", "", "c", "d", ""] * 5, 3),              # empty items (a Corpus has none) start where the next does
], ids=["names", "names-blocks", "unicode-blocks-of-1", "unicode-blocks-of-7", "unicode-70000", "wide-vocabulary",
        "empty-items"])
def test_the_streams_are_each_splits_shuffled_items_token_by_token(monkeypatch, corpus_items, block):
    monkeypatch.setattr(data, "ENCODE_ITEMS", block)        # items encoded at a time: blocks end inside every split
    vocab = Vocab.from_items(corpus_items)
    streams = encode_splits(corpus_items, split_order(len(corpus_items)), vocab)
    for items, (stream, bounds) in zip(split_items(corpus_items), streams, strict=True):
        assert (stream.tolist(), bounds.tolist()) == reference_stream(items, vocab)
        assert stream.dtype == (torch.uint8 if vocab.size <= 256 else torch.int16) and bounds.dtype == torch.int32


@pytest.mark.parametrize("block", [data.UNKNOWN_ITEMS, 3])
def test_unknown_characters_are_named_as_the_first_block_in_split_order_that_has_one_names_them(monkeypatch, block):
    monkeypatch.setattr(data, "UNKNOWN_ITEMS", block)
    items = ["anna", "zoë", "bob", "日本", "carl", "ë", "emma", "eve", "ian", "kim"]
    for vocab in (Vocab.from_items(["anna", "bob", "carl", "emma", "eve", "ian", "kim"]),     # latin-1 only
                  Vocab.from_items(["anna", "bob", "carl", "emma", "eve", "ian", "kim", "本", "ë"]),
                  Vocab.from_items(["anna", "bob", "carl", "emma", "eve", "ian"])):         # no k: the first block
        blocks = [part[first : first + block] for part in split_items(items, 8) for first in range(0, len(part), block)]
        unknown = [sorted({c for c in "".join(items) if c not in vocab.stoi}) for items in blocks]
        assert len({tuple(chars) for chars in unknown if chars}) > 1     # the blocks would name different ones
        first = next(chars for chars in unknown if chars)
        with pytest.raises(UserError) as error:
            make_splits(Corpus(items, 0, "", ""), 3, seed=8, vocab=vocab)
        assert str(error.value) == (f"characters not in the vocabulary: {''.join(first)!r} "
                                    f"(known: {''.join(vocab.chars)!r})")


def test_a_seeded_batch_draws_the_rows_sample_batch_draws():
    train = make_splits(load_corpus(), 8).tensors["train"]
    X, Y = train
    for seed in (0, 1):
        drawn = train.sample(64, torch.Generator().manual_seed(seed))
        assert all(torch.equal(a, b) for a, b in zip(drawn, sample_batch(X, Y, 64, torch.Generator().manual_seed(seed)),
                                                     strict=True))


def test_encoding_with_a_vocabulary_that_lacks_a_character_names_it():
    with pytest.raises(UserError, match="'日'"):
        make_splits(Corpus(ITEMS, 0, "", ""), 3, vocab=Vocab.from_items([i for i in ITEMS if i != "日本"] + ["本"]))


def test_a_batch_of_sequences_is_padded_to_its_own_longest_item():
    train = make_splits(load_corpus(), None, form=SEQUENCES).tensors["train"]
    X, Y = train                                            # every row, padded to the split's width
    widths = []
    for seed in range(5):
        ix = train.draw(8, torch.Generator().manual_seed(seed))
        Xb, Yb = train.batch(ix)
        width = int((Y[ix] != -1).sum(1).max())             # the longest item's characters + its end token
        widths.append(width)
        assert Xb.shape == Yb.shape == (8, width)
        assert torch.equal(Xb, X[ix][:, :width]) and torch.equal(Yb, Y[ix][:, :width])    # the same rows, cut
        assert (Y[ix][:, width:] == -1).all()               # what is cut off is padding only
        assert all(torch.equal(a, b) for a, b in zip(train.batch(ix, padded_to=X.shape[1]), (X[ix], Y[ix]),
                                                      strict=True))
    assert max(widths) < X.shape[1]                         # 8 names rarely hold the longest of 32033
