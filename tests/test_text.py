"""Unit tests: the caption tokenizer (cleaning, vocabulary, encoding, padding, decoding, JSON)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from capray.text import FILTERS, POSITION_BITS, SPECIALS, Tokenizer, clean, count_words, rank_words

CAPTIONS = ["A dog runs.", "A dog, a cat!", "The cat sleeps", "a DOG"]
# Counts: a 4, dog 3, cat 2, runs 1, the 1, sleeps 1 (first seen in that order).
WORDS = ["a", "dog", "cat", "runs", "the", "sleeps"]


# --- cleaning ---------------------------------------------------------------------------------


def test_clean_lowercases_and_splits_on_whitespace() -> None:
    assert clean("A Dog  RUNS\tfast\nnow") == ["a", "dog", "runs", "fast", "now"]
    assert clean("") == [] and clean("   ") == []


def test_clean_applies_the_seeds_punctuation_filter() -> None:
    # Each filtered character becomes a space; the apostrophe is not in the seed's filter.
    assert clean("A Dog's ball, (red)!") == ["a", "dog's", "ball", "red"]
    assert clean("well-lit 100% #1 a_b x=y @home ~tilde~") == [
        "well",
        "lit",
        "100",
        "1",
        "a",
        "b",
        "x",
        "y",
        "home",
        "tilde",
    ]
    assert clean("no.space,between!words") == ["no", "space", "between", "words"]
    for ch in FILTERS:
        assert clean(f"left{ch}right") == ["left", "right"], repr(ch)


def test_special_tokens_survive_cleaning() -> None:
    assert "<" not in FILTERS and ">" not in FILTERS
    assert clean("<start> A man. <end>") == ["<start>", "a", "man", "<end>"]
    assert clean("<PAD> <Unk>") == ["<pad>", "<unk>"]


# --- vocabulary -------------------------------------------------------------------------------


def test_vocabulary_order_is_specials_then_frequency_then_first_seen() -> None:
    tok = Tokenizer.fit(CAPTIONS)
    assert tok.words[:4] == ["<pad>", "<unk>", "<start>", "<end>"] == list(SPECIALS)
    assert (tok.pad_id, tok.unk_id, tok.start_id, tok.end_id) == (0, 1, 2, 3)
    assert tok.words[4:] == WORDS
    assert tok.index == {w: i for i, w in enumerate(tok.words)}
    assert tok.vocab_size == 4 + len(WORDS)


def test_ties_are_broken_by_first_appearance_even_at_the_cut() -> None:
    captions = ["b a", "a b c", "c d"]  # a, b, c all appear twice; b is seen first
    assert Tokenizer.fit(captions).words[4:] == ["b", "a", "c", "d"]
    assert Tokenizer.fit(captions, vocab_size=5).words[4:] == ["b", "a"]  # the cut falls in the tie


def test_fitting_is_deterministic() -> None:
    captions = [f"w{i % 7} w{i % 3} w{(i * 5) % 11}" for i in range(50)]
    first = Tokenizer.fit(captions, vocab_size=9)
    for _ in range(3):
        again = Tokenizer.fit(list(captions), vocab_size=9)
        assert again == first and again.words == first.words


def test_special_tokens_in_captions_are_not_counted_as_words() -> None:
    tok = Tokenizer.fit(["<start> a dog <end>", "<pad> <unk> a"])
    assert tok.words == ["<pad>", "<unk>", "<start>", "<end>", "a", "dog"]


def test_vocab_size_keeps_vocab_size_minus_3_words_plus_the_4_specials() -> None:
    # vocab_size counts <unk>, <start>, <end> and the words; <pad> is the extra row (5000 -> 5001).
    tok = Tokenizer.fit(CAPTIONS, vocab_size=5)
    assert tok.words == ["<pad>", "<unk>", "<start>", "<end>", "a", "dog"]
    assert tok.vocab_size == 6
    assert Tokenizer.fit(CAPTIONS, vocab_size=7).vocab_size == 8
    assert Tokenizer.fit(CAPTIONS, vocab_size=1000).vocab_size == 4 + len(WORDS)  # fewer words than the cap


def test_out_of_vocabulary_words_encode_as_unk() -> None:
    tok = Tokenizer.fit(CAPTIONS, vocab_size=5)
    a, dog = tok.index["a"], tok.index["dog"]
    assert tok.encode("a cat") == [2, a, 1, 3]  # "cat" was cut by vocab_size
    assert tok.encode("A zebra, a DOG") == [2, a, 1, a, dog, 3]  # never seen
    assert tok.decode(tok.encode("a zebra")) == "a <unk>"


# --- encoding and padding ---------------------------------------------------------------------


def test_captions_already_wrapped_are_not_wrapped_twice_and_other_markers_are_unk() -> None:
    tok = Tokenizer.fit(CAPTIONS, max_length=20)
    a, dog = tok.index["a"], tok.index["dog"]
    assert tok.encode("<start> a dog <end>") == tok.encode("a dog") == [2, a, dog, 3]
    # Spelled inside a caption, a marker would end it (<end>) or leave the loss (<pad>).
    assert tok.encode("a <end> dog <pad> <start>") == [2, a, 1, dog, 1, 1, 3]


def test_encode_adds_start_and_end() -> None:
    tok = Tokenizer.fit(CAPTIONS)
    ids = tok.encode("The cat sleeps.")
    assert ids == [2, tok.index["the"], tok.index["cat"], tok.index["sleeps"], 3]
    assert tok.encode("") == [2, 3]


def test_encode_batch_pads_with_zero_to_the_longest_caption_plus_two() -> None:
    tok = Tokenizer.fit(CAPTIONS)
    assert tok.max_length == 4 + 2  # "a dog a cat" + <start> + <end>
    batch = tok.encode_batch(["a dog", "a dog a cat", "cat"])
    assert batch.shape == (3, 6) and batch.dtype == np.int32
    a, dog, cat = tok.index["a"], tok.index["dog"], tok.index["cat"]
    assert batch.tolist() == [
        [2, a, dog, 3, 0, 0],
        [2, a, dog, a, cat, 3],
        [2, cat, 3, 0, 0, 0],
    ]
    assert tok.encode_batch([]).shape == (0, 6)


def test_configured_max_length_pads_and_truncates_keeping_end_last() -> None:
    tok = Tokenizer.fit(CAPTIONS, max_length=4)
    assert tok.max_length == 4
    a, dog = tok.index["a"], tok.index["dog"]
    assert tok.encode("a dog a cat") == [2, a, dog, 3]  # 2 words fit between <start> and <end>
    batch = tok.encode_batch(["a dog a cat", "a", ""])
    assert batch.tolist() == [[2, a, dog, 3], [2, a, 3, 0], [2, 3, 0, 0]]
    longer = Tokenizer.fit(CAPTIONS, max_length=9).encode_batch(["a dog a cat"])
    assert longer.shape == (1, 9) and longer[0, 6:].tolist() == [0, 0, 0]
    assert Tokenizer.fit(CAPTIONS, max_length=2).encode_batch(["a dog"]).tolist() == [[2, 3]]


def test_max_length_too_small_for_start_and_end_is_refused() -> None:
    # Regression: max_length=1 used to slice ids[:-1] and return more than max_length ids.
    with pytest.raises(ValueError, match="max_length"):
        Tokenizer.fit(CAPTIONS, max_length=1)
    with pytest.raises(ValueError, match="max_length"):
        Tokenizer(list(SPECIALS) + ["a"], max_length=1)
    with pytest.raises(ValueError, match="max_length"):  # nor through a corrupt saved tokenizer
        Tokenizer.from_json(json.dumps({"format": "capray-tokenizer/1", "words": list(SPECIALS), "max_length": 1}))


# --- decoding ---------------------------------------------------------------------------------


def test_decode_inverts_encode_for_in_vocabulary_captions() -> None:
    tok = Tokenizer.fit(CAPTIONS)
    for caption in [*CAPTIONS, "Cat, dog; THE runs!"]:  # up to max_length - 2 words
        assert tok.decode(tok.encode(caption)) == " ".join(clean(caption))
    for row, caption in zip(tok.encode_batch(CAPTIONS), CAPTIONS):  # padded numpy rows too
        assert tok.decode(row) == " ".join(clean(caption))


def test_decode_stops_at_end_or_pad_and_drops_start() -> None:
    tok = Tokenizer.fit(CAPTIONS)
    dog, cat = tok.index["dog"], tok.index["cat"]
    assert tok.decode([2, dog, 3, cat, cat]) == "dog"
    assert tok.decode([dog, cat, 3]) == "dog cat"  # greedy output has no <start>
    assert tok.decode([2, dog, 0, cat]) == "dog"
    assert tok.decode([3, dog]) == "" and tok.decode([]) == ""
    assert tok.decode(np.array([2, cat, 1, 3], np.int32)) == "cat <unk>"
    assert tok.decode([dog, 999]) == "dog <unk>"  # out-of-range ids do not crash


# --- serialisation ----------------------------------------------------------------------------


def test_json_round_trip_gives_an_equal_tokenizer_and_identical_encodings() -> None:
    tok = Tokenizer.fit(CAPTIONS, vocab_size=7, max_length=5)
    text = tok.to_json()
    assert json.loads(text)["max_length"] == 5
    again = Tokenizer.from_json(text)
    assert again == tok
    assert again.words == tok.words and again.index == tok.index and again.max_length == 5
    np.testing.assert_array_equal(again.encode_batch(CAPTIONS), tok.encode_batch(CAPTIONS))
    assert again.decode(tok.encode("a dog runs")) == tok.decode(tok.encode("a dog runs"))
    assert Tokenizer.fit(CAPTIONS, vocab_size=7, max_length=6) != tok  # equality sees max_length
    assert Tokenizer.fit(CAPTIONS, vocab_size=6, max_length=5) != tok  # and the words


def test_from_json_rejects_a_json_object_that_is_not_a_tokenizer() -> None:
    with pytest.raises(ValueError, match="not a capray tokenizer"):
        Tokenizer.from_json('{"words": ["<pad>", "<unk>", "<start>", "<end>"], "max_length": 3}')
    with pytest.raises(ValueError, match="not a capray tokenizer"):
        Tokenizer.from_json(json.dumps({"format": "capray-tokenizer/2", "words": [], "max_length": 3}))
    with pytest.raises(ValueError):  # not JSON at all (JSONDecodeError is a ValueError)
        Tokenizer.from_json("<pad> <unk>")
    with pytest.raises(ValueError, match="must start with"):  # right format, corrupt vocabulary
        Tokenizer.from_json(json.dumps({"format": "capray-tokenizer/1", "words": ["a", "b"], "max_length": 3}))


@pytest.mark.parametrize("text", ['["<pad>", "<unk>", "<start>", "<end>"]', "3", '"words"', "null"])
def test_from_json_rejects_json_that_is_not_an_object(text: str) -> None:
    # Regression: a JSON array/number/string used to raise AttributeError from data.get().
    with pytest.raises(ValueError, match="not a capray tokenizer"):
        Tokenizer.from_json(text)


# --- the vocabulary counted in parts (capray.data.count_vocabulary's tasks) -------------------


@pytest.mark.parametrize("cuts", [(), (1,), (2, 3), (1, 2, 3, 4)])
def test_counts_of_parts_summed_rank_as_fit_does(cuts: tuple[int, ...]) -> None:
    # Ties everywhere: a, b, c twice each (b first); d, e once; specials counted, never kept.
    captions = ["b a", "a b c", "<start> c d", "E <end>", "d <pad>"]
    totals: dict[str, list[int]] = {}
    longest = 0
    bounds = [0, *cuts, len(captions)]
    for lo, hi in itertools.pairwise(bounds):
        counts, long = count_words(captions[lo:hi], range(lo, hi))
        longest = max(longest, long)
        for word, (n, first) in counts.items():
            seen = totals.setdefault(word, [0, first])
            seen[0] += n
            seen[1] = min(seen[1], first)
    for vocab_size in (5, 6, 7, 100):
        expected = Tokenizer.fit(captions, vocab_size)
        assert Tokenizer.from_ranked(rank_words(totals, vocab_size - 3), longest, vocab_size) == expected
    assert Tokenizer.fit(captions, 5).words[4:] == ["b", "a"]  # the cut falls inside the tie


def test_first_appearance_orders_by_caption_then_position() -> None:
    counts, longest = count_words(["x y", "y z"], [7, 9])
    assert counts == {
        "x": [1, 7 << POSITION_BITS],
        "y": [2, (7 << POSITION_BITS) | 1],
        "z": [1, (9 << POSITION_BITS) | 1],
    }
    assert longest == 4
