"""Streaming (``generate_stream``): the chunks of a completion add up to exactly what ``generate``
returns for the same request, whatever ends it (length, stop strings, stop ids, abort), with one
log-probability per streamed token. Every backend streams through the facade; a backend that
declares ``streaming`` must also hand its tokens out before the completion ends."""

from __future__ import annotations

import asyncio
from typing import Any

from skyrl_backends import capabilities
from skyrl_backends.conformance.harness import ConformanceHarness
from skyrl_backends.conformance.markers import requires
from skyrl_backends.conformance.suite.base import ConformanceTestBase, require_parameter
from skyrl_backends.conformance.suite.races import WAIT_S, ran_to_the_end, retry_lost_race, until_inflight
from skyrl_backends.conformance.suite.stopping import _first_repeat_free_index, own_greedy, stop_string_cases
from skyrl_backends.sampling import SamplingParams
from skyrl_backends.types import Completion, StreamChunk


async def _collect(stream: Any) -> list[StreamChunk]:
    return [chunk async for chunk in stream]


def stream(conformance: ConformanceHarness, prompts: list[list[int]], params: dict[str, Any],
           **request_fields: Any) -> list[StreamChunk]:
    sampling = SamplingParams.from_dict(params)
    return conformance.run(_collect(conformance.engine.generate_stream(prompts, sampling, **request_fields)))


def completions_of(chunks: list[StreamChunk], count: int) -> list[Completion]:
    """Each index's final completion, after checking it is the concatenation of that index's chunks
    and that nothing follows it."""
    finals: list[Completion] = []
    for index in range(count):
        own = [c for c in chunks if c.index == index]
        assert own, f"no chunk for completion {index}"
        assert own[-1].completion is not None and all(c.completion is None for c in own[:-1]), (
            f"completion {index}: exactly its last chunk must carry the completion")
        tokens = [t for c in own for t in c.token_ids]
        assert tokens == own[-1].completion.token_ids, (
            f"completion {index}: streamed tokens {tokens} differ from the final completion's "
            f"{own[-1].completion.token_ids}")
        finals.append(own[-1].completion)
    assert {c.index for c in chunks} == set(range(count)), "chunks for indices the request does not have"
    return finals


