"""Assembling one sequence from segments: lengths, budgets, log-probs and the stop-string seam."""

from engine_doubles import decode, next_token
from skyrl_backends.client.continuation import Continuation
from skyrl_backends.sampling import SamplingParams
from skyrl_backends.types import Completion


def run_rule(prompt, count):
    tokens = []
    for _ in range(count):
        tokens.append(next_token(prompt + tokens))
    return tokens


def test_budget_and_min_new_tokens_shrink_by_what_was_generated():
    state = Continuation([5, 6], SamplingParams(max_generate_length=10, min_new_tokens=4, seed=7))
    state.absorb(Completion([1, 2, 3], "abort", logprobs=[-1.0, -2.0, -3.0]))
    assert state.needs_more and state.remaining == 7
    assert state.next_prompt() == [5, 6, 1, 2, 3]
    params = state.next_params()
    assert (params.max_generate_length, params.min_new_tokens, params.seed) == (7, 1, 10)
    state.absorb(Completion([4] * 7, "length", logprobs=[-0.5] * 7))
    out = state.result()
    assert out.token_ids == [1, 2, 3] + [4] * 7 and out.finish_reason == "length"
    assert out.logprobs == [-1.0, -2.0, -3.0] + [-0.5] * 7


def test_abort_after_the_last_token_counts_as_length():
    state = Continuation([5], SamplingParams(max_generate_length=2))
    state.absorb(Completion([1, 2], "abort"))
    assert not state.needs_more and state.result().finish_reason == "length"


def test_a_stop_string_across_the_seam_is_found_and_the_output_truncated():
    prompt = [3, 4, 5]
    full = run_rule(prompt, 30)
    text = decode(full)
    stop = text[9:12]  # characters of tokens 9..11
    assert text.find(stop) == 9, "pick a stop string that first occurs at position 9"
    params = SamplingParams(max_generate_length=30, stop=(stop,))
    state = Continuation(prompt, params)
    state.absorb(Completion(full[:10], "abort", text=decode(full[:10])))  # seam inside the stop string
    # The second engine sees only tokens 10.. and misses the match: it runs to the length.
    state.absorb(Completion(full[10:], "length", text=decode(full[10:])))
    out = state.result(decode)
    assert out.token_ids == full[:12]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:12]


def test_without_a_decoder_texts_are_joined():
    state = Continuation([3], SamplingParams(max_generate_length=4))
    state.absorb(Completion([3, 4], "abort", text="ab"))
    state.absorb(Completion([5, 6], "length", text="cd"))
    assert state.result().text == "abcd"


def test_detokenize_off_matches_stop_strings_across_the_seam_but_returns_no_text():
    prompt = [3, 4, 5]
    full = run_rule(prompt, 30)
    stop = decode(full)[9:12]
    state = Continuation(prompt, SamplingParams(max_generate_length=30, stop=(stop,), detokenize=False))
    state.absorb(Completion(full[:10], "abort"))
    state.absorb(Completion(full[10:], "length"))
    out = state.result(decode)
    assert out.token_ids == full[:12] and (out.finish_reason, out.stop_reason) == ("stop", stop)
    assert out.text is None
