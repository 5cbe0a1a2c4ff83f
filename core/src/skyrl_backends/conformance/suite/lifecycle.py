"""The lifecycle state machine: random sequences of generate, sleep, wake, weight updates and LoRA
load/unload, checked against a model of what the engine's state should be.

Every call either succeeds with the output the modelled state implies, or raises the error the
model predicts; nothing leaves the engine in a state the model cannot describe. Outputs are
compared with the engine's own first output for the same (weights, adapter) state, so the check
is exact in any dtype; parity with the reference is the other groups' job.
"""

from __future__ import annotations

import functools

import pytest

from skyrl_backends.conformance.harness import ConformanceHarness
from skyrl_backends.conformance.suite.base import ConformanceTestBase
from skyrl_backends.errors import (
    EngineAsleepError,
    EngineStateError,
    LoraAdapterError,
    UnsupportedCapabilityError,
    WeightsNotLoadedError,
)

ADAPTER = "lifecycle-adapter"


def build_machine(conformance: ConformanceHarness):
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

    caps = conformance.capabilities
    prompts = conformance.reference.prompts(2, seed=101)
    weight_sets = {"original": conformance.reference.original_state,
                   "perturbed": conformance.reference.perturbed_state(seed=5)}
    can_sync = "tensors" in caps.weight_sync_strategies
    levels = sorted(caps.sleep_levels)
    seen_outputs: dict[tuple[str, bool], list[list[int]]] = {}

    # After a failing step the engine may be broken; the next example (Hypothesis replays and
    # shrinks the failure) then starts on a fresh engine, so replays are reproducible.
    health = {"broken": False}

    def marks_broken(step):
        @functools.wraps(step)
        def wrapper(*args, **kwargs):
            try:
                return step(*args, **kwargs)
            except BaseException:
                health["broken"] = True
                raise
        return wrapper

    def discards(level: int) -> bool:
        return caps.discards_weights_at_level is not None and level >= caps.discards_weights_at_level

    class EngineLifecycle(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            if health["broken"]:
                conformance.discard_shared()
                health["broken"] = False
            self.engine = conformance.engine
            self._reset()
            self.asleep: set[str] = set()
            self.discarded = False
            self.weights = "original"
            self.adapter_loaded = False

        @marks_broken
        def _reset(self) -> None:
            # Bring the shared engine back to a known state through its own API: that every
            # example starts cleanly is itself part of what is tested.
            engine = self.engine
            if engine.asleep_tags:
                conformance.run(engine.wake_up())
            if can_sync:
                conformance.push_weights(weight_sets["original"], engine=engine)
            for name in list(engine.lora_adapters):
                conformance.run(engine.unload_lora_adapter(name))

        @rule(with_adapter=st.booleans())
        @marks_broken
        def generate(self, with_adapter: bool) -> None:
            use_adapter = with_adapter and caps.lora
            call = lambda: conformance.generate(  # noqa: E731
                prompts, {"max_generate_length": 6, "temperature": 0.0},
                engine=self.engine, lora_name=ADAPTER if use_adapter else None)
            if self.asleep:
                with pytest.raises(EngineAsleepError):
                    call()
            elif self.discarded:
                with pytest.raises(WeightsNotLoadedError):
                    call()
            elif use_adapter and not self.adapter_loaded:
                with pytest.raises(LoraAdapterError):
                    call()
            else:
                out = call().response_ids
                key = (self.weights, use_adapter)
                expected = seen_outputs.setdefault(key, out)
                assert out == expected, f"output for state {key} changed: {out} vs {expected}"

        @precondition(lambda self: bool(levels))
        @rule(data=st.data())
        @marks_broken
        def sleep(self, data) -> None:
            level = data.draw(st.sampled_from(levels))
            tags = data.draw(st.sampled_from([None, ["kv_cache"], ["weights"]] if caps.sleep_tags else [None]))
            conformance.run(self.engine.sleep(tags=tags, level=level))
            # Memory already asleep is not released again (a no-op, whatever the level).
            slept = ({"weights", "kv_cache"} if tags is None else set(tags)) - self.asleep
            self.asleep |= slept
            if "weights" in slept and discards(level):
                self.discarded = True

        @precondition(lambda self: bool(levels))
        @rule(data=st.data())
        @marks_broken
        def wake_up(self, data) -> None:
            tags = data.draw(st.sampled_from([None, ["weights"], ["kv_cache"]] if caps.sleep_tags else [None]))
            conformance.run(self.engine.wake_up(tags=tags))
            self.asleep -= {"weights", "kv_cache"} if tags is None else set(tags)

        @precondition(lambda self: can_sync)
        @rule(which=st.sampled_from(["original", "perturbed"]))
        @marks_broken
        def update_weights(self, which: str) -> None:
            if "weights" in self.asleep:
                with pytest.raises(EngineAsleepError):
                    conformance.push_weights(weight_sets[which], engine=self.engine)
                return
            conformance.push_weights(weight_sets[which], engine=self.engine)
            self.weights = which
            self.discarded = False

        @rule()
        @marks_broken
        def load_adapter(self) -> None:
            if not caps.lora:
                with pytest.raises(UnsupportedCapabilityError):
                    conformance.run(self.engine.load_lora_adapter(ADAPTER, conformance.lora_dir))
                return
            if self.adapter_loaded:
                # Refused either way: as a duplicate, or (asleep) as a state error.
                with pytest.raises((LoraAdapterError, EngineStateError)) as refused:
                    conformance.run(self.engine.load_lora_adapter(ADAPTER, conformance.lora_dir))
                assert self.asleep or isinstance(refused.value, LoraAdapterError), refused.value
                return
            try:
                conformance.run(self.engine.load_lora_adapter(ADAPTER, conformance.lora_dir))
            except EngineStateError:
                # Loading while asleep may be refused, but only with a state error, and only asleep.
                assert self.asleep, "load_lora_adapter raised a state error while the engine was awake"
                return
            self.adapter_loaded = True

        @rule()
        @marks_broken
        def unload_adapter(self) -> None:
            if not caps.lora:
                return
            if not self.adapter_loaded:
                with pytest.raises((LoraAdapterError, EngineStateError)) as refused:
                    conformance.run(self.engine.unload_lora_adapter(ADAPTER))
                assert self.asleep or isinstance(refused.value, LoraAdapterError), refused.value
                return
            try:
                conformance.run(self.engine.unload_lora_adapter(ADAPTER))
            except EngineStateError:
                assert self.asleep, "unload_lora_adapter raised a state error while the engine was awake"
                return
            self.adapter_loaded = False

        @invariant()
        @marks_broken
        def facade_agrees(self) -> None:
            assert set(self.engine.asleep_tags) == self.asleep
            assert self.engine.weights_loaded == (not self.discarded)
            assert (ADAPTER in self.engine.lora_adapters) == self.adapter_loaded

        @marks_broken
        def teardown(self) -> None:
            # Leave the shared engine clean for the next example (and the next test).
            if self.engine.closed:
                return
            if self.engine.asleep_tags:
                conformance.run(self.engine.wake_up())
            if can_sync and (self.weights != "original" or self.discarded):
                conformance.push_weights(weight_sets["original"], engine=self.engine)
            if ADAPTER in self.engine.lora_adapters:
                conformance.run(self.engine.unload_lora_adapter(ADAPTER))

    return EngineLifecycle


class LifecycleStateMachine(ConformanceTestBase):
    feature_row = "Lifecycle state machine"

    def test_lifecycle_state_machine(self, conformance: ConformanceHarness) -> None:
        from hypothesis import HealthCheck, settings
        from hypothesis.stateful import run_state_machine_as_test

        if not (conformance.capabilities.sleep or "tensors" in conformance.capabilities.weight_sync_strategies
                or conformance.capabilities.lora):
            pytest.skip("unsupported (declared): sleep, weight_sync:tensors, lora")
        machine = build_machine(conformance)
        run_state_machine_as_test(machine, settings=settings(
            max_examples=conformance.config.state_machine_examples,
            stateful_step_count=conformance.config.state_machine_steps,
            deadline=None, derandomize=True, database=None,
            suppress_health_check=list(HealthCheck)))
