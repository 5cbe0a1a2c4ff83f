"""Sleep/wake, weight updates, LoRA, abort and pause on a real engine."""

import asyncio

import pytest
import skyrl_backends as sb
import torch
from conftest import run

PROMPT = [5, 6, 7]
GREEDY = {"max_generate_length": 12, "temperature": 0, "ignore_eos": True}


@pytest.fixture
def fresh(model_dir):
    eng = sb.create_engine("transformers", model=model_dir, enable_lora=True, dtype="float32")
    yield eng
    run(eng.teardown())


def greedy(eng, **kw):
    return run(eng.generate([PROMPT], GREEDY, **kw)).response_ids[0]


def perturbed(hf_model, scale=0.5):
    torch.manual_seed(0)
    return [(n, p.detach() + scale * torch.randn_like(p)) for n, p in hf_model.named_parameters()]


def test_weight_update_changes_output_and_restoring_restores_it(fresh, hf_model):
    before = greedy(fresh)
    run(fresh.update_weights_from_tensors(perturbed(hf_model)))
    assert greedy(fresh) != before
    version = run(fresh.update_weights_from_tensors(list(hf_model.named_parameters())))
    assert greedy(fresh) == before
    assert version == 2


@pytest.mark.parametrize("bad", ["name", "shape", "dtype"])
def test_bad_weight_update_is_rejected_and_changes_nothing(fresh, hf_model, bad):
    before = greedy(fresh)
    tensors = perturbed(hf_model)
    name, tensor = tensors[0]
    if bad == "name":
        tensors[0] = (name + ".typo", tensor)
    elif bad == "shape":
        tensors[0] = (name, tensor[:-1])
    else:
        tensors[0] = (name, tensor.to(torch.bfloat16))
    with pytest.raises(sb.WeightUpdateError) as info:
        run(fresh.update_weights_from_tensors(tensors))
    assert tensors[0][0] in info.value.problems
    assert greedy(fresh) == before
    assert fresh.weight_version == 0


def test_sleep_level_two_discards_weights_until_synced(fresh, hf_model):
    before = greedy(fresh)
    run(fresh.sleep(level=2))
    params = fresh.impl._named_parameters()
    assert all(p.numel() == 0 for p in params.values()), "level 2 really frees the weights"
    with pytest.raises(sb.EngineAsleepError):
        greedy(fresh)
    run(fresh.wake_up(["weights"]))
    with pytest.raises(sb.EngineAsleepError):  # kv_cache still asleep
        greedy(fresh)
    run(fresh.wake_up(["kv_cache"]))
    with pytest.raises(sb.WeightsNotLoadedError):
        greedy(fresh)
    run(fresh.update_weights_from_tensors(list(hf_model.named_parameters())))
    assert greedy(fresh) == before


def test_sleep_level_one_keeps_weights(fresh):
    before = greedy(fresh)
    run(fresh.sleep(level=1))
    run(fresh.wake_up())
    assert greedy(fresh) == before


def test_lora_load_changes_output_unload_restores(fresh, model_dir):
    base = greedy(fresh)
    run(fresh.load_lora_adapter("a", f"{model_dir}/lora"))
    run(fresh.load_lora_adapter("b", f"{model_dir}/lora"))
    with_a = greedy(fresh, lora_name="a")
    assert with_a != base
    assert greedy(fresh, lora_name="b") == with_a  # same adapter files under two names
    assert greedy(fresh) == base  # base model while adapters are loaded
    run(fresh.unload_lora_adapter("a"))
    assert greedy(fresh, lora_name="b") == with_a
    run(fresh.unload_lora_adapter("b"))
    assert greedy(fresh) == base
    with pytest.raises(sb.LoraAdapterError, match="'a'"):
        greedy(fresh, lora_name="a")


