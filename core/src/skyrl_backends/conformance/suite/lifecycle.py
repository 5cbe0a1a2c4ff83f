"""The lifecycle state machine: random sequences of generate, sleep, wake, weight updates and LoRA
load/unload, checked against a model of what the engine's state should be.

Every call either succeeds with the output the modelled state implies, or raises the error the
model predicts; nothing leaves the engine in a state the model cannot describe. Every output is
compared with the float32 reference for the modelled (weights, adapter) state: exactly for a float32
engine, within the dtype's greedy margin otherwise (``ConformanceHarness.assert_greedy_parity``), so
an engine that serves stale weights or a stale adapter after some sequence of calls fails even when
it does so consistently.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, ClassVar

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from skyrl_backends import capabilities
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
# The reference's name for the other weights the machine pushes (the first set is "original").
PERTURBED = "lifecycle-perturbed"
MAX_NEW_TOKENS = 6


def _marks_broken(step):
    """After a failing step the engine may be broken; the next example (Hypothesis replays and
    shrinks the failure) then starts on a fresh engine, so replays are reproducible."""
    @functools.wraps(step)
    def wrapper(self, *args, **kwargs):
        try:
            return step(self, *args, **kwargs)
        except BaseException:
            type(self).health["broken"] = True
            raise
    return wrapper


class EngineLifecycle(RuleBasedStateMachine):
    """The lifecycle model. Run through :meth:`bound` with a harness: the class it returns carries
    the harness, the backend's capabilities and what this run has seen."""

    harness: ClassVar[ConformanceHarness]
    health: ClassVar[dict[str, bool]]
    weight_sets: ClassVar[dict[str, Mapping[str, Any]]]

    @classmethod
    def bound(cls, harness: ConformanceHarness) -> type[EngineLifecycle]:
        perturbed = harness.reference.perturbed_state(seed=5)
        harness.reference.add_weights(PERTURBED, perturbed)
        weight_sets = {"original": harness.reference.original_state, PERTURBED: perturbed}
        return type(cls.__name__, (cls,), {"harness": harness, "health": {"broken": False},
                                           "weight_sets": weight_sets})

    def __init__(self) -> None:
        super().__init__()
        harness = self.harness
        if self.health["broken"]:
            harness.discard_shared()
            self.health["broken"] = False
        self.caps = harness.capabilities
        self.prompts = harness.reference.prompts(2, seed=101)
        self.engine = harness.engine
        self._reset()
        self.asleep: set[str] = set()
        self.discarded = False
        self.weights = "original"
        self.adapter_loaded = False

    # -- what the backend declares -------------------------------------------------------------
    @property
    def can_sync(self) -> bool:
        return capabilities.weight_sync("tensors")(self.caps)

    @property
    def levels(self) -> list[int]:
        return sorted(self.caps.sleep_levels)

    def discards(self, level: int) -> bool:
        at = self.caps.discards_weights_at_level
        return at is not None and level >= at

    @_marks_broken
    def _reset(self) -> None:
        # Bring the shared engine back to a known state through its own API: that every example
        # starts cleanly is itself part of what is tested.
        harness, engine = self.harness, self.engine
        if engine.asleep_tags:
            harness.run(engine.wake_up())
        if self.can_sync:
            harness.push_weights(self.weight_sets["original"], engine=engine)
        for name in list(engine.lora_adapters):
            harness.run(engine.unload_lora_adapter(name))

    # -- rules -----------------------------------------------------------------------------------
    @rule(with_adapter=st.booleans())
    @_marks_broken
    def generate(self, with_adapter: bool) -> None:
        use_adapter = with_adapter and self.caps.lora
        call = lambda: self.harness.generate(  # noqa: E731
            self.prompts, {"max_generate_length": MAX_NEW_TOKENS, "temperature": 0.0},
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
            lora = self.harness.lora_dir if use_adapter else None
            for prompt, completion in zip(self.prompts, call(), strict=True):
                self.harness.assert_greedy_parity(prompt, completion, MAX_NEW_TOKENS, weights=self.weights, lora=lora)

    @precondition(lambda self: bool(self.levels))
    @rule(data=st.data())
    @_marks_broken
    def sleep(self, data) -> None:
        level = data.draw(st.sampled_from(self.levels))
        tags = data.draw(st.sampled_from([None, ["kv_cache"], ["weights"]] if self.caps.sleep_tags else [None]))
        self.harness.run(self.engine.sleep(tags=tags, level=level))
        # Memory already asleep is not released again (a no-op, whatever the level).
        slept = ({"weights", "kv_cache"} if tags is None else set(tags)) - self.asleep
        self.asleep |= slept
        if "weights" in slept and self.discards(level):
            self.discarded = True

    @precondition(lambda self: bool(self.levels))
    @rule(data=st.data())
    @_marks_broken
    def wake_up(self, data) -> None:
        tags = data.draw(st.sampled_from([None, ["weights"], ["kv_cache"]] if self.caps.sleep_tags else [None]))
        self.harness.run(self.engine.wake_up(tags=tags))
        self.asleep -= {"weights", "kv_cache"} if tags is None else set(tags)

    @precondition(lambda self: self.can_sync)
    @rule(which=st.sampled_from(["original", PERTURBED]))
    @_marks_broken
    def update_weights(self, which: str) -> None:
        if "weights" in self.asleep:
            with pytest.raises(EngineAsleepError):
                self.harness.push_weights(self.weight_sets[which], engine=self.engine)
            return
        self.harness.push_weights(self.weight_sets[which], engine=self.engine)
        self.weights = which
        self.discarded = False

    @rule()
    @_marks_broken
    def load_adapter(self) -> None:
        harness, engine = self.harness, self.engine
        if not self.caps.lora:
            with pytest.raises(UnsupportedCapabilityError):
                harness.run(engine.load_lora_adapter(ADAPTER, harness.lora_dir))
            return
        if self.adapter_loaded:
            # Refused either way: as a duplicate, or (asleep) as a state error.
            with pytest.raises((LoraAdapterError, EngineStateError)) as refused:
                harness.run(engine.load_lora_adapter(ADAPTER, harness.lora_dir))
            assert self.asleep or isinstance(refused.value, LoraAdapterError), refused.value
            return
        try:
            harness.run(engine.load_lora_adapter(ADAPTER, harness.lora_dir))
        except EngineStateError:
            # Loading while asleep may be refused, but only with a state error, and only asleep.
            assert self.asleep, "load_lora_adapter raised a state error while the engine was awake"
            return
        self.adapter_loaded = True

    @rule()
    @_marks_broken
    def unload_adapter(self) -> None:
        harness, engine = self.harness, self.engine
        if not self.caps.lora:
            return
        if not self.adapter_loaded:
            with pytest.raises((LoraAdapterError, EngineStateError)) as refused:
                harness.run(engine.unload_lora_adapter(ADAPTER))
            assert self.asleep or isinstance(refused.value, LoraAdapterError), refused.value
            return
        try:
            harness.run(engine.unload_lora_adapter(ADAPTER))
        except EngineStateError:
            assert self.asleep, "unload_lora_adapter raised a state error while the engine was awake"
            return
        self.adapter_loaded = False

    @invariant()
    @_marks_broken
    def facade_agrees(self) -> None:
        assert set(self.engine.asleep_tags) == self.asleep
        assert self.engine.weights_loaded == (not self.discarded)
        assert (ADAPTER in self.engine.lora_adapters) == self.adapter_loaded

    @_marks_broken
    def teardown(self) -> None:
        # Leave the shared engine clean for the next example (and the next test).
        harness, engine = self.harness, self.engine
        if engine.closed:
            return
        if engine.asleep_tags:
            harness.run(engine.wake_up())
        if self.can_sync and (self.weights != "original" or self.discarded):
            harness.push_weights(self.weight_sets["original"], engine=engine)
        if ADAPTER in engine.lora_adapters:
            harness.run(engine.unload_lora_adapter(ADAPTER))


class LifecycleStateMachine(ConformanceTestBase):
    feature_row = "Lifecycle state machine"

    def test_lifecycle_state_machine(self, conformance: ConformanceHarness) -> None:
        from hypothesis import HealthCheck, settings
        from hypothesis.stateful import run_state_machine_as_test

        if not (conformance.capabilities.sleep or "tensors" in conformance.capabilities.weight_sync_strategies
                or conformance.capabilities.lora):
            pytest.skip("unsupported (declared): sleep, weight_sync:tensors, lora")
        run_state_machine_as_test(EngineLifecycle.bound(conformance), settings=settings(
            max_examples=conformance.config.state_machine_examples,
            stateful_step_count=conformance.config.state_machine_steps,
            deadline=None, derandomize=True, database=None,
            suppress_health_check=list(HealthCheck)))
