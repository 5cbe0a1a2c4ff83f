"""Exact stop strings over a streamed token list (pure; a toy vocabulary stands in for a tokenizer)."""

import pytest

from skyrl_backend_sglang.stop_strings import StopStringWatch

VOCAB = {0: "Hel", 1: "lo", 2: " wor", 3: "ld", 4: "!\n\nx", 5: "\n", 6: "abc"}


def decode(ids):
    return "".join(VOCAB[i] for i in ids)


def test_a_string_spanning_tokens_stops_at_the_completing_token():
    watch = StopStringWatch(["lo wo"], decode)
    assert watch.feed([0, 1]) is None
    match = watch.feed([0, 1, 2, 3])  # streamed in chunks: the match is at token 2, not 3
    assert (match.num_tokens, match.stop, match.text) == (3, "lo wo", "Hello wo")


def test_a_token_holding_more_than_the_string_trims_the_text():
    match = StopStringWatch(["\n\n"], decode).feed([0, 4, 6])
    assert match.num_tokens == 2 and match.text == "Hel!\n\n"


def test_the_earliest_of_several_strings_wins():
    match = StopStringWatch(["ld", "wor"], decode).feed([0, 1, 2, 3])
    assert match.stop == "wor" and match.num_tokens == 3


def test_no_match_and_no_strings():
    assert StopStringWatch(["zzz"], decode).feed([0, 1, 2]) is None
    assert StopStringWatch([], decode).feed([0, 1]) is None


def test_a_stream_that_rewrites_history_is_an_error():
    watch = StopStringWatch(["zzz"], decode)
    watch.feed([0, 1])
    with pytest.raises(ValueError, match="extension"):
        watch.feed([1, 1, 2])


def test_watched_stop_ids_stop_at_the_first_one():
    # With ignore_eos SGLang drops stop ids, so the plugin watches them in the stream.
    match = StopStringWatch([], decode, stop_token_ids=[3, 2]).feed([0, 1, 2, 3])
    assert (match.num_tokens, match.stop, match.text) == (3, 2, "Hello wor")


def test_the_earlier_of_a_stop_id_and_a_stop_string_wins():
    assert StopStringWatch(["Hello"], decode, stop_token_ids=[2]).feed([0, 1, 2]).stop == "Hello"
    assert StopStringWatch(["ld"], decode, stop_token_ids=[2]).feed([0, 1, 2, 3]).stop == 2