def test_weight_update_with_lora_loaded_uses_plain_names(fresh, hf_model, model_dir):
    base = greedy(fresh)
    run(fresh.load_lora_adapter("a", f"{model_dir}/lora"))
    names = {s for s in run(fresh.weight_specs())}
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert not any("base_layer" in n or "lora_" in n for n in names)
    run(fresh.update_weights_from_tensors(perturbed(hf_model)))
    assert greedy(fresh) != base
    run(fresh.update_weights_from_tensors(list(hf_model.named_parameters())))
    assert greedy(fresh) == base


def test_abort_returns_partial_output(fresh):
    async def scenario():
        task = asyncio.create_task(fresh.generate(
            [PROMPT, PROMPT], {"max_generate_length": 400, "ignore_eos": True}, request_ids=["keep", "stop"]))
        await asyncio.sleep(0.3)
        await fresh.abort(["stop"])
        return await task

    out = run(scenario())
    assert out[1].finish_reason == "abort" and 0 < len(out[1].token_ids) < 400
    assert out[0].finish_reason == "length" and len(out[0].token_ids) == 400


def test_teardown_mid_generation_returns_partial_output(fresh):
    """Requests running when the engine is torn down come back with what they generated (finish
    reason "abort"), streamed or not, instead of an error from the stopped worker."""
    async def scenario():
        params = {"max_generate_length": 400, "ignore_eos": True}
        task = asyncio.create_task(fresh.generate([PROMPT, PROMPT[:2]], params))
        streamed = []

        async def stream():
            async for chunk in fresh.generate_stream([PROMPT], params):
                streamed.append(chunk)

        reader = asyncio.create_task(stream())
        while sum(len(c.token_ids) for c in streamed) < 3:
            await asyncio.sleep(0.01)
        await fresh.teardown()
        await reader
        return await task, streamed

    out, streamed = run(scenario())
    assert [c.finish_reason for c in out] == ["abort", "abort"]
    assert all(0 < len(c.token_ids) < 400 for c in out)
    final = streamed[-1].completion
    assert final is not None and final.finish_reason == "abort" and 3 <= len(final.token_ids) < 400
    assert [t for c in streamed for t in c.token_ids] == final.token_ids
    assert fresh.closed


def test_pause_holds_requests_and_resume_finishes_them_exactly(fresh):
    async def scenario():
        task = asyncio.create_task(fresh.generate([PROMPT], {**GREEDY, "max_generate_length": 200}))
        await asyncio.sleep(0.1)
        await fresh.pause_generation()
        await asyncio.sleep(0.05)
        frozen = fresh.impl._paused
        await asyncio.sleep(0.2)
        assert not task.done()
        await fresh.resume_generation()
        return frozen, await task

    frozen, out = run(scenario())
    assert frozen
    assert len(out[0].token_ids) == 200 and out[0].finish_reason == "length"


def test_bad_inputs_name_the_field(fresh):
    with pytest.raises(sb.ConfigError, match=r"prompt_token_ids\[0\].*outside the vocabulary"):
        run(fresh.generate([[10**6]], GREEDY))
    with pytest.raises(sb.ConfigError, match=r"prompt_token_ids\[1\].*empty"):
        run(fresh.generate([[1], []], GREEDY))
    with pytest.raises(sb.ConfigError, match="max_model_len"):
        run(fresh.generate([[1] * 2000], GREEDY))


def test_engine_options_are_checked(model_dir):
    with pytest.raises(sb.ConfigError, match="inference_engine_tensor_parallel_size"):
        sb.create_engine("transformers", model=model_dir, inference_engine_tensor_parallel_size=2)
    with pytest.raises(sb.ConfigError, match="engine_init_kwargs.*attn_implementation"):
        sb.create_engine("transformers", model=model_dir, engine_init_kwargs={"attention_backend": "fa3"})
    with pytest.raises(sb.ConfigError, match="not a local model folder"):
        sb.create_engine("transformers", model="/no/such/model")


def test_parallel_sizes_and_version(fresh):
    import transformers

    assert (fresh.tp_size(), fresh.pp_size(), fresh.dp_size(), fresh.ep_size()) == (1, 1, 1, 1)
    assert fresh.engine_version() == transformers.__version__
