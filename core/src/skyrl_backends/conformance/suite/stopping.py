"""Stop conditions: stop token ids, EOS, stop strings, min_new_tokens; the same semantics on every
backend (written in :mod:`skyrl_backends.sampling`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from skyrl_backends.conformance.harness import ConformanceHarness
from skyrl_backends.conformance.markers import feature
from skyrl_backends.conformance.oracles import expected_stop_string_cut
from skyrl_backends.conformance.suite.base import ConformanceTestBase, require_parameter


def _first_repeat_free_index(tokens: tuple[int, ...] | list[int], start: int) -> int:
    """An index >= start whose token does not occur earlier in ``tokens``."""
    for i in range(start, len(tokens)):
        if tokens[i] not in tokens[:i]:
            return i
    raise AssertionError(f"suite self-check: no fresh token after position {start} in {tokens}")


def _printable_piece(text: str, start: int, length: int = 2) -> str | None:
    """The first ``length`` characters of ``text`` from ``start`` on that are printable and not all
    blank (the tiny model's byte-level output is full of partial characters)."""
    for i in range(start, len(text) - length + 1):
        piece = text[i:i + length]
        if piece.isprintable() and piece.strip() and "\ufffd" not in piece:
            return piece
    return None


def own_greedy(conformance: ConformanceHarness, prompt: list[int], length: int) -> list[int]:
    """The engine's greedy output without stop conditions (itself checked against the reference),
    from which each test derives where a stop condition must cut it: exact in every dtype."""
    full = conformance.greedy([prompt], length, ignore_eos=True)[0]
    conformance.assert_greedy_parity(prompt, full, length, ignore_eos=True)
    return full.token_ids


def stop_string_cases(conformance: ConformanceHarness, prompts: list[list[int]], length: int
                      ) -> Iterator[tuple[list[int], tuple[int, ...] | list[int], str, int, str]]:
    """``(prompt, full output, stop string, tokens to keep, expected text)`` for each prompt whose
    greedy output has a usable two-character stop string in the middle of its text (so it may end
    inside a token)."""
    decode = conformance.reference.decode
    for prompt in prompts:
        full = own_greedy(conformance, prompt, length)
        text = decode(full)
        middle = len(text) // 2
        stop = text[middle:middle + 2]
        if len(stop) < 2 or "\ufffd" in stop or not stop.strip():
            continue
        expected = expected_stop_string_cut(full, stop, decode)
        assert expected is not None
        yield prompt, full, stop, expected[0], expected[1]


class StopConditionTests(ConformanceTestBase):
    feature_row = "Stop token ids and EOS"

    def test_stop_token_ids_end_output(self, conformance: ConformanceHarness) -> None:
        prompts = conformance.reference.prompts(3, seed=21)
        for prompt in prompts:
            full = own_greedy(conformance, prompt, 16)
            k = _first_repeat_free_index(full, 3)
            c = conformance.greedy([prompt], 16, stop_token_ids=[full[k]], ignore_eos=True)[0]
            assert c.token_ids == list(full[: k + 1]), (
                f"stop token {full[k]} must end the output right after it (kept as the last token): "
                f"got {c.token_ids}, expected {list(full[: k + 1])}")
            assert c.finish_reason == "stop"
            assert c.stop_reason in (full[k], None), f"stop_reason {c.stop_reason!r}, expected {full[k]}"

    def test_eos_stops_unless_ignored(self, conformance: ConformanceHarness) -> None:
        found = conformance.reference.prompt_reaching_eos()
        if found is None:
            pytest.fail("suite self-check: no prompt of the test model reaches EOS; use a model that can emit it")
        prompt, position = found
        c = conformance.greedy([prompt], position + 8)[0]
        assert c.finish_reason == "stop" and len(c.token_ids) == position + 1, (
            f"EOS at step {position} must end the output: got {len(c.token_ids)} tokens, finish {c.finish_reason!r}")
        assert c.token_ids[-1] in conformance.reference.eos_token_ids, "EOS is kept as the last response token"
        assert c.text == conformance.reference.decode(c.token_ids), (
            f"the text of a response ending in EOS is its tokens decoded without special tokens: {c.text!r}")
        ignored = conformance.greedy([prompt], position + 8, ignore_eos=True)[0]
        assert ignored.finish_reason == "length" and len(ignored.token_ids) == position + 8
        assert ignored.token_ids[: position + 1] == c.token_ids

    @feature("Stops on the last allowed token")
    def test_stop_on_the_last_allowed_token(self, conformance: ConformanceHarness) -> None:
        # A stop token id or EOS that is also the last token max_generate_length allows is a stop:
        # finish reason "stop", the token kept, not "length".
        prompt = conformance.reference.prompts(1, seed=25)[0]
        full = own_greedy(conformance, prompt, 16)
        k = _first_repeat_free_index(full, 3)
        c = conformance.greedy([prompt], k + 1, stop_token_ids=[full[k]], ignore_eos=True)[0]
        assert (c.token_ids, c.finish_reason) == (list(full[: k + 1]), "stop"), (
            f"stop token {full[k]} as token {k + 1} of max_generate_length={k + 1}: got {c.token_ids}, finish "
            f"{c.finish_reason!r}; expected {list(full[: k + 1])}, 'stop'")
        assert c.stop_reason in (full[k], None), f"stop_reason {c.stop_reason!r}, expected {full[k]}"
        found = conformance.reference.prompt_reaching_eos()
        if found is None:
            pytest.fail("suite self-check: no prompt of the test model reaches EOS; use a model that can emit it")
        eos_prompt, position = found
        c = conformance.greedy([eos_prompt], position + 1)[0]
        assert c.finish_reason == "stop" and len(c.token_ids) == position + 1, (
            f"EOS as the last allowed token (max_generate_length={position + 1}) must finish with 'stop': got "
            f"{len(c.token_ids)} tokens, finish {c.finish_reason!r}")
        assert c.token_ids[-1] in conformance.reference.eos_token_ids

    @feature("Stop strings")
    def test_stop_strings(self, conformance: ConformanceHarness) -> None:
        require_parameter(conformance, "stop", {"max_generate_length": 2, "stop": ["ab"]})
        checked = 0
        for prompt, full, stop, k, expected_text in stop_string_cases(
                conformance, conformance.reference.prompts(6, seed=22), 24):
            c = conformance.greedy([prompt], 24, stop=[stop], ignore_eos=True)[0]
            assert c.token_ids == list(full[:k]), (
                f"stop string {stop!r}: output must end at the token completing it; got {c.token_ids}, "
                f"expected {list(full[:k])}")
            assert c.finish_reason == "stop"
            assert c.stop_reason == stop, f"stop_reason {c.stop_reason!r}, expected {stop!r}"
            assert c.text == expected_text, f"text must end with the stop string: {c.text!r} vs {expected_text!r}"
            checked += 1
        assert checked >= 2, "suite self-check: too few usable stop strings in the test model's output"

    @feature("Stop strings")
    def test_stop_string_not_reached(self, conformance: ConformanceHarness) -> None:
        require_parameter(conformance, "stop", {"max_generate_length": 2, "stop": ["ab"]})
        prompt = conformance.reference.prompts(1, seed=23)[0]
        full = own_greedy(conformance, prompt, 10)
        never = "\u2603\u2603"  # a snowman pair: not in the byte-level vocabulary's likely output
        assert never not in conformance.reference.decode(full)
        c = conformance.greedy([prompt], 10, stop=[never], ignore_eos=True)[0]
        assert c.token_ids == list(full) and c.finish_reason == "length"

    @feature("Several stop strings")
    def test_several_stop_strings(self, conformance: ConformanceHarness) -> None:
        # The output ends at the first token completing any of the strings, whatever their order in
        # the list, with that string as the stop reason; also when that token is the last allowed.
        require_parameter(conformance, "stop", {"max_generate_length": 2, "stop": ["ab"]})
        decode = conformance.reference.decode
        never = "\u2603\u2603"
        checked = 0
        prompts = conformance.reference.prompts(4, seed=26)
        # The engine's greedy outputs without stop conditions, in one batch, each checked against the reference.
        for prompt, unstopped in zip(prompts, conformance.greedy(prompts, 24, ignore_eos=True), strict=True):
            conformance.assert_greedy_parity(prompt, unstopped, 24, ignore_eos=True)
            full = unstopped.token_ids
            text = decode(full)
            early, late = _printable_piece(text, len(text) // 3), _printable_piece(text, 2 * len(text) // 3)
            if early is None or late is None or early == late:
                continue
            cuts = {s: expected_stop_string_cut(full, s, decode) for s in (early, late)}
            if cuts[early] is None or cuts[late] is None or cuts[early][0] == cuts[late][0]:
                continue  # both complete on the same token: not the case under test
            first = min((early, late), key=lambda s: cuts[s][0])
            k, expected_text = cuts[first]
            for length in (24, k):
                c = conformance.greedy([prompt], length, stop=[never, late, early], ignore_eos=True)[0]
                assert (c.token_ids, c.finish_reason, c.stop_reason) == (list(full[:k]), "stop", first), (
                    f"stop strings {[never, late, early]} with max_generate_length={length}: got {c.token_ids}, "
                    f"finish {c.finish_reason!r}, stop_reason {c.stop_reason!r}; expected the cut of {first!r}: "
                    f"{list(full[:k])}")
                assert c.text == expected_text, f"text must end with {first!r}: {c.text!r} vs {expected_text!r}"
            checked += 1
            if checked == 2:
                break
        assert checked == 2, "suite self-check: too few usable pairs of stop strings in the test model's output"

    @feature("min_new_tokens")
    def test_min_new_tokens_defers_stop(self, conformance: ConformanceHarness) -> None:
        # At the boundary from both sides: a stop token id as token min_new_tokens + 1 ends the
        # output; as token min_new_tokens it may not.
        require_parameter(conformance, "min_new_tokens",
                          {"max_generate_length": 4, "min_new_tokens": 2})
        prompt = conformance.reference.prompts(1, seed=24)[0]
        full = own_greedy(conformance, prompt, 16)
        k = _first_repeat_free_index(full, 1)
        stop_id = full[k]
        allowed = conformance.greedy([prompt], 16, stop_token_ids=[stop_id], min_new_tokens=k, ignore_eos=True)[0]
        assert (allowed.token_ids, allowed.finish_reason) == (list(full[: k + 1]), "stop"), (
            f"min_new_tokens={k}: stop token {stop_id} as token {k + 1} must end the output; got "
            f"{allowed.token_ids}, finish {allowed.finish_reason!r}")
        c = conformance.greedy([prompt], 16, stop_token_ids=[stop_id], min_new_tokens=k + 1, ignore_eos=True)[0]
        assert stop_id not in c.token_ids[: k + 1], (
            f"min_new_tokens={k + 1}: stop token {stop_id} was generated as token {c.token_ids.index(stop_id) + 1}")
        assert len(c.token_ids) >= k + 1
        conformance.assert_greedy_parity(prompt, c, 16, stop_token_ids=[stop_id], min_new_tokens=k + 1,
                                         ignore_eos=True)

    @feature("min_new_tokens")
    def test_min_new_tokens_defers_eos(self, conformance: ConformanceHarness) -> None:
        require_parameter(conformance, "min_new_tokens",
                          {"max_generate_length": 4, "min_new_tokens": 2})
        found = conformance.reference.prompt_reaching_eos()
        if found is None:
            pytest.fail("suite self-check: no prompt of the test model reaches EOS")
        prompt, position = found
        c = conformance.greedy([prompt], position + 6, min_new_tokens=position + 3)[0]
        assert len(c.token_ids) >= position + 3, "EOS ended the output before min_new_tokens"
        assert not set(c.token_ids[: position + 2]) & conformance.reference.eos_token_ids
        conformance.assert_greedy_parity(prompt, c, position + 6, min_new_tokens=position + 3)
