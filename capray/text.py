"""Caption tokenizer: the seed's lower-casing and punctuation filter, top-k words, `<pad>` = 0.

Indices: 0 `<pad>`, 1 `<unk>`, 2 `<start>`, 3 `<end>`, then words by descending frequency (ties by
first appearance, so fitting is deterministic). With `vocab_size=5000` the embedding has 5,001
rows, as in the seed (its 5,000 top tokens plus `<pad>`).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

PAD, UNK, START, END = "<pad>", "<unk>", "<start>", "<end>"
SPECIALS = (PAD, UNK, START, END)
# The seed's Keras Tokenizer filter, minus '<' and '>' so that the special tokens survive.
FILTERS = '!"#$%&()*+.,-/:;=?@[\\]^_`{|}~\t\n'
_FILTER_RE = re.compile("[" + re.escape(FILTERS) + "]")
# A word's first appearance as one integer (caption ordinal << POSITION_BITS | token position),
# so that counts of separate batches combine with Min; captions of 2^24 tokens or more are
# beyond its exactness.
POSITION_BITS = 24


def clean(caption: str) -> list[str]:
    """Lower-case, replace filtered punctuation by spaces, split on whitespace."""
    return _FILTER_RE.sub(" ", caption.lower()).split()


def caption_words(caption: str) -> list[str]:
    """A caption's words: `clean`, without the `<start>`/`<end>` of a caption already wrapped as
    the seed wraps them ("<start> a dog <end>"), so that it is not wrapped twice."""
    tokens = clean(caption)
    if tokens[:1] == [START]:
        tokens = tokens[1:]
    if tokens[-1:] == [END]:
        tokens = tokens[:-1]
    return tokens


def count_words(captions: Iterable[str], ordinals: Iterable[int]) -> tuple[dict[str, list[int]], int]:
    """Each word of the captions -> [count, first appearance] and the longest caption in tokens
    (+2 for `<start>`/`<end>`); `ordinals` are the captions' positions in the whole training
    set, so that counts of separate batches summed (and their firsts' minimum) rank exactly as
    `Tokenizer.fit` on all of them does."""
    counts: dict[str, list[int]] = {}
    longest = 0
    for caption, ordinal in zip(captions, ordinals):
        tokens = caption_words(caption)
        longest = max(longest, len(tokens) + 2)
        base = int(ordinal) << POSITION_BITS
        for position, word in enumerate(tokens):
            seen = counts.get(word)
            if seen is None:
                counts[word] = [1, base | min(position, (1 << POSITION_BITS) - 1)]
            else:
                seen[0] += 1
    return counts, longest


def rank_words(counts: Mapping[str, tuple[int, int] | list[int]], n: int) -> list[str]:
    """The `n` most frequent words of [count, first appearance] totals, ties by first appearance
    (the order `Tokenizer.fit` keeps), special tokens excluded."""
    ranked = sorted((w for w in counts if w not in SPECIALS), key=lambda w: (-counts[w][0], counts[w][1]))
    return ranked[: max(n, 0)]


class Tokenizer:
    """Word-level vocabulary with fixed special tokens and a fixed padded length."""

    def __init__(self, words: Sequence[str], max_length: int):
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.max_length = int(max_length)
        if self.words[: len(SPECIALS)] != list(SPECIALS):
            raise ValueError(f"vocabulary must start with {SPECIALS}")
        if self.max_length < 2:
            raise ValueError(f"max_length={self.max_length}: must leave room for <start> and <end> (>= 2)")

    pad_id, unk_id, start_id, end_id = 0, 1, 2, 3

    @classmethod
    def fit(cls, captions: Iterable[str], vocab_size: int = 5000, max_length: int = 0) -> Tokenizer:
        """Build the vocabulary from training captions; max_length 0 = the longest caption."""
        counts: Counter[str] = Counter()
        longest = 0
        for caption in captions:
            tokens = caption_words(caption)
            counts.update(tokens)
            longest = max(longest, len(tokens) + 2)
        for special in SPECIALS:
            counts.pop(special, None)
        # Counter.most_common keeps insertion order among equal counts.
        kept = [w for w, _ in counts.most_common(max(vocab_size - 3, 0))]
        return cls(list(SPECIALS) + kept, max_length or longest)

    @classmethod
    def from_ranked(cls, ranked: Sequence[str], longest: int, vocab_size: int = 5000, max_length: int = 0) -> Tokenizer:
        """The tokenizer `fit` makes, from words already ranked (e.g. counted by Ray tasks, then
        `rank_words`) and the longest training caption in tokens (+2)."""
        return cls(list(SPECIALS) + list(ranked[: max(vocab_size - 3, 0)]), max_length or longest)

    @property
    def vocab_size(self) -> int:
        """Number of rows of the embedding / columns of the logits (includes `<pad>`)."""
        return len(self.words)

    def encode(self, caption: str) -> list[int]:
        """`<start>` words `<end>` as ids (unpadded), truncated to max_length keeping `<end>`."""
        # A marker a caption spells ("a sign saying <end>") is <unk>: as its own id, <end> or
        # <pad> mid-caption would end the sequence or drop the word from the loss.
        ids = [self.unk_id if w in SPECIALS else self.index.get(w, self.unk_id) for w in caption_words(caption)]
        ids = ids[: self.max_length - 2]
        return [self.start_id, *ids, self.end_id]

    def encode_batch(self, captions: Sequence[str]) -> np.ndarray:
        """Encode and right-pad with 0 to (len(captions), max_length) int32."""
        out = np.zeros((len(captions), self.max_length), dtype=np.int32)
        for row, caption in enumerate(captions):
            ids = self.encode(caption)
            out[row, : len(ids)] = ids
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Ids back to text: stops at `<end>`/`<pad>`, drops `<start>`."""
        words = []
        for i in ids:
            i = int(i)
            if i in (self.end_id, self.pad_id):
                break
            if i != self.start_id:
                words.append(self.words[i] if 0 <= i < len(self.words) else UNK)
        return " ".join(words)

    def to_json(self) -> str:
        """Serialise (vocabulary and padded length) for checkpoints."""
        return json.dumps({"format": "capray-tokenizer/1", "words": self.words, "max_length": self.max_length})

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        """Inverse of `to_json`."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != "capray-tokenizer/1":
            raise ValueError("not a capray tokenizer file")
        return cls(data["words"], data["max_length"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and (self.words, self.max_length) == (other.words, other.max_length)
