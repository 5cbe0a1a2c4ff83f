"""Weight updates and LoRA adapters on a real vLLM engine.

Every update is checked by its effect on what is served (greedy output changes, and restoring the
original weights restores the original output exactly), for each way tensors reach vLLM's workers
and with LoRA enabled, where vLLM wraps the target layers (``base_layer``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import GREEDY, PROMPTS
from test_generate import _wait_for_progress
from skyrl_backends.errors import LoraAdapterError, WeightUpdateError

GREEDY_LONG = {**GREEDY, "ignore_eos": True}


async def greedy(engine, **fields) -> list[list[int]]:
    return (await engine.generate(PROMPTS, GREEDY_LONG, **fields)).response_ids


def perturbed(checkpoint: dict, names: list[str]) -> list[tuple[str, object]]:
    return [(name, -checkpoint[name]) for name in names]


def test_updates_take_the_path_the_environment_chooses(engine):
    # make test-vllm runs this file on the platform's default path, make test-vllm-worker-extension on the
    # worker extension (SKYRL_VLLM_WEIGHT_PATH); each run tests the one it names.
    from skyrl_backend_vllm.weight_transfer.updates import choose_path

    chosen = choose_path(engine.impl.platform)
    assert engine.impl.weight_path == chosen
    assert (engine.impl._weight_updates is not None) == (chosen == "weight_transfer")


async def test_tensor_update_changes_output_and_restoring_restores_it_exactly(engine, checkpoint):
    base = await greedy(engine)
    version = engine.weight_version
    await engine.update_weights_from_tensors(perturbed(checkpoint, ["lm_head.weight"]))
    assert await greedy(engine) != base
    await engine.update_weights_from_tensors(list(checkpoint.items()))
    assert await greedy(engine) == base
    assert engine.weight_version == version + 2


async def test_partial_update_of_one_fused_shard(engine, checkpoint):
    # q_proj is one third of vLLM's fused qkv_proj: k and v must stay as they were.
    base = await greedy(engine)
    name = "model.layers.0.self_attn.q_proj.weight"
    await engine.update_weights_from_tensors([(name, checkpoint[name] * 3.0)])
    changed = await greedy(engine)
    await engine.update_weights_from_tensors([(name, checkpoint[name])])
    assert changed != base and await greedy(engine) == base


async def test_rejected_update_leaves_the_weights_as_they_were(engine, checkpoint):
    base = await greedy(engine)
    bad = [("lm_head.weight", -checkpoint["lm_head.weight"]),
           ("model.norm.weight", checkpoint["model.norm.weight"][:3])]
    with pytest.raises(WeightUpdateError, match="model.norm.weight"):
        await engine.update_weights_from_tensors(bad)
    with pytest.raises(WeightUpdateError, match="did you mean"):
        await engine.update_weights_from_tensors([("lm_head.weigth", checkpoint["lm_head.weight"])])
    assert await greedy(engine) == base


async def test_update_converts_nothing_silently(engine, checkpoint):
    import torch

    with pytest.raises(WeightUpdateError, match="dtype"):
        await engine.update_weights_from_tensors([("lm_head.weight", checkpoint["lm_head.weight"].to(torch.bfloat16))])


async def test_core_shared_memory_strategy(engine, checkpoint):
    from skyrl_backends.weight_sync import sync_weights

    base = await greedy(engine)
    await sync_weights(engine, {**checkpoint, "lm_head.weight": -checkpoint["lm_head.weight"]}, "shared_memory")
    assert await greedy(engine) != base
    await sync_weights(engine, checkpoint, "shared_memory", bucket_bytes=1 << 16)  # many buckets
    assert await greedy(engine) == base


async def test_core_broadcast_strategy_into_the_workers(engine, checkpoint):
    from skyrl_backends.weight_sync import connect_broadcast, sync_weights

    base = await greedy(engine)
    sender = await connect_broadcast(engine, timeout_s=120)
    try:
        await sync_weights(engine, {**checkpoint, "lm_head.weight": -checkpoint["lm_head.weight"]}, "broadcast",
                           sender=sender)
        assert await greedy(engine) != base
        await sync_weights(engine, checkpoint, "broadcast", sender=sender)
        assert await greedy(engine) == base
    finally:
        sender.close()


async def test_update_during_native_pause_applies_to_the_resumed_requests(engine, checkpoint):
    import asyncio

    params = {"max_generate_length": 300, "temperature": 0, "ignore_eos": True}
    base = (await engine.generate(PROMPTS[:1], params))[0].token_ids
    task = asyncio.create_task(engine.generate(PROMPTS[:1], params))
    await _wait_for_progress(engine, task)
    await engine.pause_generation()
    try:
        assert not task.done()
        await engine.update_weights_from_tensors(perturbed(checkpoint, ["lm_head.weight"]))
    finally:
        await engine.resume_generation()
    out = (await task)[0]
    await engine.update_weights_from_tensors(list(checkpoint.items()))
    # The held request finished, and under the new weights: its greedy tokens left the old path.
    assert out.finish_reason == "length" and len(out.token_ids) == 300
    assert out.token_ids != base


async def test_an_update_pauses_vllm_only_while_requests_run(engine, checkpoint, monkeypatch):
    # An update with nothing in flight needs no pause (new requests wait for it); one under running
    # requests does (their steps and the new weights' label must not interleave), and it pauses
    # vLLM's scheduler in mode keep without AsyncLLM.pause_generation's fixed 20 ms sleep.
    import asyncio

    llm = engine.impl._engine
    pauses: list[str] = []  # the scheduler's pauses, by mode
    sleeping_pauses: list[str] = []  # AsyncLLM.pause_generation, which ends in the sleep
    real_scheduler_pause = llm.engine_core.pause_scheduler_async
    real_pause = llm.pause_generation

    async def counted_scheduler_pause(**kwargs):
        pauses.append(kwargs.get("mode", "abort"))
        await real_scheduler_pause(**kwargs)

    async def counted_pause(**kwargs):
        sleeping_pauses.append(kwargs.get("mode", "abort"))
        await real_pause(**kwargs)

    monkeypatch.setattr(llm.engine_core, "pause_scheduler_async", counted_scheduler_pause)
    monkeypatch.setattr(llm, "pause_generation", counted_pause)
    base = await greedy(engine)
    version = engine.weight_version
    try:
        await engine.update_weights_from_tensors(perturbed(checkpoint, ["lm_head.weight"]))
        assert pauses == [] and await greedy(engine) != base

        params = {"max_generate_length": 300, "temperature": 0, "ignore_eos": True}
        task = asyncio.create_task(engine.generate(PROMPTS[:1], params))
        await _wait_for_progress(engine, task)
        await engine.update_weights_from_tensors(list(checkpoint.items()))
        assert pauses == ["keep"] and sleeping_pauses == []
        out = (await task)[0]
    finally:
        await engine.update_weights_from_tensors(list(checkpoint.items()))
    assert await greedy(engine) == base
    if engine.capabilities.token_versions:  # the request ran across the update, labelled at its seam
        assert set(out.token_versions.per_token()) == {version + 1, version + 2}


async def test_an_idle_update_sends_the_prefix_cache_reset_with_the_load(engine, checkpoint, monkeypatch):
    # With no request running (and none admitted until the update ends) the reset that frees the old
    # weights' cached blocks goes out while the load runs, not one round trip after it; a refused
    # load still lets it finish and raises the load's own error, the weights and version unchanged.
    import asyncio

    import torch
    from skyrl_backends.weight_sync import sync_weights

    impl, llm = engine.impl, engine.impl._engine
    events: list[str] = []
    real_load, real_reset = impl._load_weights, llm.reset_prefix_cache

    async def load(request):
        events.append("load begins")
        await asyncio.sleep(0.05)  # long enough for the reset to be sent if it goes out with the load
        try:
            await real_load(request)
        finally:
            events.append("load ends")

    async def reset(*args, **kwargs):
        events.append("reset begins")
        result = await real_reset(*args, **kwargs)
        events.append("reset ends")
        return result

    monkeypatch.setattr(impl, "_load_weights", load)
    monkeypatch.setattr(llm, "reset_prefix_cache", reset)
    base = await greedy(engine)
    version = engine.weight_version
    try:
        await engine.update_weights_from_tensors(perturbed(checkpoint, ["lm_head.weight"]))
        assert events.index("reset begins") < events.index("load ends")
        assert set(events) == {"load begins", "load ends", "reset begins", "reset ends"}
        assert await greedy(engine) != base

        events.clear()
        poisoned = {**checkpoint, "lm_head.weight": torch.full_like(checkpoint["lm_head.weight"], float("nan"))}
        with pytest.raises(WeightUpdateError, match="lm_head.weight"):  # refused by the workers' check
            await sync_weights(engine, poisoned, "shared_memory", check_finite=True)
        assert events.count("reset ends") == 1 and events.count("load ends") == 1
        assert engine.weight_version == version + 1
    finally:
        await engine.update_weights_from_tensors(list(checkpoint.items()))
    assert await greedy(engine) == base


async def test_an_abort_pause_ends_the_running_request_without_vllm_s_sleeping_pause(engine, monkeypatch):
    # The facade returns once the aborted request's caller has its partial output (what
    # AsyncLLM.pause_generation's closing 20 ms sleep approximates); the plugin pauses the scheduler.
    import asyncio

    llm = engine.impl._engine
    sleeping_pauses: list[str] = []
    real_pause = llm.pause_generation

    async def counted_pause(**kwargs):
        sleeping_pauses.append(kwargs.get("mode", "abort"))
        await real_pause(**kwargs)

    monkeypatch.setattr(llm, "pause_generation", counted_pause)
    params = {"max_generate_length": 300, "temperature": 0, "ignore_eos": True}
    task = asyncio.create_task(engine.generate(PROMPTS[:1], params))
    await _wait_for_progress(engine, task)
    await engine.pause_generation("abort")
    try:
        out = (await task)[0]
    finally:
        await engine.resume_generation()
    assert out.finish_reason == "abort" and 0 < len(out.token_ids) < 300
    assert sleeping_pauses == []


# -- with LoRA enabled ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["model.layers.0.self_attn.o_proj.weight",   # a LoRA-wrapped layer
                                  "model.layers.1.self_attn.v_proj.weight",   # a shard of wrapped qkv_proj
                                  "lm_head.weight"])
async def test_updates_reach_lora_wrapped_layers(lora_engine, checkpoint, name):
    base = await greedy(lora_engine)
    await lora_engine.update_weights_from_tensors([(name, checkpoint[name] * -2.0)])
    changed = await greedy(lora_engine)
    await lora_engine.update_weights_from_tensors([(name, checkpoint[name])])
    assert changed != base and await greedy(lora_engine) == base


@pytest.fixture(scope="session")
def second_adapter(lora_dir: str, tmp_path_factory) -> str:
    """A second adapter: the first one's weights scaled, so both are valid and differ."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("lora2")
    for f in Path(lora_dir).iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    weights = load_file(str(out / "adapter_model.safetensors"))
    save_file({k: v * (-1.5 if "lora_B" in k else 1.0) for k, v in weights.items()},
              str(out / "adapter_model.safetensors"))
    return str(out)


