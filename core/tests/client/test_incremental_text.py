"""IncrementalText, the HTTP endpoint's streaming detokenizer, on a byte-level decoder (each token id
is one byte, as in byte-level BPE): deltas never take text back and join to the final text."""

import pytest

pytest.importorskip("fastapi")

from skyrl_backends.http.streaming import IncrementalText  # noqa: E402


def decode(ids):
    return bytes(ids).decode("utf-8", errors="replace")


def stream(text_bytes, stop=(), final=None):
    text = IncrementalText(decode, stop)
    deltas = [text.feed([b]) for b in text_bytes]
    deltas.append(text.finish(final if final is not None else decode(list(text_bytes))))
    return deltas


def test_multibyte_characters_are_held_until_complete():
    deltas = stream("añb€".encode())
    assert "".join(deltas) == "añb€"
    assert "\ufffd" not in "".join(deltas[:-1])
    assert deltas[:2] == ["a", ""]  # the first byte of "ñ" is held back


def test_stop_strings_hold_back_what_a_later_token_could_cut():
    # The engine stops at "xyz" and returns the text cut after it; the deltas never ran past it.
    data = b"abcxyzdef"
    final = "abcxyz"
    deltas = stream(data[:6], stop=["xyz"], final=final)
    assert "".join(deltas) == final
    assert all(len("".join(deltas[: k + 1])) <= max(0, k + 1 - 2) for k in range(6))


def test_a_final_text_that_contradicts_the_deltas_is_an_error():
    text = IncrementalText(decode)
    text.feed(list(b"abc"))
    with pytest.raises(ValueError, match="prefix"):
        text.finish("xbc")


def test_streamed_text_decodes_a_bounded_window_per_token():
    calls = []

    def counting(ids):
        calls.append(len(ids))
        return decode(ids)

    text = IncrementalText(counting, stop=["never"])
    data = ("Grüße, 東京 🙂 " * 400).encode()
    deltas = [text.feed([b]) for b in data]
    deltas.append(text.finish(decode(list(data))))
    assert "".join(deltas) == decode(list(data))
    assert max(calls) <= 40 and sum(calls) <= 24 * len(data)  # before: the whole text every token
