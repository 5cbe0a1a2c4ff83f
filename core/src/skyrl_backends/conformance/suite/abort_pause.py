"""Abort, pause and resume: an aborted request returns what it generated with finish reason
``"abort"``; pausing holds requests without corrupting them."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from skyrl_backends import capabilities
from skyrl_backends.conformance.harness import ConformanceHarness
from skyrl_backends.conformance.markers import feature, requires
from skyrl_backends.conformance.suite.base import ConformanceTestBase
from skyrl_backends.conformance.suite.races import WAIT_S, ran_to_the_end, retry_lost_race, until_inflight
from skyrl_backends.sampling import SamplingParams

# While paused, an engine may still hand out the tokens of steps that ran before the pause took
# effect (at most a few); one that keeps decoding hands out many more while the test watches.
PAUSE_SLACK_TOKENS = 8
PAUSE_WATCH_S = 1.0


class AbortPauseTests(ConformanceTestBase):
    feature_row = "Abort"

    def _assert_prefix_of_reference(self, conformance: ConformanceHarness, prompt: list[int],
                                    tokens: list[int]) -> None:
        if not tokens:
            return
        expected = conformance.reference.greedy(prompt, len(tokens), ignore_eos=True)
        if conformance.greedy_margin == 0.0:
            assert tuple(tokens) == expected.token_ids, "the partial output of an aborted request is wrong"

    @requires(capabilities.ABORT)
    def test_abort_one_request(self, conformance: ConformanceHarness) -> None:
        engine = conformance.engine
        prompts = conformance.reference.prompts(2, seed=91)
        long = SamplingParams(max_generate_length=conformance.long_generation, temperature=0.0, ignore_eos=True)
        short = SamplingParams(max_generate_length=6, temperature=0.0)

        async def abort_first(attempt: int):
            victim_id = f"victim-{attempt}"
            victim = asyncio.ensure_future(engine.generate([prompts[0]], long, request_ids=[victim_id]))
            await until_inflight(engine)
            await asyncio.sleep(0.05)
            await engine.abort([victim_id])
            bystander = await engine.generate([prompts[1]], short)
            return await victim, bystander

        victim, bystander = retry_lost_race(lambda n: conformance.run(abort_first(n)),
                                            lambda result: ran_to_the_end(result[0][0], long), "abort one request")
        c = victim[0]
        assert c.finish_reason == "abort", f"an aborted request must finish with 'abort', got {c.finish_reason!r}"
        assert len(c.token_ids) < conformance.long_generation
        self._assert_prefix_of_reference(conformance, prompts[0], c.token_ids)
        conformance.assert_greedy_parity(prompts[1], bystander[0], 6)
        assert engine.num_inflight == 0

    @requires(capabilities.ABORT)
    def test_abort_all(self, conformance: ConformanceHarness) -> None:
        engine = conformance.engine
        prompts = conformance.reference.prompts(3, seed=92)
        long = SamplingParams(max_generate_length=conformance.long_generation, temperature=0.0, ignore_eos=True)

        async def abort_everything():
            tasks = [asyncio.ensure_future(engine.generate([p], long)) for p in prompts]
            await until_inflight(engine, len(prompts))
            await asyncio.sleep(0.05)
            await engine.abort()
            return await asyncio.gather(*tasks)

        outs = retry_lost_race(lambda _: conformance.run(abort_everything()),
                               lambda outs: any(ran_to_the_end(out[0], long) for out in outs), "abort all")
        for prompt, out in zip(prompts, outs, strict=True):
            assert out[0].finish_reason == "abort" and len(out[0].token_ids) < conformance.long_generation
            self._assert_prefix_of_reference(conformance, prompt, out[0].token_ids)
        prompt = prompts[0]
        conformance.assert_greedy_parity(prompt, conformance.greedy([prompt], 6)[0], 6)

    @requires(capabilities.ABORT)
    def test_abort_unknown_id_is_harmless(self, conformance: ConformanceHarness) -> None:
        conformance.run(conformance.engine.abort(["no-such-request"]))
        prompt = conformance.reference.prompts(1, seed=93)[0]
        conformance.assert_greedy_parity(prompt, conformance.greedy([prompt], 6)[0], 6)

    @feature("Pause / resume")
    @requires(capabilities.NATIVE_PAUSE)
    def test_pause_resume_keeps_requests(self, conformance: ConformanceHarness) -> None:
        engine = conformance.engine
        prompt = conformance.reference.prompts(1, seed=94)[0]
        params = SamplingParams(max_generate_length=40, temperature=0.0, ignore_eos=True)

        async def paused_midway():
            task = asyncio.ensure_future(engine.generate([prompt], params))
            await until_inflight(engine)
            await engine.pause_generation()
            assert engine.paused
            await asyncio.sleep(0.1)
            paused_done = task.done()
            await engine.resume_generation()
            return paused_done, await task

        paused_done, out = conformance.run(paused_midway())
        assert not paused_done, "a paused engine finished a 40-token request while paused"
        assert out[0].finish_reason == "length"
        conformance.assert_greedy_parity(prompt, out[0], 40, ignore_eos=True)

    @feature("Nothing generated while paused")
    @requires(capabilities.NATIVE_PAUSE, capabilities.STREAMING)
    def test_nothing_is_generated_while_paused(self, conformance: ConformanceHarness) -> None:
        # Watched through the stream: once pause_generation() returns, no more than a few tokens
        # (of steps already under way) may arrive until resume, however long one waits; a correct
        # engine passes whatever the machine's speed. Then the request finishes as if never paused.
        engine = conformance.engine
        prompt = conformance.reference.prompts(1, seed=96)[0]
        params = SamplingParams(max_generate_length=64, temperature=0.0, ignore_eos=True)

        async def watch_while_paused() -> tuple[int, int, Any]:
            received, wanted, finals = [0], [2], []
            reached = asyncio.Event()

            async def read() -> None:
                async for chunk in engine.generate_stream([prompt], params):
                    received[0] += len(chunk.token_ids)
                    if received[0] >= wanted[0]:
                        reached.set()
                    if chunk.completion is not None:
                        finals.append(chunk.completion)

            reader = asyncio.ensure_future(read())
            await asyncio.wait_for(reached.wait(), 120)
            await engine.pause_generation()
            at_pause = received[0]
            wanted[0] = at_pause + PAUSE_SLACK_TOKENS
            reached.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(reached.wait(), PAUSE_WATCH_S)
            while_paused = received[0] - at_pause
            await engine.resume_generation()
            await reader
            return at_pause, while_paused, finals[0]

        at_pause, while_paused, final = conformance.run(watch_while_paused())
        assert while_paused < PAUSE_SLACK_TOKENS, (
            f"{while_paused} tokens arrived while paused (after {at_pause} before the pause): the engine kept "
            f"generating")
        assert final.finish_reason == "length"
        conformance.assert_greedy_parity(prompt, final, 64, ignore_eos=True)

    @feature("Pause / resume")
    @requires(capabilities.NATIVE_PAUSE, capabilities.ABORT)
    def test_abort_while_paused(self, conformance: ConformanceHarness) -> None:
        engine = conformance.engine
        prompt = conformance.reference.prompts(1, seed=95)[0]
        params = SamplingParams(max_generate_length=conformance.long_generation, temperature=0.0, ignore_eos=True)

        async def abort_paused():
            task = asyncio.ensure_future(engine.generate([prompt], params))
            await until_inflight(engine)
            await engine.pause_generation()
            await engine.abort()
            try:  # a paused engine that ignores the abort would hold the request, and the suite, forever
                return await asyncio.wait_for(asyncio.shield(task), WAIT_S)
            except asyncio.TimeoutError:
                return None
            finally:
                await engine.resume_generation()

        out = conformance.run(abort_paused())
        assert out is not None, f"a request aborted while paused had not returned {WAIT_S:.0f} s later"
        assert out[0].finish_reason == "abort"
        self._assert_prefix_of_reference(conformance, prompt, out[0].token_ids)
