"""Corpus loading and validation, the vocabulary, the lectures' seeded split, windows and sequences, batches.

Each split is held as one stream of token ids (Examples): every item as [boundary, c1..cn], then a
last boundary, one byte a character when the vocabulary fits. Windows and sequences are gathered
from it per batch, so memory does not grow with the block size; build_examples and build_sequences
are the plain list-building reference the streams are tested against.

The two data forms are objects answering the same calls (WINDOWS and SEQUENCES): the rows of a
split, a batch of them, the positions the loss counts, the loss itself, the rows an evaluation
pass takes, and how a model of the form generates. Code above this module asks the form; it
never compares its name.
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
from .losses import IGNORED, CrossEntropy, SequenceCrossEntropy
from .noise import uniform_noise
from .sample import sample_sequences, sample_windows

BOUNDARY = "."              # how the start/end token (index 0) is shown
MAX_ITEM_LENGTH = 1000      # characters; a longer line is almost surely not one item per line
MIN_ITEMS = 6               # the fewest items whose 80/10/10 split leaves no split empty: 4 / 1 / 1
STDIN = "-"                 # the input file name that means standard input
STDIN_NAME = "<stdin>"      # how standard input is named in messages and in a checkpoint
SPLIT_SEED = 42             # the lectures' random.seed(42) before shuffling the words
SPLIT_NAMES = ("train", "val", "test")
FAR_LONGER = 4             # an item this many times longer than almost every other (99%) makes its batches slow
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
    form: object            # WINDOWS or SEQUENCES
    width: int              # windows: block_size; sequences: the most positions a row has (the longest item + 1 at
    #                         least); a batch of sequences is padded to its own longest item unless told otherwise

    def __len__(self):
        return self.form.rows(self)

    def batch(self, ix, padded_to=None):
        """The rows ix (B,): windows X (B, block_size), Y (B,); sequences X (B, T), Y (B, T), -1 on padding, T the
        batch's longest item + 1 (padded_to: T = padded_to positions, the same for every batch: a compiled step)."""
        return self.form.batch(self, ix, padded_to)

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
        """A minibatch drawn uniformly with replacement, as in the lectures: X[ix], Y[ix] of every row's tensors."""
        return self.batch(self.draw(batch_size, generator))

    def chunks(self, positions):
        """(X, Y) for consecutive runs of rows, about `positions` positions each, in order, padded to the split's
        width: evaluation without holding the whole split."""
        rows = self.form.chunk_rows(self, positions)
        for first in range(0, len(self), rows):
            ix = torch.arange(first, min(first + rows, len(self)), device=self.stream.device)
            yield self.batch(ix, padded_to=self.width)

    def scored(self):
        """How many positions the loss counts: every window; each sequence's characters and its end token."""
        return self.form.scored(self)

    def __iter__(self):
        """X, Y = examples: every row at once, as tensors padded to the split's width (small corpora, tests)."""
        return iter(self.batch(torch.arange(len(self), device=self.stream.device), padded_to=self.width))


class Windows:
    """The lectures' form: block_size characters of context -> the next character, one row per character."""

    name = "windows"

    def criterion(self):
        """The loss of a batch: the mean cross-entropy over its rows."""
        return CrossEntropy()

    def rows(self, examples):
        return examples.stream.shape[0] - 1             # a window ends at every token but the first boundary

    def batch(self, examples, ix, padded_to=None):
        # the block_size tokens up to and including stream[ix], oldest first (before 0: stream[0], a boundary)
        X = examples.stream[(ix[:, None] + examples.window_offsets).clamp_(min=0)].long()     # (B, block_size)
        # keep only what follows the window's last boundary (the item's own characters): columns are
        # numbered 1..block_size, and every column before the last 0's number is zeroed
        last_boundary = ((X == 0) * examples.column_numbers).amax(1, keepdim=True)   # (B, 1), 0 if none
        X *= examples.column_numbers >= last_boundary
        return X, examples.stream[ix + 1].long()

    def scored(self, examples):
        return len(examples)

    def chunk_rows(self, examples, positions):
        return positions                                # a window is one position

    def width(self, longest, block_size):
        """Positions per row for a model of block_size (the corpus's longest item plays no part)."""
        return block_size

    def padding_warning(self, items):
        """None: a window's length does not depend on its item's."""
        return None

    def noise_source(self, examples):
        """None: every batch has the same shape, so each layer draws its noise as it is (Layer.take_noise_from)."""
        return None

    def generate(self, model, vocab, block_size, num, generator, max_length, prefix, sampling):
        """Indices (num, max_length - len(prefix)) drawn by a window model (sample.sample_windows)."""
        return sample_windows(model, vocab, block_size, num, generator, max_length, prefix, sampling)


