"""Corpus loading and validation, the vocabulary, the lectures' seeded split, windows and sequences, batches.

Each split is held as one stream of token ids (Examples): every item as [boundary, c1..cn], then a
last boundary, one byte a character when the vocabulary fits. Windows and sequences are gathered
from it per batch, so memory does not grow with the block size; build_examples and build_sequences
are the plain list-building reference the streams are tested against.
"""

import hashlib
import os
import random
import stat
import sys
from dataclasses import dataclass
from functools import cached_property, partial
from importlib import resources
from itertools import chain
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

BOUNDARY = "."              # how the start/end token (index 0) is shown
MAX_ITEM_LENGTH = 1000      # characters; a longer line is almost surely not one item per line
MIN_ITEMS = 6               # the fewest items whose 80/10/10 split leaves no split empty: 4 / 1 / 1
STDIN = "-"                 # the input file name that means standard input
STDIN_NAME = "<stdin>"      # how standard input is named in messages and in a checkpoint
SPLIT_SEED = 42             # the lectures' random.seed(42) before shuffling the words
SPLIT_NAMES = ("train", "val", "test")
IGNORED = -1                # target of a padding position in the sequence form: it has no loss
FORMS = ("windows", "sequences")    # block_size characters of context -> the next one; whole items, padded
ENCODE_ITEMS = 1 << 14      # items encoded at a time: their text, ids and targets stay in the caches
UNKNOWN_ITEMS = 1 << 16     # items, in split order, whose unknown characters one error names


def bundled_corpus_path():
    """The names.txt shipped inside the package (32033 names)."""
    return Path(resources.files("handprop") / "data" / "names.txt")


@dataclass(frozen=True)
class CorpusInfo:
    """What a checkpoint remembers of its corpus, to find it again and to recognise it."""

    path: str               # absolute path of the file (<stdin> for standard input)
    sha256: str             # of the file's bytes
    items: int              # non-blank lines
    rereadable: bool = True  # False for standard input or a pipe: eval and --resume need it again with -i


@dataclass(frozen=True)
class Corpus:
    items: list             # one string per non-blank line, in file order, without its surrounding whitespace
    blank_lines: int        # lines skipped because they were empty or only whitespace
    sha256: str             # of the file's bytes, so a checkpoint knows its data
    path: str               # absolute, so a checkpoint finds it again from any working directory (or <stdin>)
    rereadable: bool = True  # a regular file; standard input and pipes are gone once read

    def info(self):
        return CorpusInfo(self.path, self.sha256, len(self.items), self.rereadable)

    def describe(self):
        """The item count and the blank lines skipped, e.g. '32033 items (2 blank lines skipped)'."""
        if not self.blank_lines:
            return f"{len(self.items)} items"
        return f"{len(self.items)} items ({self.blank_lines} blank line{'s' * (self.blank_lines != 1)} skipped)"


