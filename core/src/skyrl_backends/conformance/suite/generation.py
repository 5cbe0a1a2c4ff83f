"""Generation contract: shape, order and content of what ``generate`` returns."""

from __future__ import annotations

import pytest

from skyrl_backends.conformance.harness import ConformanceHarness
from skyrl_backends.conformance.markers import feature
from skyrl_backends.conformance.suite.base import ConformanceTestBase
from skyrl_backends.conformance.suite.logprobs import LogprobCheck
from skyrl_backends.errors import SkyRLBackendsError
from skyrl_backends.types import FINISH_REASONS, GenerateOutput

# The long-sequence test's prompt and response, in tokens (scaled down when the engine's context is
# shorter): hundreds of positions, well past the 128-token windows and caches that short tests
# never leave, yet one teacher-forced reference pass per prompt to check.
LONG_PROMPT = 160
LONG_RESPONSE = 96


class GenerationContractTests(ConformanceTestBase):
    feature_row = "Generation contract"

    def test_output_shape_and_types(self, conformance: ConformanceHarness) -> None:
        prompts = conformance.reference.prompts(3, seed=1)
        out = conformance.greedy(prompts, 6)
        assert isinstance(out, GenerateOutput) and len(out) == len(prompts)
        for c in out:
            assert c.finish_reason in FINISH_REASONS
            assert 1 <= len(c.token_ids) <= 6
            assert all(isinstance(t, int) and 0 <= t < conformance.reference.vocab_size for t in c.token_ids)
            assert c.logprobs is None, "logprobs were not asked for"
            assert c.request_id, "every completion carries its request id"
            assert c.weight_version == conformance.engine.weight_version

    def test_outputs_keep_input_order(self, conformance: ConformanceHarness) -> None:
        # Prompts of very different lengths, so a backend that sorts or buckets them must restore order.
        prompts = conformance.reference.prompts(6, seed=2, min_len=1, max_len=40)
        ids = [f"req-{i}" for i in range(len(prompts))]
        out = conformance.generate(prompts, {"max_generate_length": 5, "temperature": 0.0}, request_ids=ids)
        assert [c.request_id for c in out] == ids
        for prompt, completion in zip(prompts, out, strict=True):
            conformance.assert_greedy_parity(prompt, completion, 5)

    @feature("Greedy parity with the reference decode")
    def test_greedy_matches_reference_decode(self, conformance: ConformanceHarness) -> None:
        prompts = conformance.reference.prompts(4, seed=3)
        out = conformance.greedy(prompts, 24)
        for prompt, completion in zip(prompts, out, strict=True):
            conformance.assert_greedy_parity(prompt, completion, 24)

    @feature("Greedy parity with the reference decode")
    def test_batched_equals_alone(self, conformance: ConformanceHarness) -> None:
        prompts = conformance.reference.prompts(5, seed=4, min_len=1, max_len=30)
        batched = conformance.greedy(prompts, 12)
        for prompt, completion in zip(prompts, batched, strict=True):
            alone = conformance.greedy([prompt], 12)[0]
            if conformance.greedy_margin == 0.0:
                assert completion.token_ids == alone.token_ids, f"prompt {prompt}: batch changes greedy output"
            else:  # half precision need not be batch-invariant; both must still be greedy
                conformance.assert_greedy_parity(prompt, completion, 12)
                conformance.assert_greedy_parity(prompt, alone, 12)

    @feature("Long sequences (hundreds of tokens)")
    def test_long_sequences_match_reference(self, conformance: ConformanceHarness) -> None:
        # A long prompt and a long response, batched with a prompt half as long (so one row is
        # padded by a hundred positions), each token checked against the reference's greedy choice
        # and log-probability at its own position: attention, positions and caches over the whole
        # context, not only the first few dozen tokens.
        scale = min(1.0, (conformance.context_length - 8) / (LONG_PROMPT + LONG_RESPONSE))
        prompt_length, response_length = int(LONG_PROMPT * scale), int(LONG_RESPONSE * scale)
        long_prompt = conformance.reference.prompts(1, seed=8, min_len=prompt_length, max_len=prompt_length)[0]
        short_prompt = conformance.reference.prompts(1, seed=9, min_len=len(long_prompt) // 2,
                                                     max_len=len(long_prompt) // 2)[0]
        prompts = [long_prompt, short_prompt]
        out = conformance.greedy(prompts, response_length, logprobs=0, ignore_eos=True)
        check = LogprobCheck(conformance)
        for prompt, c in zip(prompts, out, strict=True):
            assert len(c.token_ids) == response_length and c.finish_reason == "length", (
                f"a {len(prompt)}-token prompt: {len(c.token_ids)} of {response_length} tokens, "
                f"finish {c.finish_reason!r}")
            conformance.assert_greedy_choices(prompt, c, ignore_eos=True)
            check.add_completion(prompt, c)
        check.verify()

    def test_text_is_decoded_response(self, conformance: ConformanceHarness) -> None:
        prompt = conformance.reference.prompts(1, seed=5)[0]
        c = conformance.greedy([prompt], 10)[0]
        # Trainers and the HTTP endpoint read the text; token-in engines decode with the tokenizer.
        assert c.text is not None, "completions must carry their decoded text"
        assert c.text == conformance.reference.decode(c.token_ids)

    def test_max_length_is_exact(self, conformance: ConformanceHarness) -> None:
        prompts = conformance.reference.prompts(4, seed=6)
        for length in (1, 7):
            out = conformance.generate(prompts, {"max_generate_length": length, "temperature": 1.0,
                                                 "ignore_eos": True})
            for c in out:
                assert len(c.token_ids) == length and c.finish_reason == "length", (
                    f"max_generate_length={length}: got {len(c.token_ids)} tokens, finish {c.finish_reason!r}")

    def test_invalid_prompt_token_is_rejected(self, conformance: ConformanceHarness) -> None:
        bad = conformance.reference.vocab_size + 10
        with pytest.raises(SkyRLBackendsError, match="prompt_token_ids"):
            conformance.greedy([[1, 2, bad]], 4)
        # ...and the engine still works afterwards.
        prompt = conformance.reference.prompts(1, seed=7)[0]
        conformance.assert_greedy_parity(prompt, conformance.greedy([prompt], 4)[0], 4)

    def test_empty_prompt_is_rejected(self, conformance: ConformanceHarness) -> None:
        with pytest.raises(SkyRLBackendsError, match=r"prompt_token_ids\[0\]"):
            conformance.greedy([[]], 4)