class Sequences:
    """Whole items: [boundary, c1..cn] -> [c1..cn, boundary], padded; the padded positions have no loss."""

    name = "sequences"

    def criterion(self):
        """The loss of a batch: the mean cross-entropy over the positions that are not padding."""
        return SequenceCrossEntropy()

    def rows(self, examples):
        return examples.bounds.shape[0] - 1             # an item between each two boundaries

    def batch(self, examples, ix, padded_to=None):
        starts = examples.bounds[ix]                                            # (B,)
        lengths = examples.bounds[ix + 1] - starts - 1                          # (B,) characters
        width = padded_to or int(lengths.max()) + 1     # a batch of short items is not padded to a long one's width
        offsets = torch.arange(width, device=ix.device)                         # (T,)
        last = examples.stream.shape[0] - 1
        X = examples.stream[(starts[:, None] + offsets).clamp_(max=last)].long()    # (B, T)
        Y = examples.stream[(starts[:, None] + 1 + offsets).clamp_(max=last)].long()
        past = offsets > lengths[:, None]                                       # (B, T) after the end token
        return X.masked_fill_(past, 0), Y.masked_fill_(past, IGNORED)

    def scored(self, examples):
        return int(examples.bounds[-1] - examples.bounds[0])    # each item's characters and its end token

    def chunk_rows(self, examples, positions):
        return max(1, positions // examples.width)

    def width(self, longest, block_size):
        """Positions per row: the longest item + 1, which a model of block_size positions must hold (None: a model
        made to fit)."""
        if block_size is not None:
            check_sequence_length(longest, block_size)
        return longest + 1

    def padding_warning(self, items):
        """A line saying one item is far longer than almost all the rest (the batches holding it are slow), or None."""
        lengths = sorted(map(len, items))
        typical, longest = lengths[(len(lengths) - 1) * 99 // 100], lengths[-1]
        if longest <= FAR_LONGER * max(typical, 1):
            return None
        return (f"one item has {longest} characters, 99% of them at most {typical}: each batch is padded to its own "
                "longest item, so the batches holding the long one are far slower (is it one item per line?)")

    def noise_source(self, examples):
        """A noise source (Layer.take_noise_from) for batches padded to their own longest item: each layer draws its
        noise (B, T, ...) as for rows of the split's full width and keeps the first T positions, so the generator and
        every mask at an item's positions are what a batch of full width (a compiled step's) gets."""

        def draw(layer, shape, dtype, device):
            full = uniform_noise((shape[0], examples.width, *shape[2:]), layer.generator, dtype, device)
            return full[:, : shape[1]]                      # (B, width, ...) -> (B, T, ...)

        return draw

    def generate(self, model, vocab, block_size, num, generator, max_length, prefix, sampling):
        """Indices (num, max_length - len(prefix)) drawn by a sequence model from its start token on
        (sample.sample_sequences); block_size plays no part."""
        return sample_sequences(model, vocab, num, generator, max_length, prefix, sampling=sampling)


WINDOWS, SEQUENCES = Windows(), Sequences()
FORMS = {form.name: form for form in (WINDOWS, SEQUENCES)}


def form_named(name):
    """The data form of that name ('windows' or 'sequences'; ModelConfig.form); another name is a UserError."""
    if name not in FORMS:
        raise UserError(f"unknown data form {name!r} (choose {' or '.join(FORMS)})")
    return FORMS[name]


@dataclass
class Splits:
    """The three splits of a corpus as example tensors, plus what defines them."""

    vocab: Vocab
    train_items: list
    val_items: list
    test_items: list
    tensors: dict           # split name -> its Examples (X, Y = examples gives every row at once)
    form: object = WINDOWS  # WINDOWS or SEQUENCES

    def signature(self):
        """A hash of the split itself, so a checkpoint can tell it is resumed on the same data."""
        h = hashlib.sha256()
        for items in (self.train_items, self.val_items, self.test_items):
            h.update("\n".join(items).encode() + b"\x00")
        return h.hexdigest()


def make_splits(corpus, block_size, seed=SPLIT_SEED, vocab=None, device="cpu", form=WINDOWS):
    """Vocabulary (from the corpus unless given), split, and each split's Examples on device, in the given form.

    WINDOWS: block_size characters of context -> the next character. SEQUENCES: each item whole, in rows of up to
    the longest item + 1 positions (the same for every split), which block_size must hold (None: any).
    """
    vocab = vocab or Vocab.from_items(corpus.items)
    parts = split_order(len(corpus.items), seed)
    train, val, test = split_lists(corpus.items, parts)
    width = form.width(max(map(len, corpus.items)), block_size)    # the whole corpus's longest item, every split
    tensors = {}
    for name, (stream, bounds) in zip(SPLIT_NAMES, encode_splits(corpus.items, parts, vocab), strict=True):
        tensors[name] = Examples(stream.to(device), bounds.to(device), form, width)
    return Splits(vocab, train, val, test, tensors, form)