def read_input(path):
    """The bytes of path (STDIN: standard input), its name, and whether it could be read a second time."""
    if str(path) == STDIN:
        if sys.stdin is None:
            raise UserError("-i - reads standard input, but it is closed")
        return sys.stdin.buffer.read(), STDIN_NAME, False
    path = Path(path)
    try:
        with open(path, "rb") as f:
            regular = stat.S_ISREG(os.fstat(f.fileno()).st_mode)   # a FIFO or /dev/stdin is empty once read
            return f.read(), str(path.resolve()), regular
    except FileNotFoundError:
        raise UserError(f"input file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"input path is a directory, not a file: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read input file {path}: {e.strerror}") from None


def load_corpus(path=None):
    """Read UTF-8 text with one item per line from a file or standard input ("-"); any problem is one UserError."""
    path = bundled_corpus_path() if path is None else path
    raw, resolved, rereadable = read_input(path)
    name = STDIN_NAME if str(path) == STDIN else path
    if b"\x00" in raw:
        raise UserError(f"{name} looks binary (it contains NUL bytes); expected UTF-8 text, one item per line")
    try:
        text = raw.decode("utf-8-sig")      # -sig drops a leading byte-order mark
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{name} is not valid UTF-8 (byte {e.start}, line {line}); save it as UTF-8") from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()                         # a trailing newline does not make a blank item
    stripped = list(map(str.strip, lines))     # as makemore: " carl" would sample invisible spaces
    items = list(filter(None, stripped))
    if not items:
        raise UserError(f"{name} is empty: it has no non-blank lines")
    if max(map(len, items)) > MAX_ITEM_LENGTH:  # map and filter keep the per-line work in C: 200 MB in seconds
        number, item = next((n, item) for n, item in enumerate(stripped, 1) if len(item) > MAX_ITEM_LENGTH)
        raise UserError(f"{name} line {number} has {len(item)} characters; items are limited to {MAX_ITEM_LENGTH}")
    return Corpus(items, len(lines) - len(items), hashlib.sha256(raw).hexdigest(), resolved, rereadable)


@dataclass(frozen=True)
class Vocab:
    """Index 0 is the boundary token; then the corpus characters, sorted."""

    chars: tuple            # the characters of indices 1..len(chars)

    @classmethod
    def from_items(cls, items):
        return cls(tuple(sorted(set("".join(items)))))

    @property
    def size(self):
        return len(self.chars) + 1

    def itos(self, i):
        return BOUNDARY if i == 0 else self.chars[i - 1]

    def encode(self, text):
        """Characters to indices; an unknown character is a UserError naming it."""
        stoi = self.stoi
        unknown = sorted({c for c in text if c not in stoi})
        if unknown:
            raise UserError(f"characters not in the vocabulary: {''.join(unknown)!r} (known: {''.join(self.chars)!r})")
        return [stoi[c] for c in text]

    def token_table(self, size):
        """A numpy lookup table of size entries from code point to token id (-1: not in the vocabulary); size must
        exceed every character's code point."""
        table = np.full(size, -1, dtype=np.int16 if self.size <= 32768 else np.int32)
        table[[ord(c) for c in self.chars]] = np.arange(1, self.size, dtype=np.int32)
        return table

    def decode(self, indices):
        """Indices (no boundary tokens) back to text."""
        return "".join(self.chars[i - 1] for i in indices)

    @cached_property
    def stoi(self):
        """Character -> index, built once per vocabulary."""
        return {c: i + 1 for i, c in enumerate(self.chars)}


def split_order(n, seed=SPLIT_SEED):
    """The lectures' split of n items as positions: the permutation random.shuffle applies to any n items (it
    depends only on the length), cut 80% / 10% / 10%; three int64 arrays of item indices."""
    n1, n2 = int(0.8 * n), int(0.9 * n)
    if not 0 < n1 < n2 < n:
        raise UserError(f"{n} items are too few to make train/val/test splits (need at least {MIN_ITEMS})")
    order = np.arange(n, dtype=np.int64)
    # through a memoryview, as on a list: 8 bytes an item, not a Python int each, in numpy's memory (huge pages,
    # so the random swaps miss the TLB less: 14 s instead of 23 s for 26 million items)
    random.Random(seed).shuffle(memoryview(order))
    return order[:n1], order[n1:n2], order[n2:]


def split_lists(items, parts):
    """The items at each part's positions, in its order: gathered in C from an array of the item objects (in a
    shuffled order they lie scattered in memory, and a Python call an item waits on each)."""
    objects = np.fromiter(items, dtype=object, count=len(items))
    return [objects[part].tolist() for part in parts]


def split_items(items, seed=SPLIT_SEED):
    """The lectures' split: shuffle with random.seed(seed), then 80% / 10% / 10%."""
    return tuple(split_lists(items, split_order(len(items), seed)))


def build_examples(items, vocab, block_size):
    """Every (context, next index) pair: X (N, block_size), Y (N,); contexts start at the boundary."""
    contexts, targets = [], []
    for item in items:
        context = [0] * block_size
        for ix in vocab.encode(item) + [0]:
            contexts.append(context)
            targets.append(ix)
            context = context[1:] + [ix]
    return torch.tensor(contexts, dtype=torch.long).reshape(-1, block_size), torch.tensor(targets, dtype=torch.long)


def check_sequence_length(longest, length):
    """A sequence of length positions must hold the longest item and its boundary token."""
    if length < longest + 1:
        raise UserError(f"the longest item has {longest} characters, so whole-item sequences need a block size "
                        f"of at least {longest + 1} (its characters and the boundary); got {length}")


def build_sequences(items, vocab, length):
    """Whole items: X (N, length) = [0, c1..cn, 0 ...], Y (N, length) = [c1..cn, 0, -1 ...]."""
    encoded = [vocab.encode(item) for item in items]
    lengths = torch.tensor([len(e) for e in encoded], dtype=torch.long)         # (N,)
    check_sequence_length(int(lengths.max()), length)
    chars = torch.tensor(list(chain.from_iterable(encoded)), dtype=torch.long)  # (sum n,) every item, back to back
    rows = torch.repeat_interleave(torch.arange(len(items)), lengths)           # (sum n,) the item of each character
    starts = torch.cumsum(lengths, 0) - lengths                                 # (N,) where each item begins in chars
    cols = torch.arange(chars.shape[0]) - starts[rows]                          # (sum n,) position inside its item
    X = torch.zeros(len(items), length, dtype=torch.long)                       # padding inputs are 0
    X[rows, cols + 1] = chars                                                   # after the start boundary
    Y = torch.full((len(items), length), IGNORED, dtype=torch.long)
    Y[rows, cols] = chars                                                       # each input predicts the next
    Y[torch.arange(len(items)), lengths] = 0                                    # ...and the last, the end boundary
    return X, Y


def token_dtype(vocab_size):
    """The smallest integer type that holds every token id: one byte for a names-sized vocabulary."""
    return np.uint8 if vocab_size <= 256 else np.int16 if vocab_size <= 32768 else np.int32


def index_dtype(size):
    """The type of positions in size tokens: four bytes each while they fit."""
    return np.int32 if size < 2**31 else np.int64


def byte_ids(text, table, unknown):
    """text's token ids, one byte each, by bytes.translate (table: latin-1 code point -> id; unknown: the code points
    it deletes, so that a text with one comes back shorter), or None if text has a character the vocabulary lacks."""
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:
        return None
    ids = raw.translate(table, unknown)
    return np.frombuffer(ids, dtype=np.uint8) if len(ids) == len(raw) else None


def wide_ids(text, table):
    """text's token ids by a lookup of its code points in table (Vocab.token_table), or None if text has a character
    the vocabulary lacks."""
    try:
        ids = table[np.frombuffer(text.encode("utf-32-le"), dtype="<u4")]
    except UnicodeEncodeError:
        return None
    return None if (ids < 0).any() else ids


def token_reader(vocab):
    """A function from text to its token ids (or None, see byte_ids): a translate where every character and every id
    fits a byte (names), else a lookup of four-byte code points."""
    if token_dtype(vocab.size) != np.uint8 or any(ord(c) > 255 for c in vocab.chars):
        return partial(wide_ids, table=vocab.token_table(sys.maxunicode + 1))     # every code point text can hold
    table = vocab.token_table(256)
    return partial(byte_ids, table=table.clip(0).astype(np.uint8).tobytes(), unknown=bytes(np.flatnonzero(table < 0)))


def item_lengths(items):
    """Each item's length in characters, (N,): a byte each when every one fits (names: half the time), else four."""
    try:
        return np.frombuffer(bytes(map(len, items)), dtype=np.uint8)
    except ValueError:                      # an item of 256 characters or more
        return np.fromiter(map(len, items), dtype=np.int32, count=len(items))


def encode_splits(items, parts, vocab):
    """Each split's stream of token ids, (S,) = [0, c1..cn, 0, c1..cm, ..., 0], and the positions of its boundaries,
    (n + 1,), for the items at positions parts (split_order's). The items are read in file order, as they lie in
    memory: each block of them is joined, turned into ids, and its characters scattered to their places."""
    token_ids = token_reader(vocab)
    lengths = item_lengths(items)                               # (N,) in file order
    size = int(lengths.sum(dtype=np.int64)) + len(items) + len(parts)    # a boundary an item, and a last a split
    places = np.empty(len(items), dtype=index_dtype(size))      # (N,) where each item's boundary goes
    splits, at = [], 0                                          # (where its stream starts, its boundaries)
    for part in parts:
        bounds = np.empty(len(part) + 1, dtype=places.dtype)    # (n + 1,) in place, without temporaries:
        bounds[0] = at
        np.add(lengths[part], 1, out=bounds[1:], dtype=bounds.dtype)    # each item's boundary and characters,
        np.cumsum(bounds, out=bounds)                           # their boundaries' places in streams,
        places[part] = bounds[:-1]
        bounds -= at                                            # and in the split's own stream
        splits.append((at, bounds))
        at += int(bounds[-1]) + 1
    streams = np.zeros(size, dtype=token_dtype(vocab.size))     # (size,) the splits' streams, one after another
    for first in range(0, len(items), ENCODE_ITEMS):
        ids = token_ids("".join(items[first : first + ENCODE_ITEMS]))     # (L,) the block's characters
        if ids is None:
            unknown_characters(items, parts, vocab)
        counts = lengths[first : first + ENCODE_ITEMS]                    # (B,)
        starts = np.cumsum(counts, dtype=np.int64) - counts               # (B,) each item's first character in ids
        shifts = places[first : first + ENCODE_ITEMS] + 1 - starts        # (B,) from there to after its boundary
        # each character's target is its position in ids plus its item's shift: a running sum of 1 a character
        # and, where an item starts, the change of shift (add.at: empty items share a start, their changes add up)
        targets = np.ones(len(ids) + 1, dtype=np.int64)                   # (L + 1,) the last for empty items' starts
        targets[0] = shifts[0]
        np.add.at(targets, starts[1:], np.diff(shifts))
        streams[np.cumsum(targets, out=targets)[:-1]] = ids
    streams = torch.from_numpy(streams)
    return [(streams[at : at + int(bounds[-1]) + 1], torch.from_numpy(bounds)) for at, bounds in splits]


def unknown_characters(items, parts, vocab):
    """The UserError naming the characters the vocabulary lacks in the first block of UNKNOWN_ITEMS items, in split
    order, that has any."""
    for split in split_lists(items, parts):
        for first in range(0, len(split), UNKNOWN_ITEMS):
            vocab.encode("".join(split[first : first + UNKNOWN_ITEMS]))


@dataclass
class Examples:
    """One split's examples gathered from its token stream: windows (context -> next) or whole-item sequences.

    Window k's target is stream[k + 1] and its context the block_size tokens before it, zeroed before the
    item's boundary; sequence i is its item from the boundary at bounds[i], padded. The rows and their order
    are exactly build_examples' and build_sequences', so a seeded batch draws the same examples.
    """

    stream: torch.Tensor    # (S,) uint8, int16 or int32 token ids: [0, item, 0, item, ..., 0]
    bounds: torch.Tensor    # (N + 1,) int32 positions of the boundaries in stream (int64 from 2**31 tokens)
    form: str               # one of FORMS
    width: int              # windows: block_size; sequences: positions per row (the longest item + 1 at least)

    def __len__(self):
        return self.stream.shape[0] - 1 if self.form == "windows" else self.bounds.shape[0] - 1

    def batch(self, ix):
        """The rows ix (B,): windows X (B, block_size), Y (B,); sequences X (B, T), Y (B, T), -1 on padding."""
        if self.form == "windows":
            # the block_size tokens up to and including stream[ix], oldest first (before 0: stream[0], a boundary)
            X = self.stream[(ix[:, None] + self.window_offsets).clamp_(min=0)].long()     # (B, block_size)
            # keep only what follows the window's last boundary (the item's own characters): columns are
            # numbered 1..block_size, and every column before the last 0's number is zeroed
            last_boundary = ((X == 0) * self.column_numbers).amax(1, keepdim=True)   # (B, 1), 0 if none
            X *= self.column_numbers >= last_boundary
            return X, self.stream[ix + 1].long()
        offsets = torch.arange(self.width, device=ix.device)                   # (width,)
        last = self.stream.shape[0] - 1
        starts = self.bounds[ix]                                                # (B,)
        lengths = self.bounds[ix + 1] - starts - 1                              # (B,) characters
        X = self.stream[(starts[:, None] + offsets).clamp_(max=last)].long()    # (B, T)
        Y = self.stream[(starts[:, None] + 1 + offsets).clamp_(max=last)].long()
        past = offsets > lengths[:, None]                                       # (B, T) after the end token
        return X.masked_fill_(past, 0), Y.masked_fill_(past, IGNORED)

    @cached_property
    def window_offsets(self):
        """(block_size,) positions of a window's tokens relative to its last one: 1 - block_size .. 0."""
        return torch.arange(1 - self.width, 1, device=self.stream.device)

    @cached_property
    def column_numbers(self):
        """(block_size,) 1 .. block_size: a window's columns, numbered from 1 so that 0 can mean none."""
        return torch.arange(1, self.width + 1, device=self.stream.device)

    def draw(self, batch_size, generator):
        """The rows (batch_size,) of a minibatch drawn uniformly with replacement, on the stream's device."""
        return torch.randint(0, len(self), (batch_size,), generator=generator).to(self.stream.device)

    def sample(self, batch_size, generator):
        """A minibatch drawn uniformly with replacement: the same draws, and rows, as sample_batch on the tensors."""
        return self.batch(self.draw(batch_size, generator))

    def chunks(self, rows):
        """(X, Y) for consecutive runs of rows examples, in order: evaluation without holding the whole split."""
        for first in range(0, len(self), rows):
            yield self.batch(torch.arange(first, min(first + rows, len(self)), device=self.stream.device))

    def scored(self):
        """How many positions the loss counts: every window; each sequence's characters and its end token."""
        return len(self) if self.form == "windows" else int(self.bounds[-1] - self.bounds[0])

    def __iter__(self):
        """X, Y = examples: every row at once, as tensors (for small corpora, tests and benchmarks)."""
        return iter(self.batch(torch.arange(len(self), device=self.stream.device)))


@dataclass
class Splits:
    """The three splits of a corpus as example tensors, plus what defines them."""

    vocab: Vocab
    train_items: list
    val_items: list
    test_items: list
    tensors: dict           # split name -> its Examples (X, Y = examples gives every row at once)
    form: str = "windows"   # one of FORMS

    def signature(self):
        """A hash of the split itself, so a checkpoint can tell it is resumed on the same data."""
        h = hashlib.sha256()
        for items in (self.train_items, self.val_items, self.test_items):
            h.update("\n".join(items).encode() + b"\x00")
        return h.hexdigest()


def make_splits(corpus, block_size, seed=SPLIT_SEED, vocab=None, device="cpu", form="windows"):
    """Vocabulary (from the corpus unless given), split, and each split's Examples on device, in the given form.

    windows: block_size characters of context -> the next character. sequences: each item whole, padded to
    block_size positions (None: the longest item + 1, the same for every split).
    """
    if form not in FORMS:
        raise UserError(f"unknown data form {form!r} (choose {' or '.join(FORMS)})")
    vocab = vocab or Vocab.from_items(corpus.items)
    parts = split_order(len(corpus.items), seed)
    train, val, test = split_lists(corpus.items, parts)
    if form == "sequences":             # one width for every split, checked against the whole corpus's longest item
        longest = max(len(item) for item in corpus.items)
        block_size = longest + 1 if block_size is None else block_size
        check_sequence_length(longest, block_size)
    tensors = {}
    for name, (stream, bounds) in zip(SPLIT_NAMES, encode_splits(corpus.items, parts, vocab), strict=True):
        tensors[name] = Examples(stream.to(device), bounds.to(device), form, block_size)
    return Splits(vocab, train, val, test, tensors, form)


def sample_batch(X, Y, batch_size, generator):
    """A minibatch of rows drawn uniformly with replacement, as in the lectures (windows or sequences)."""
    ix = torch.randint(0, X.shape[0], (batch_size,), generator=generator)
    ix = ix.to(X.device)
    return X[ix], Y[ix]                     # windows (B, block_size), (B,); sequences (B, T), (B, T)
