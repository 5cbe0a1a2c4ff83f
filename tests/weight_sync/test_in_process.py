"""sync_weights into real engines of the trainer's own process: one engine, a client over several,
dtype conversion to the engine's dtype, and the versions it returns."""

from __future__ import annotations

import asyncio

import pytest
import skyrl_backends as sb
import torch
from skyrl_backends.client import InferenceEngineClient
from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.weight_sync import iter_weight_chunks, make_sender, sync_weights

PROMPT = [[5, 6, 7, 8]]
GREEDY = {"max_generate_length": 6, "temperature": 0.0, "ignore_eos": True}


def _noisy(engine: sb.InferenceEngine, seed: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = engine.impl.model.state_dict()
    return {n: (t + 0.5 * t.std().nan_to_num(0.1) * torch.randn(t.shape, generator=g)).to(dtype or t.dtype)
            for n, t in state.items()}


async def _greedy(engine) -> tuple[list[int], int]:
    out = await engine.generate(PROMPT, GREEDY)
    return out[0].token_ids, out[0].weight_version


def test_one_engine_each_strategy_and_versions(model_dir):
    async def scenario():
        engine = sb.create_engine("transformers", model=model_dir, dtype="float32")
        reference = sb.create_engine("transformers", model=model_dir, dtype="float32")
        try:
            sender = make_sender("shared_memory")
            for version, strategy in enumerate(("tensors", "shared_memory", "shared_memory"), start=1):
                weights = _noisy(engine, seed=version)
                kwargs = {"sender": sender} if strategy != "tensors" else {}
                assert await sync_weights(engine, weights, strategy, bucket_bytes=32 * 1024, **kwargs) == [version]
                # The oracle: a second engine loaded through the plain in-process path.
                await reference.update_weights_from_tensors(list(weights.items()))
                tokens, stamped = await _greedy(engine)
                assert tokens == (await _greedy(reference))[0] and stamped == version
            sender.close()
        finally:
            await engine.teardown()
            await reference.teardown()

    asyncio.run(scenario())


def test_trainer_dtype_is_converted_to_the_engines(model_dir):
    """A bfloat16 trainer feeding a float32 engine: the engine's weight_specs decide the dtype."""
    async def scenario():
        engine = sb.create_engine("transformers", model=model_dir, dtype="float32")
        try:
            weights = _noisy(engine, seed=11, dtype=torch.bfloat16)
            await sync_weights(engine, weights, "shared_memory")
            served = engine.impl.model.state_dict()
            for name, tensor in weights.items():
                assert served[name].dtype == torch.float32
                assert torch.equal(served[name], tensor.float())
            with pytest.raises(WeightUpdateError) as info:  # sending as-is is refused, naming the dtype
                await sync_weights(engine, weights, "shared_memory", dtype_for=None)
            assert "dtype bfloat16" in next(iter(info.value.problems.values()))
        finally:
            await engine.teardown()

    asyncio.run(scenario())


def test_client_pool_gets_one_version_per_engine(model_dir):
    async def scenario():
        engines = [sb.create_engine("transformers", model=model_dir, dtype="float32") for _ in range(2)]
        client = InferenceEngineClient(engines)
        try:
            weights = _noisy(engines[0], seed=21)
            assert await sync_weights(client, weights, "shared_memory") == [1, 1]
            first, second = await _greedy(engines[0]), await _greedy(engines[1])
            assert first == second and first[1] == 1
        finally:
            for engine in engines:
                await engine.teardown()

    asyncio.run(scenario())


def test_chunks_of_a_real_model_cover_its_parameters(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    chunks = list(iter_weight_chunks(model, bucket_bytes=64 * 1024, dtype_for="bfloat16"))
    assert len(chunks) > 1
    state = model.state_dict()
    got = {name: t for chunk in chunks for name, t in chunk.views()}
    assert got.keys() == state.keys()
    assert all(torch.equal(got[n], state[n].to(torch.bfloat16)) for n in state)


def test_a_second_sync_without_a_kept_sender_is_warned_about_once(model_dir, caplog, monkeypatch):
    """Each sync that makes its own sender allocates and fills new buffers that the engine maps and
    validates anew; the second such sync of a process says to keep one (once), a kept sender never."""
    from skyrl_backends.weight_sync import sync as sync_module

    monkeypatch.setattr(sync_module, "_syncs_without_a_kept_sender", 0)

    async def scenario():
        engine = sb.create_engine("transformers", model=model_dir, dtype="float32")
        try:
            sender = make_sender("shared_memory")
            try:
                for seed in (1, 2):
                    await sync_weights(engine, _noisy(engine, seed), "shared_memory", sender=sender)
            finally:
                sender.close()
            assert not [r for r in caplog.records if "keep one across syncs" in r.getMessage()]
            await sync_weights(engine, _noisy(engine, 3), "shared_memory")  # a one-off sync: not warned
            assert not [r for r in caplog.records if "keep one across syncs" in r.getMessage()]
            for seed in (4, 5):
                await sync_weights(engine, _noisy(engine, seed), "shared_memory")
        finally:
            await engine.teardown()

    with caplog.at_level("WARNING", logger="skyrl_backends.weight_sync.sync"):
        asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if "keep one across syncs" in r.getMessage()]
    assert len(warnings) == 1 and "make_sender('shared_memory')" in warnings[0]


def test_a_sender_of_another_strategy_is_refused_naming_both(model_dir):
    async def scenario():
        engine = sb.create_engine("transformers", model=model_dir, dtype="float32")
        sender = make_sender("shared_memory")
        try:
            with pytest.raises(WeightUpdateError, match="'shared_memory' sender but strategy is 'cuda_ipc'"):
                await sync_weights(engine, _noisy(engine, 1), "cuda_ipc", sender=sender)
            assert engine.weight_version == 0
        finally:
            sender.close()
            await engine.teardown()

    asyncio.run(scenario())


def test_one_engine_is_not_asked_to_check_apart_and_still_refuses_a_bad_update_whole(model_dir):
    """The engine's update checks everything before changing anything, so a sync into one engine
    skips the separate check (a round trip for a Ray engine or a server); into several, each checks
    first, so that one refusal leaves every engine as it was."""
    async def scenario():
        engines = [sb.create_engine("transformers", model=model_dir, dtype="float32") for _ in range(2)]
        checks: list[int] = []
        for index, engine in enumerate(engines):
            check = engine.validate_weight_update

            async def counted(request, check=check, index=index):
                checks.append(index)
                await check(request)

            engine.validate_weight_update = counted
        try:
            sender = make_sender("shared_memory")
            good = _noisy(engines[0], seed=31)
            assert await sync_weights(engines[0], good, "shared_memory", sender=sender) == [1]
            assert checks == []
            before = {n: t.clone() for n, t in engines[0].impl.model.state_dict().items()}
            bad = dict(_noisy(engines[0], seed=32))
            name = next(iter(bad))
            bad[name] = bad[name][..., :1]  # a wrong shape, last of nothing: the update is refused whole
            with pytest.raises(WeightUpdateError) as info:
                await sync_weights(engines[0], bad, "shared_memory", sender=sender)
            assert name in info.value.problems
            assert engines[0].weight_version == 1
            after = engines[0].impl.model.state_dict()
            assert all(torch.equal(after[n], before[n]) for n in before)
            assert await sync_weights(engines, good, "shared_memory", sender=sender) == [2, 1]
            assert sorted(checks) == [0, 1]
            sender.close()
        finally:
            for engine in engines:
                await engine.teardown()

    asyncio.run(scenario())


def test_adopted_weights_synced_in_another_order_are_refused_and_the_engine_keeps_its_weights(model_dir):
    """Adopted tensors live in the sender's buffers: synced under another layout of the same buffer
    sizes (here, the names in reverse order), copying them into their new places would overwrite the
    trainer's own tensors. The sync is refused by name before any byte moves; the trainer's tensors,
    the engine's weights and its version stay as they were, and the adopted order syncs again."""
    async def scenario():
        engine = sb.create_engine("transformers", model=model_dir, dtype="float32")
        try:
            sender = make_sender("shared_memory")
            views = sender.adopt(_noisy(engine, seed=1), bucket_bytes=1 << 30)  # one buffer for all
            assert await sync_weights(engine, views, "shared_memory", sender=sender, bucket_bytes=1 << 30) == [1]
            before = await _greedy(engine)
            trainer_before = {name: tensor.clone() for name, tensor in views.items()}
            with pytest.raises(WeightUpdateError) as info:
                await sync_weights(engine, dict(reversed(views.items())), "shared_memory", sender=sender,
                                   bucket_bytes=1 << 30)
            assert "adopt" in next(iter(info.value.problems.values()))
            assert all(torch.equal(views[name], trainer_before[name]) for name in views)
            assert await _greedy(engine) == before and engine.weight_version == 1
            assert await sync_weights(engine, views, "shared_memory", sender=sender, bucket_bytes=1 << 30) == [2]
            assert (await _greedy(engine))[0] == before[0]
            sender.close()
        finally:
            await engine.teardown()

    asyncio.run(scenario())
