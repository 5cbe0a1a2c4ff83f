"""The incremental detokenizer and the stop-string matcher built on it, on a byte-level decoder
(each token id is one byte, as in byte-level BPE): exact text, and O(1) decoding work per token,
counted as the number of token ids handed to ``decode`` (no clock involved)."""

import random

import pytest
from skyrl_backends.detokenize import MAX_WINDOW_TOKENS, IncrementalDetokenizer, incremental_pieces
from skyrl_backends.stopping import StopStringMatcher


class CountingDecoder:
    """``bytes(ids).decode`` that counts how many token ids it was asked to decode."""

    def __init__(self):
        self.decoded_tokens = 0

    def __call__(self, ids):
        self.decoded_tokens += len(ids)
        return bytes(ids).decode("utf-8", errors="replace")


TEXT = ("Grüße aus Köln — 東京 and 🙂 emoji, plain ASCII too. " * 40).encode()


def test_deltas_join_to_the_whole_decode_less_an_incomplete_character():
    rng = random.Random(0)
    for _ in range(200):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80))) if rng.random() < 0.5 \
            else TEXT[: rng.randrange(1, 300)]
        decode = CountingDecoder()
        detokenizer = IncrementalDetokenizer(decode)
        joined, k = "", 0
        while k < len(data):
            step = rng.randrange(1, 4)
            joined += detokenizer.push(list(data[k:k + step]))
            k += step
        whole = data.decode("utf-8", errors="replace")
        assert whole.startswith(joined)
        assert joined == whole or joined == whole.rstrip("\ufffd") or len(data) > MAX_WINDOW_TOKENS


def test_a_split_character_is_held_until_its_last_byte():
    detokenizer = IncrementalDetokenizer(CountingDecoder())
    assert [detokenizer.push([b]) for b in "a€".encode()] == ["a", "", "", "€"]


@pytest.mark.parametrize("length", [512, 4096])
def test_decoding_work_per_token_is_constant(length):
    data = (TEXT * (length // len(TEXT) + 1))[:length]
    decode = CountingDecoder()
    detokenizer = IncrementalDetokenizer(decode)
    for b in data:
        detokenizer.push([b])
    # A bounded window: at most a few dozen token ids decoded per token, whatever the length
    # (the whole-response decode this replaced costs length / 2 per token on average).
    assert decode.decoded_tokens <= 24 * length


def test_garbage_bytes_do_not_grow_the_window():
    decode = CountingDecoder()
    detokenizer = IncrementalDetokenizer(decode)
    out = "".join(detokenizer.push([0x80]) for _ in range(1000))  # continuation bytes, never valid
    assert out == "\ufffd" * len(out) and len(out) >= 1000 - MAX_WINDOW_TOKENS - 1
    assert decode.decoded_tokens <= 40 * 1000


def test_pieces_join_to_the_final_text_even_when_a_stop_string_cut_it():
    data = list("abc€xyz".encode())
    pieces = incremental_pieces(CountingDecoder(), data, "abc€x")
    assert "".join(pieces) == "abc€x" and len(pieces) == len(data)
    assert pieces[3:6] == ["", "", "€"]


def test_the_stop_matcher_finds_the_first_match_and_the_text_up_to_it():
    decode = CountingDecoder()
    matcher = StopStringMatcher(["Köln", "aus"], decode)
    data = list(TEXT)
    for end in range(1, len(data) + 1):
        found = matcher.feed(data[:end])
        if found is not None:
            break
    assert found == ("aus", "Grüße aus")
    assert data[:end] == list("Grüße aus".encode())


def test_the_stop_matcher_does_not_decode_the_whole_response_after_every_token():
    decode = CountingDecoder()
    data = list((TEXT * 8)[:8192])
    matcher = StopStringMatcher(["never appears"], decode)
    for end in range(1, len(data) + 1):
        assert matcher.feed(data[:end]) is None
    assert decode.decoded_tokens <= 24 * len(data)  # before: about len(data)**2 / 2, 33.5 million here


def test_the_stop_matcher_matches_a_string_split_across_multibyte_tokens():
    matcher = StopStringMatcher(["東京"], CountingDecoder())
    data = list("xx 東京 yy".encode())
    results = [matcher.feed(data[:end]) for end in range(1, len(data) + 1)]
    first = next(k for k, r in enumerate(results) if r is not None)
    assert results[first] == ("東京", "xx 東京") and first + 1 == len("xx 東京".encode())


def test_the_stop_matcher_refuses_a_shrinking_response():
    matcher = StopStringMatcher(["z"], CountingDecoder())
    matcher.feed([97, 98])
    with pytest.raises(ValueError, match="shrank"):
        matcher.feed([97])


def test_the_stop_matcher_sees_the_text_a_whole_decode_gives_incomplete_characters_included():
    # A stop string that ends in U+FFFD matches where a whole decode first shows it: at the token
    # that starts the incomplete character, not when a later token settles it.
    matcher = StopStringMatcher(["a\ufffd"], CountingDecoder())
    data = list(b"xa") + [0xE2, 0x82, 0xAC]
    results = [matcher.feed(data[:end]) for end in range(1, len(data) + 1)]
    assert results[:2] == [None, None] and results[2] == ("a\ufffd", "xa\ufffd")
