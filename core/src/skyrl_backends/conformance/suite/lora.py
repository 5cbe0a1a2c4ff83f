"""LoRA: loading an adapter changes output to the reference's adapter output, unloading restores
the base model, and unknown adapters are clear errors."""

from __future__ import annotations

import asyncio

import pytest

from skyrl_backends import capabilities
from skyrl_backends.conformance.harness import ConformanceHarness
from skyrl_backends.conformance.markers import requires
from skyrl_backends.conformance.suite.base import ConformanceTestBase
from skyrl_backends.errors import LoraAdapterError
from skyrl_backends.sampling import SamplingParams

ADAPTER = "conformance-adapter"


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
