"""Unit tests: the caption tokenizer."""

from __future__ import annotations

import pytest

from capray.text import Tokenizer, clean

CAPTIONS = ["A dog runs.", "A dog, a cat!", "The cat sleeps", "a DOG"]


def test_clean_lowercases_and_filters_punctuation_like_the_seed() -> None:
    assert clean("A Dog's ball, (red)!") == ["a", "dog's", "ball", "red"]
    assert clean("<start> hi <end>") == ["<start>", "hi", "<end>"]


def test_vocabulary_order_is_specials_then_frequency_then_first_seen() -> None:
    tok = Tokenizer.fit(CAPTIONS)
    assert tok.words[:4] == ["<pad>", "<unk>", "<start>", "<end>"]
    assert tok.words[4:] == ["a", "dog", "cat", "runs", "the", "sleeps"]
    assert Tokenizer.fit(CAPTIONS).words == tok.words


def test_vocab_size_caps_words_and_maps_the_rest_to_unk() -> None:
    tok = Tokenizer.fit(CAPTIONS, vocab_size=5)  # <unk>, <start>, <end> + the 2 most frequent words
    assert tok.vocab_size == 6 and tok.words[4:] == ["a", "dog"]
    assert tok.encode("a cat") == [2, tok.index["a"], 1, 3]


def test_padding_to_the_longest_caption_or_a_configured_maximum() -> None:
    tok = Tokenizer.fit(CAPTIONS)
    assert tok.max_length == 6  # "a dog a cat" + <start> + <end>
    batch = tok.encode_batch(["a dog", "a dog a cat"])
    assert batch.shape == (2, 6) and batch.dtype.name == "int32"
    assert batch[0].tolist() == [2, tok.index["a"], tok.index["dog"], 3, 0, 0]
    short = Tokenizer.fit(CAPTIONS, max_length=4)
    assert short.encode("a dog a cat")[-1] == 3 and len(short.encode("a dog a cat")) == 4


def test_encode_decode_round_trip() -> None:
    tok = Tokenizer.fit(CAPTIONS)
    for caption in CAPTIONS:
        assert tok.decode(tok.encode(caption)) == " ".join(clean(caption))
    assert tok.decode([2, tok.index["dog"], 3, tok.index["cat"]]) == "dog"


def test_json_round_trip_is_identical() -> None:
    tok = Tokenizer.fit(CAPTIONS, vocab_size=7, max_length=5)
    again = Tokenizer.from_json(tok.to_json())
    assert again == tok
    assert (again.encode_batch(CAPTIONS) == tok.encode_batch(CAPTIONS)).all()
    with pytest.raises(ValueError, match="not a capray tokenizer"):
        Tokenizer.from_json('{"words": []}')
