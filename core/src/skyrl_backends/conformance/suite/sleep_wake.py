"""Sleep and wake: a sleeping engine refuses to generate with a defined error, wakes to the same
output, and one that discarded its weights refuses until weights are synced."""

from __future__ import annotations

import asyncio

import pytest

from skyrl_backends import capabilities
from skyrl_backends.conformance.harness import ConformanceHarness
from skyrl_backends.conformance.markers import feature, requires
from skyrl_backends.conformance.suite.base import ConformanceTestBase
from skyrl_backends.conformance.suite.races import until_inflight
from skyrl_backends.conformance.suite.weight_sync import PERTURBED, perturbed
from skyrl_backends.errors import EngineAsleepError, UnsupportedCapabilityError, WeightsNotLoadedError
from skyrl_backends.sampling import SamplingParams


def _discards(conformance: ConformanceHarness, level: int) -> bool:
    threshold = conformance.capabilities.discards_weights_at_level
    return threshold is not None and level >= threshold


class SleepWakeTests(ConformanceTestBase):
    feature_row = "Sleep / wake"

    @requires(capabilities.SLEEP)
    @pytest.mark.parametrize("level", [1, 2])
    def test_sleep_wake_cycle(self, conformance: ConformanceHarness, level: int) -> None:
        if level not in conformance.capabilities.sleep_levels:
            with pytest.raises(UnsupportedCapabilityError):
                conformance.run(conformance.engine.sleep(level=level))
            pytest.skip(f"unsupported (declared): sleep_level:{level}")
        prompts = conformance.reference.prompts(2, seed=51)
        before = conformance.greedy(prompts, 10).response_ids
        engine = conformance.engine
        conformance.run(engine.sleep(level=level))
        with pytest.raises(EngineAsleepError):
            conformance.greedy(prompts, 10)
        conformance.run(engine.wake_up())
        if _discards(conformance, level):
            with pytest.raises(WeightsNotLoadedError):
                conformance.greedy(prompts, 10)
            conformance.push_weights(conformance.reference.original_state)
        after = conformance.greedy(prompts, 10)
        if conformance.greedy_margin == 0.0:
            assert after.response_ids == before, f"greedy output changed across sleep(level={level}) and wake_up"
        else:  # half precision: a cold cache may break a near tie differently; both must still be greedy
            for prompt, completion in zip(prompts, after, strict=True):
                conformance.assert_greedy_parity(prompt, completion, 10)

    @feature("Sleep / wake after a weight update")
    @requires(capabilities.SLEEP, capabilities.weight_sync("tensors"))
    def test_wake_serves_the_latest_weights(self, conformance: ConformanceHarness) -> None:
        # update -> sleep -> wake -> generate, at every declared level, twice: to other weights and
        # back. The output must be the reference's for the weights pushed last, so an engine that
        # restores what it saved at its first sleep (or at any earlier one) fails.
        engine = conformance.engine
        prompts = conformance.reference.prompts(2, seed=56)
        cycles = ((PERTURBED, perturbed(conformance)), ("original", conformance.reference.original_state))
        for level in sorted(conformance.capabilities.sleep_levels):
            for weights, state in cycles:
                conformance.push_weights(state)
                conformance.run(engine.sleep(level=level))
                conformance.run(engine.wake_up())
                if _discards(conformance, level):
                    conformance.push_weights(state)  # the contract at this level: weights before generating
                for prompt, c in zip(prompts, conformance.greedy(prompts, 10), strict=True):
                    conformance.assert_greedy_parity(prompt, c, 10, weights=weights)

    @requires(capabilities.DISCARDS_WEIGHTS)
    def test_partial_weight_sync_is_not_enough(self, conformance: ConformanceHarness) -> None:
        engine = conformance.engine
        level = max(conformance.capabilities.sleep_levels)
        prompt = conformance.reference.prompts(1, seed=52)[0]
        before = conformance.greedy([prompt], 8)[0].token_ids
        conformance.run(engine.sleep(level=level))
        conformance.run(engine.wake_up())
        names = list(conformance.weight_specs(engine))
        conformance.push_weights(conformance.reference.original_state, names=names[:1])
        with pytest.raises(WeightsNotLoadedError):
            conformance.greedy([prompt], 8)
        conformance.push_weights(conformance.reference.original_state, names=names[1:])
        assert conformance.greedy([prompt], 8)[0].token_ids == before

    @feature("Sleep / wake by memory tag")
    @requires(capabilities.SLEEP_TAGS)
    def test_sleep_by_tag(self, conformance: ConformanceHarness) -> None:
        engine = conformance.engine
        prompt = conformance.reference.prompts(1, seed=53)[0]
        before = conformance.greedy([prompt], 8)[0].token_ids
        level = min(conformance.capabilities.sleep_levels)
        conformance.run(engine.sleep(tags=["kv_cache"], level=level))
        with pytest.raises(EngineAsleepError):
            conformance.greedy([prompt], 8)
        conformance.run(engine.wake_up(tags=["kv_cache"]))
        assert conformance.greedy([prompt], 8)[0].token_ids == before
        # The design's colocated cycle: weights first (to receive the update), then the KV cache.
        conformance.run(engine.sleep(level=level))
        conformance.run(engine.wake_up(tags=["weights"]))
        conformance.push_weights(conformance.reference.original_state)
        with pytest.raises(EngineAsleepError):
            conformance.greedy([prompt], 8)
        conformance.run(engine.wake_up(tags=["kv_cache"]))
        assert conformance.greedy([prompt], 8)[0].token_ids == before

    @requires(capabilities.SLEEP, capabilities.ABORT)
    def test_sleep_aborts_inflight_requests(self, conformance: ConformanceHarness) -> None:
        engine = conformance.engine
        prompt = conformance.reference.prompts(1, seed=54)[0]
        long = SamplingParams(max_generate_length=conformance.long_generation, temperature=0.0, ignore_eos=True)
        level = min(conformance.capabilities.sleep_levels)

        async def sleep_while_generating():
            task = asyncio.ensure_future(engine.generate([prompt], long))
            await until_inflight(engine)
            await engine.sleep(level=level)
            return await task

        out = conformance.run(sleep_while_generating())
        assert out[0].finish_reason == "abort", "a request in flight when sleep() is called must end as 'abort'"
        assert len(out[0].token_ids) < conformance.long_generation
        conformance.run(engine.wake_up())
        if _discards(conformance, level):
            conformance.push_weights(conformance.reference.original_state)
        expected = conformance.reference.greedy(prompt, len(out[0].token_ids), ignore_eos=True).token_ids
        if conformance.greedy_margin == 0.0:
            assert tuple(out[0].token_ids) == expected, "the partial output of an aborted request must be correct"

    @requires(capabilities.SLEEP)
    def test_weight_update_while_asleep_is_refused(self, conformance: ConformanceHarness) -> None:
        engine = conformance.engine
        level = min(conformance.capabilities.sleep_levels)
        conformance.run(engine.sleep(level=level))
        with pytest.raises(EngineAsleepError):
            conformance.push_weights(conformance.reference.original_state)
        conformance.run(engine.wake_up())
        if _discards(conformance, level):
            conformance.push_weights(conformance.reference.original_state)
        prompt = conformance.reference.prompts(1, seed=55)[0]
        conformance.assert_greedy_parity(prompt, conformance.greedy([prompt], 6)[0], 6)
