"""LoRA: loading an adapter changes output to the reference's adapter output, unloading restores
the base model, and unknown adapters are clear errors. Adapters sent as tensors (row "LoRA from
tensors") serve what the same adapter loaded from its folder serves, replace one another under one
name with a new version, and are refused whole when anything is wrong."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import pytest

from skyrl_backends import capabilities
from skyrl_backends.conformance.harness import ConformanceHarness
from skyrl_backends.conformance.markers import feature, requires
from skyrl_backends.conformance.suite.base import ConformanceTestBase
from skyrl_backends.errors import LoraAdapterError, WeightUpdateError
from skyrl_backends.sampling import SamplingParams

ADAPTER = "conformance-adapter"
FROM_TENSORS = "LoRA from tensors"
# Strategies the suite can exercise with the engine in its own process (broadcast needs a group of
# processes: tests/weight_sync covers it).
IN_PROCESS_STRATEGIES = ("tensors", "shared_memory", "cuda_ipc")


def adapter_tensors(folder: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A PEFT adapter folder's tensors (named as PEFT saves them) and its config as JSON."""
    from safetensors.torch import load_file

    with open(os.path.join(folder, "adapter_config.json")) as f:
        config = json.load(f)
    return load_file(os.path.join(folder, "adapter_model.safetensors")), config


def in_process_strategies(conformance: ConformanceHarness) -> list[str]:
    caps = conformance.engine.capabilities
    declared = caps.lora_from_tensors
    usable = [s for s in IN_PROCESS_STRATEGIES if s in declared and s in caps.weight_sync_strategies]
    assert usable, (f"the backend loads adapters from tensors only by {list(declared)}; the suite tests "
                    f"{list(IN_PROCESS_STRATEGIES)} in one process")
    return usable


def push_adapter(conformance: ConformanceHarness, tensors: dict[str, Any], config: dict[str, Any],
                 strategy: str) -> int:
    from skyrl_backends.weight_sync import sync_lora_adapter

    [version] = conformance.run(sync_lora_adapter(conformance.engine, ADAPTER, tensors, config, strategy))
    return version