class StreamingTests(ConformanceTestBase):
    feature_row = "Streaming"

    def test_stream_equals_generate(self, conformance: ConformanceHarness) -> None:
        prompts = conformance.reference.prompts(3, seed=111)
        params = {"max_generate_length": 16, "temperature": 0.0}
        expected = conformance.generate(prompts, params)
        finals = completions_of(stream(conformance, prompts, params), len(prompts))
        for prompt, got, want in zip(prompts, finals, expected, strict=True):
            assert got.token_ids == want.token_ids, f"streamed {got.token_ids}, generate {want.token_ids}"
            assert (got.finish_reason, got.text) == (want.finish_reason, want.text)
            assert got.weight_version == want.weight_version
            conformance.assert_greedy_parity(prompt, got, 16)

    def test_stream_with_n_samples_follows_generate_order(self, conformance: ConformanceHarness) -> None:
        prompts = conformance.reference.prompts(2, seed=112)
        params = {"max_generate_length": 6, "temperature": 0.0, "n": 2}
        expected = conformance.generate(prompts, params)
        finals = completions_of(stream(conformance, prompts, params), 4)
        assert [c.token_ids for c in finals] == [c.token_ids for c in expected]

    @requires(capabilities.STREAMING)
    def test_tokens_arrive_before_the_end(self, conformance: ConformanceHarness) -> None:
        prompt = conformance.reference.prompts(1, seed=113)[0]
        chunks = stream(conformance, [prompt], {"max_generate_length": 32, "temperature": 0.0, "ignore_eos": True})
        (final,) = completions_of(chunks, 1)
        assert final.finish_reason == "length" and len(final.token_ids) == 32
        early = [c for c in chunks if c.completion is None and c.token_ids]
        assert len(early) > 1, (
            f"a 32-token generation arrived in {len(early)} chunk(s) before its final one: a backend that "
            f"declares streaming must hand out tokens as they are generated")

    @requires(capabilities.ABORT)
    def test_abort_mid_stream_returns_partial_output(self, conformance: ConformanceHarness) -> None:
        engine = conformance.engine
        prompt = conformance.reference.prompts(1, seed=114)[0]
        long = SamplingParams(max_generate_length=conformance.long_generation, temperature=0.0, ignore_eos=True)
        streaming = conformance.capabilities.streaming

        async def abort_midway(attempt: int) -> list[StreamChunk]:
            victim_id = f"streamed-victim-{attempt}"
            chunks: list[StreamChunk] = []
            started = asyncio.Event()

            async def read() -> None:
                async for chunk in engine.generate_stream([prompt], long, request_ids=[victim_id]):
                    chunks.append(chunk)
                    if sum(len(c.token_ids) for c in chunks) >= 2:
                        started.set()

            reader = asyncio.ensure_future(read())
            if streaming:  # abort once tokens have arrived; otherwise once the request runs
                await asyncio.wait_for(started.wait(), WAIT_S)
            else:
                await until_inflight(engine)
                await asyncio.sleep(0.05)
            await engine.abort([victim_id])
            await reader
            return chunks

        def finished_first(chunks: list[StreamChunk]) -> bool:
            return any(c.completion is not None and ran_to_the_end(c.completion, long) for c in chunks)

        chunks = retry_lost_race(lambda n: conformance.run(abort_midway(n)), finished_first, "abort mid-stream")
        (final,) = completions_of(chunks, 1)
        assert final.finish_reason == "abort", f"an aborted stream must end with 'abort', got {final.finish_reason!r}"
        assert len(final.token_ids) < conformance.long_generation
        if streaming:
            assert len(final.token_ids) >= 2, "the tokens streamed before the abort are part of the partial output"
        if final.token_ids and conformance.greedy_margin == 0.0:
            expected = conformance.reference.greedy(prompt, len(final.token_ids), ignore_eos=True)
            assert tuple(final.token_ids) == expected.token_ids, "the partial output of an aborted stream is wrong"
        assert engine.num_inflight == 0

    def test_stop_token_id_ends_stream(self, conformance: ConformanceHarness) -> None:
        prompt = conformance.reference.prompts(1, seed=115)[0]
        full = own_greedy(conformance, prompt, 16)
        k = _first_repeat_free_index(full, 3)
        (final,) = completions_of(stream(conformance, [prompt], {
            "max_generate_length": 16, "temperature": 0.0, "stop_token_ids": [full[k]], "ignore_eos": True}), 1)
        assert final.token_ids == list(full[: k + 1]) and final.finish_reason == "stop"

    def test_stop_string_ends_stream(self, conformance: ConformanceHarness) -> None:
        require_parameter(conformance, "stop", {"max_generate_length": 2, "stop": ["ab"]})
        checked = 0
        for prompt, full, stop, k, expected_text in stop_string_cases(
                conformance, conformance.reference.prompts(4, seed=116), 24):
            (final,) = completions_of(stream(conformance, [prompt], {
                "max_generate_length": 24, "temperature": 0.0, "stop": [stop], "ignore_eos": True}), 1)
            assert final.token_ids == list(full[:k]), (
                f"stop string {stop!r}: a stream must end at the token completing it; got {final.token_ids}, "
                f"expected {list(full[:k])}")
            assert (final.finish_reason, final.stop_reason, final.text) == ("stop", stop, expected_text)
            checked += 1
        assert checked >= 1, "suite self-check: no usable stop string in the test model's output"

    def test_logprobs_align_with_streamed_tokens(self, conformance: ConformanceHarness) -> None:
        caps = conformance.capabilities
        top = min(2, caps.max_top_logprobs) if caps.top_logprobs else 0
        prompts = conformance.reference.prompts(2, seed=117)
        params = {"max_generate_length": 12, "temperature": 0.0, "logprobs": top, "ignore_eos": True}
        chunks = stream(conformance, prompts, params)
        finals = completions_of(chunks, len(prompts))
        for index, final in enumerate(finals):
            own = [c for c in chunks if c.index == index]
            for c in own:
                assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids), (
                    f"chunk of {len(c.token_ids)} tokens carries "
                    f"{None if c.logprobs is None else len(c.logprobs)} log-probabilities")
                if top:
                    assert c.top_logprobs is not None and len(c.top_logprobs) == len(c.token_ids)
            assert [x for c in own for x in c.logprobs] == final.logprobs
            if top:
                assert [x for c in own for x in c.top_logprobs] == final.top_logprobs