@pytest.fixture(scope="session")
def peft_reference(model_dir: str):
    """Teacher-forced log-probabilities of the base model plus an adapter, in HF transformers + peft."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def logprobs(adapter: str, prompt: list[int], response: list[int]):
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, adapter).eval()
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + response])).logits[0].float()
        lp = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
        return [float(lp[i, t]) for i, t in enumerate(response)]

    return logprobs


async def test_several_adapters_load_serve_and_unload(lora_engine, lora_dir, second_adapter, peft_reference):
    base = await greedy(lora_engine)
    await lora_engine.load_lora_adapter("first", lora_dir)
    await lora_engine.load_lora_adapter("second", second_adapter)
    try:
        first = await lora_engine.generate(PROMPTS, {**GREEDY_LONG, "logprobs": 0}, lora_name="first")
        second = await greedy(lora_engine, lora_name="second")
        assert first.response_ids != base and second != base and second != first.response_ids
        assert await greedy(lora_engine) == base  # the base model is untouched
        # The adapter is applied as peft applies it.
        for prompt, c in zip(PROMPTS, first):
            assert c.logprobs == pytest.approx(peft_reference(lora_dir, prompt, c.token_ids), abs=2e-3)
        await lora_engine.unload_lora_adapter("first")
        with pytest.raises(LoraAdapterError, match="first"):
            await greedy(lora_engine, lora_name="first")
        assert await greedy(lora_engine, lora_name="second") == second
    finally:
        for name in list(lora_engine.lora_adapters):
            await lora_engine.unload_lora_adapter(name)
    assert lora_engine.lora_adapters == {}


async def test_base_requests_beside_adapter_requests_stay_base_with_every_adapter_slot_full(
        lora_engine, lora_dir, second_adapter):
    """vLLM's CPU LoRA ops give a token without an adapter the last slot's adapter once that slot is
    filled (options.spare_lora_slots): with max_loras adapters loaded, base and adapter requests
    batched together must each get their own model."""
    import asyncio

    max_loras = lora_engine.config.max_loras
    base = await greedy(lora_engine)
    await lora_engine.load_lora_adapter("first", lora_dir)
    try:
        alone = await greedy(lora_engine, lora_name="first")
        for i in range(max_loras - 1):
            await lora_engine.load_lora_adapter(f"filler-{i}", second_adapter)
        mixed = await asyncio.gather(*(lora_engine.generate([p], GREEDY_LONG, lora_name="first" if i % 2 else None)
                                       for i, p in enumerate(PROMPTS * 2)))
        for i, out in enumerate(mixed):
            expected = alone if i % 2 else base
            assert out.response_ids[0] == expected[i % len(PROMPTS)], (
                f"request {i} ({'adapter' if i % 2 else 'base'}) beside the others got another model's output")
        if lora_engine.impl.platform == "cpu":  # the spare slot must stay empty: one more is refused
            with pytest.raises(LoraAdapterError, match="max_loras"):
                await lora_engine.load_lora_adapter("one-too-many", second_adapter)
    finally:
        for name in list(lora_engine.lora_adapters):
            await lora_engine.unload_lora_adapter(name)


async def test_adapters_survive_a_base_weight_update(lora_engine, lora_dir, checkpoint):
    await lora_engine.load_lora_adapter("kept", lora_dir)
    try:
        before = await greedy(lora_engine, lora_name="kept")
        await lora_engine.update_weights_from_tensors(list(checkpoint.items()))
        assert await greedy(lora_engine, lora_name="kept") == before
    finally:
        await lora_engine.unload_lora_adapter("kept")


async def test_a_broken_adapter_is_refused_with_its_name(lora_engine, tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(LoraAdapterError, match="broken"):
        await lora_engine.load_lora_adapter("broken", str(tmp_path))
    assert "broken" not in lora_engine.lora_adapters
    assert await greedy(lora_engine)  # the engine still serves