class LoraTests(ConformanceTestBase):
    feature_row = "LoRA"

    @requires(capabilities.LORA)
    def test_load_changes_output_unload_restores(self, conformance: ConformanceHarness) -> None:
        engine = conformance.engine
        prompts = conformance.reference.prompts(3, seed=71)
        base = conformance.greedy(prompts, 12).response_ids
        conformance.run(engine.load_lora_adapter(ADAPTER, conformance.lora_dir))
        try:
            adapted = conformance.generate(prompts, {"max_generate_length": 12, "temperature": 0.0}, lora_name=ADAPTER)
            assert adapted.response_ids != base, "the LoRA adapter did not change greedy output"
            for prompt, c in zip(prompts, adapted, strict=True):
                conformance.assert_greedy_parity(prompt, c, 12, lora=conformance.lora_dir)
            assert conformance.greedy(prompts, 12).response_ids == base, (
                "requests without lora_name must use the base model while an adapter is loaded")
        finally:
            conformance.run(engine.unload_lora_adapter(ADAPTER))
        assert conformance.greedy(prompts, 12).response_ids == base, "unloading the adapter must restore output"
        with pytest.raises(LoraAdapterError):
            conformance.generate(prompts, {"max_generate_length": 4}, lora_name=ADAPTER)

    @requires(capabilities.LORA)
    def test_reload_under_same_name_uses_new_adapter(self, conformance: ConformanceHarness) -> None:
        # Engines that cache adapters by name or id must not serve the unloaded adapter again.
        engine = conformance.engine
        prompts = conformance.reference.prompts(2, seed=73)
        params = {"max_generate_length": 10, "temperature": 0.0}
        second = conformance.second_lora_dir()
        conformance.run(engine.load_lora_adapter(ADAPTER, conformance.lora_dir))
        try:
            first_out = conformance.generate(prompts, params, lora_name=ADAPTER)
        finally:
            conformance.run(engine.unload_lora_adapter(ADAPTER))
        conformance.run(engine.load_lora_adapter(ADAPTER, second))
        try:
            second_out = conformance.generate(prompts, params, lora_name=ADAPTER)
        finally:
            conformance.run(engine.unload_lora_adapter(ADAPTER))
        assert second_out.response_ids != first_out.response_ids, (
            "after unloading an adapter and loading another under the same name, output did not change")
        for prompt, c in zip(prompts, second_out, strict=True):
            conformance.assert_greedy_parity(prompt, c, 10, lora=second)

    @requires(capabilities.LORA)
    def test_base_and_adapter_requests_concurrently(self, conformance: ConformanceHarness) -> None:
        engine = conformance.engine
        prompts = conformance.reference.prompts(4, seed=72)
        params = SamplingParams(max_generate_length=10, temperature=0.0)
        conformance.run(engine.load_lora_adapter(ADAPTER, conformance.lora_dir))
        try:
            async def both():
                return await asyncio.gather(*(engine.generate([p], params, lora_name=ADAPTER if i % 2 else None)
                                              for i, p in enumerate(prompts)))

            results = conformance.run(both())
        finally:
            conformance.run(engine.unload_lora_adapter(ADAPTER))
        for i, (prompt, out) in enumerate(zip(prompts, results, strict=True)):
            conformance.assert_greedy_parity(prompt, out[0], 10, lora=conformance.lora_dir if i % 2 else None)

    @requires(capabilities.LORA)
    def test_unknown_adapter_errors(self, conformance: ConformanceHarness, tmp_path) -> None:
        engine = conformance.engine
        with pytest.raises(LoraAdapterError, match="nope"):
            conformance.generate([[1, 2, 3]], {"max_generate_length": 2}, lora_name="nope")
        with pytest.raises(LoraAdapterError, match="nope"):
            conformance.run(engine.unload_lora_adapter("nope"))
        with pytest.raises(LoraAdapterError):
            conformance.run(engine.load_lora_adapter("broken", str(tmp_path)))  # an empty folder
        assert "broken" not in engine.lora_adapters
        conformance.run(engine.load_lora_adapter(ADAPTER, conformance.lora_dir))
        try:
            with pytest.raises(LoraAdapterError, match=ADAPTER):
                conformance.run(engine.load_lora_adapter(ADAPTER, conformance.lora_dir))
        finally:
            conformance.run(engine.unload_lora_adapter(ADAPTER))

    # -- adapters sent as tensors ------------------------------------------------------------------
    @feature(FROM_TENSORS)
    @requires(capabilities.LORA_FROM_TENSORS)
    def test_adapter_from_tensors_serves_what_its_folder_serves(self, conformance: ConformanceHarness) -> None:
        engine = conformance.engine
        tensors, config = adapter_tensors(conformance.lora_dir)
        prompts = conformance.reference.prompts(3, seed=81)
        params = {"max_generate_length": 12, "temperature": 0.0}
        base = conformance.greedy(prompts, 12).response_ids
        try:
            for strategy in in_process_strategies(conformance):
                version = push_adapter(conformance, tensors, config, strategy)
                assert engine.lora_versions[ADAPTER] == version
                adapted = conformance.generate(prompts, params, lora_name=ADAPTER)
                assert adapted.response_ids != base, f"{strategy}: the adapter did not change greedy output"
                for prompt, c in zip(prompts, adapted, strict=True):
                    conformance.assert_greedy_parity(prompt, c, 12, lora=conformance.lora_dir)
                    assert c.lora_version == version, f"{strategy}: completion stamped {c.lora_version}"
                assert conformance.greedy(prompts, 12).response_ids == base, (
                    "requests without lora_name must use the base model while an adapter is loaded")
        finally:
            conformance.run(engine.unload_lora_adapter(ADAPTER))
        assert conformance.greedy(prompts, 12).response_ids == base

    @feature(FROM_TENSORS)
    @requires(capabilities.LORA_FROM_TENSORS)
    def test_replacing_an_adapter_from_tensors_serves_the_new_one(self, conformance: ConformanceHarness) -> None:
        # A trainer pushes its adapter every step under one name: the next request uses the new
        # tensors (no stale adapter, no prefix cached with the old one), and the version moves on.
        engine = conformance.engine
        tensors, config = adapter_tensors(conformance.lora_dir)
        doubled, _ = adapter_tensors(conformance.second_lora_dir())
        prompts = conformance.reference.prompts(2, seed=83)
        params = {"max_generate_length": 10, "temperature": 0.0}
        strategy = in_process_strategies(conformance)[-1]
        try:
            first = push_adapter(conformance, tensors, config, strategy)
            first_out = conformance.generate(prompts, params, lora_name=ADAPTER)
            second = push_adapter(conformance, doubled, config, strategy)
            second_out = conformance.generate(prompts, params, lora_name=ADAPTER)
            assert second == first + 1 and list(engine.lora_adapters) == [ADAPTER]
            assert second_out.response_ids != first_out.response_ids, "the replaced adapter is still served"
            for prompt, c in zip(prompts, second_out, strict=True):
                conformance.assert_greedy_parity(prompt, c, 10, lora=conformance.second_lora_dir())
                assert c.lora_version == second
        finally:
            conformance.run(engine.unload_lora_adapter(ADAPTER))

    @feature(FROM_TENSORS)
    @requires(capabilities.LORA_FROM_TENSORS)
    def test_a_wrong_adapter_from_tensors_is_refused_and_changes_nothing(self, conformance: ConformanceHarness) -> None:
        engine = conformance.engine
        tensors, config = adapter_tensors(conformance.lora_dir)
        doubled, _ = adapter_tensors(conformance.second_lora_dir())
        prompts = conformance.reference.prompts(2, seed=85)
        params = {"max_generate_length": 10, "temperature": 0.0}
        strategy = in_process_strategies(conformance)[0]
        name_a = next(n for n in sorted(doubled) if "lora_A" in n)
        name_b = next(n for n in sorted(doubled) if "lora_B" in n)
        missing = {k: v for k, v in doubled.items() if k != name_a}
        transposed = {**doubled, name_b: doubled[name_b].t().contiguous()}
        stray = {**doubled, name_a.replace("q_proj", "k_proj"): doubled[name_a]}
        cases = [(missing, config, name_a, "missing"),
                 (transposed, config, name_b, "does not match"),
                 (stray, config, name_a.replace("q_proj", "k_proj"), "not a tensor of this adapter"),
                 (doubled, {**config, "use_dora": True}, "lora_config.use_dora", "plain LoRA"),
                 (doubled, {**config, "r": engine.config.max_lora_rank + 1}, "lora_config.r", "max_lora_rank")]
        try:
            version = push_adapter(conformance, tensors, config, strategy)
            served = conformance.generate(prompts, params, lora_name=ADAPTER).response_ids
            for bad_tensors, bad_config, offender, words in cases:
                with pytest.raises(WeightUpdateError) as info:
                    push_adapter(conformance, bad_tensors, bad_config, strategy)
                assert offender in info.value.problems and words in info.value.problems[offender], info.value.problems
                assert engine.lora_versions[ADAPTER] == version, f"a refused adapter ({offender}) changed the version"
                again = conformance.generate(prompts, params, lora_name=ADAPTER)
                assert again.response_ids == served, f"a refused adapter ({offender}) changed what is served"
        finally:
            conformance.run(engine.unload_lora_adapter(ADAPTER))
