"""A trainer process and engine processes exchange weights over shared memory and a gloo broadcast.

The engines are real engines of the selected backend (``SKYRL_WEIGHT_SYNC_BACKEND``, default
transformers), each behind ``skyrl-backends serve`` in its own OS process, driven over loopback by
a :class:`~skyrl_backends.remote.RemoteEngine` (the engine API: JSON only, nothing unpickled). The
oracle is independent of the engines: Hugging Face greedy decoding, in the trainer process, of the
very weights that were sent.
"""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from skyrl_backends.errors import WeightsNotLoadedError, WeightUpdateError
from skyrl_backends.remote import RemoteEngine, ServerProcess, connect_engine
from skyrl_backends.types import WeightUpdateRequest
from skyrl_backends.weight_sync import SharedMemorySender, connect_broadcast, sync_weights
from skyrl_backends.weight_sync.chunks import plan
from skyrl_backends.weight_sync.manifest import spelled_out

PROMPTS = [[5, 6, 7, 8], [100, 42, 17]]
MAX_TOKENS = 8
GREEDY = {"max_generate_length": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}
SMALL_BUCKETS = 64 * 1024  # several buckets for the tiny model, so "midway" failures are possible


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def trainer_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engines(backend, model_dir, num_engines):
    servers = [ServerProcess(backend, model_dir, options={"dtype": "float32"}) for _ in range(num_engines)]
    started = []
    try:
        for server in servers:
            started.append(connect_engine(server.wait_ready(), _owned_server=server))
        yield started
    finally:
        for server in servers:
            server.stop()


def perturbed(model, seed: int) -> dict[str, torch.Tensor]:
    """The model's weights plus seeded noise (a 'training step' that changes greedy outputs)."""
    g = torch.Generator().manual_seed(seed)
    return {name: t + 0.5 * t.float().std().nan_to_num(0.1) * torch.randn(t.shape, generator=g)
            for name, t in model.state_dict().items()}


def oracle_greedy(model, weights: dict[str, torch.Tensor]) -> list[list[int]]:
    reference = copy.deepcopy(model)
    reference.load_state_dict(weights)
    outputs = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            out = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, pad_token_id=0)
            outputs.append(out[0, len(prompt):].tolist())
    return outputs


async def greedy(engine: RemoteEngine) -> tuple[list[list[int]], list[int]]:
    out = await engine.generate(PROMPTS, GREEDY)
    return out.response_ids, [c.weight_version for c in out]


async def versions(engines) -> list[int]:
    return [(await e.refresh()).weight_version for e in engines]


def test_shared_memory_sync_into_engine_processes(engines, trainer_model):
    weights = perturbed(trainer_model, seed=1)
    expected = oracle_greedy(trainer_model, weights)

    async def scenario():
        before = await versions(engines)
        got_versions = await sync_weights(engines, weights, "shared_memory", bucket_bytes=SMALL_BUCKETS)
        assert got_versions == [v + 1 for v in before]
        for engine, version in zip(engines, got_versions, strict=False):
            tokens, stamped = await greedy(engine)
            assert tokens == expected
            assert stamped == [version] * len(PROMPTS)

    run(scenario())


@pytest.mark.parametrize("layout, apply", [("packed", "atomic"), ("per_tensor", "atomic"), ("packed", "streamed")])
def test_gloo_broadcast_into_engine_processes(engines, trainer_model, layout, apply):
    first, second = perturbed(trainer_model, seed=2), perturbed(trainer_model, seed=3)

    async def scenario():
        sender = await connect_broadcast(engines, backend="gloo", timeout_s=120, layout=layout, apply=apply)
        assert sender.world_size == 1 + len(engines) and (sender.layout, sender.apply) == (layout, apply)
        try:
            for weights in (first, second):  # the group stays usable from one update to the next
                before = await versions(engines)
                got = await sync_weights(engines, weights, "broadcast", sender=sender, bucket_bytes=SMALL_BUCKETS)
                assert got == [v + 1 for v in before]
                expected = oracle_greedy(trainer_model, weights)
                for engine, version in zip(engines, got, strict=False):
                    tokens, stamped = await greedy(engine)
                    assert tokens == expected and stamped == [version] * len(PROMPTS)
            # A bad update is refused before a byte is broadcast, and the group stays in step.
            bad = dict(first)
            bad["model.norm.weight"] = bad["model.norm.weight"][:-1]
            with pytest.raises(WeightUpdateError) as info:
                await sync_weights(engines, bad, "broadcast", sender=sender)
            assert "model.norm.weight" in info.value.problems
            tokens, _ = await greedy(engines[0])
            assert tokens == oracle_greedy(trainer_model, second)
            got = await sync_weights(engines, first, "broadcast", sender=sender)
            tokens, _ = await greedy(engines[-1])
            assert tokens == oracle_greedy(trainer_model, first)
        finally:
            sender.close()

    run(scenario())


def _send_first_bucket_only(sender, layout) -> None:
    """A trainer that dies after its first bucket: the engines wait for the rest until the group's
    timeout."""
    from skyrl_backends.weight_sync.broadcast import _root0
    from skyrl_backends.weight_sync.chunks import pack_into

    manifest = layout.buckets[0]
    buffer = torch.empty(manifest.nbytes, dtype=torch.uint8)
    pack_into(buffer, manifest, layout.tensors)
    sender.group.broadcast([buffer], _root0()).wait()


def test_streamed_broadcast_failing_midway_is_never_served_and_a_complete_update_recovers(
        engines, trainer_model):
    served, update, recovery = (perturbed(trainer_model, seed=s) for s in (11, 12, 13))
    engine = engines[0]

    async def scenario():
        await sync_weights(engine, served, "shared_memory")
        [version_before] = await versions([engine])
        sender = await connect_broadcast(engine, backend="gloo", timeout_s=5, apply="streamed",
                                         group_name="dies_midway")
        try:
            layout = plan(update, SMALL_BUCKETS, dtype_for=torch.float32)
            assert len(layout.buckets) >= 3
            request = WeightUpdateRequest(layout.names, layout.dtypes, layout.shapes, "broadcast",
                                          sender.payload(layout))
            results = await asyncio.gather(asyncio.to_thread(_send_first_bucket_only, sender, layout),
                                           engine.update_named_weights(request), return_exceptions=True)
        finally:
            sender.close()
        assert results[0] is None and isinstance(results[1], Exception), results
        assert await versions([engine]) == [version_before]
        # The first bucket may be loaded and the rest not: the engine refuses to serve the mix.
        with pytest.raises(WeightsNotLoadedError, match="streamed weight update failed partway"):
            await greedy(engine)
        await sync_weights(engine, recovery, "shared_memory")
        tokens, stamped = await greedy(engine)
        assert tokens == oracle_greedy(trainer_model, recovery)
        assert stamped == [version_before + 1] * len(PROMPTS)

    run(scenario())


def _tamper(request: WeightUpdateRequest, mutate) -> WeightUpdateRequest:
    payload = copy.deepcopy(request.payload)
    mutate(payload)
    return WeightUpdateRequest(request.names, request.dtypes, request.shapes, request.strategy, payload)


def _last_segment_missing(payload):
    payload["buckets"][-1]["segment"] = "skyrl_ws_" + "0" * 24


def _last_segment_truncated(payload):
    payload["buckets"][-1]["nbytes"] += 1 << 20


def _offset_out_of_range(payload):
    payload["buckets"][-1]["tensors"][-1]["offset"] = payload["buckets"][-1]["nbytes"]


def _plan_of_other_buckets(payload):
    payload["plan"]["bucket_bytes"] *= 4


def _last_planned_bucket_resized(payload):
    payload["buckets"][-1]["nbytes"] += 1 << 20


# The sender's planned payload (manifests derived by the engine from payload.plan), or spelled out
# (every bucket's manifest written in the request, which these hostile payloads edit)
@pytest.mark.parametrize("mutate, offender, words, planned", [
    (_last_segment_missing, "payload.buckets[{last}].segment", "does not exist", False),
    (_last_segment_truncated, "payload.buckets[{last}].segment", "truncated", False),
    (_offset_out_of_range, "{last_tensor}", "outside its bucket", False),
    (_last_segment_missing, "payload.buckets[{last}].segment", "does not exist", True),
    (_plan_of_other_buckets, "payload.buckets", "payload.plan gives", True),
    (_last_planned_bucket_resized, "payload.buckets[{last}].nbytes", "payload.plan gives", True),
])
def test_transfer_failing_midway_changes_nothing(engines, trainer_model, backend, mutate, offender, words, planned):
    """Every bucket but the last is fine: the engine must still apply none of them."""
    served, update = perturbed(trainer_model, seed=4), perturbed(trainer_model, seed=5)
    engine = engines[0]

    async def scenario():
        await sync_weights(engine, served, "shared_memory")
        tokens_before, _ = await greedy(engine)
        [version_before] = await versions([engine])
        with SharedMemorySender() as sender:
            layout = plan(update, SMALL_BUCKETS)
            good = WeightUpdateRequest(layout.names, layout.dtypes, layout.shapes, "shared_memory",
                                       sender.write(layout))
            assert ("plan" in good.payload) and len(good.payload["buckets"]) >= 3
            good = good if planned else spelled_out(good)
            bad = _tamper(good, mutate)
            with pytest.raises(Exception) as info:
                await engine.update_named_weights(bad)
        name = offender.format(last=len(good.payload["buckets"]) - 1,
                               last_tensor=spelled_out(good).payload["buckets"][-1]["tensors"][-1]["name"])
        assert name in str(info.value) and words in str(info.value)
        tokens_after, stamped = await greedy(engine)
        assert tokens_after == tokens_before == oracle_greedy(trainer_model, served)
        assert await versions([engine]) == [version_before] and stamped == [version_before] * len(PROMPTS)
        return info.value, name

    error, name = run(scenario())
    assert isinstance(error, WeightUpdateError), f"expected WeightUpdateError, got {error!r}"
    assert words in error.problems[name]


def test_mismatched_update_is_rejected_naming_every_offender(engines, trainer_model):
    served = perturbed(trainer_model, seed=6)
    bad = perturbed(trainer_model, seed=7)
    bad["model.layers.0.mlp.up_proj.weight"] = bad["model.layers.0.mlp.up_proj.weight"].t().contiguous()
    bad["model.layers.0.self_attn.q_proj.weigth"] = bad.pop("model.layers.0.self_attn.q_proj.weight")

    async def scenario():
        await sync_weights(engines, served, "shared_memory")
        before = await versions(engines)
        with pytest.raises(WeightUpdateError) as info:
            await sync_weights(engines, bad, "shared_memory")
        problems = info.value.problems
        assert "does not match" in problems["model.layers.0.mlp.up_proj.weight"]
        assert "q_proj.weight" in problems["model.layers.0.self_attn.q_proj.weigth"]  # the did-you-mean hint
        assert await versions(engines) == before
        for engine in engines:
            tokens, _ = await greedy(engine)
            assert tokens == oracle_greedy(trainer_model, served)

    run(scenario())


@pytest.mark.parametrize("strategy, layout, apply", [("shared_memory", None, None), ("broadcast", "packed", "atomic"),
                                                     ("broadcast", "per_tensor", "atomic")])
def test_check_finite_refuses_non_finite_values_in_the_engine_process(engines, trainer_model, strategy, layout, apply):
    """The engine process checks the values it received (on vLLM: in its worker) before loading any:
    the update is refused naming every offending tensor, and every engine keeps serving what it had."""
    served, update = perturbed(trainer_model, seed=21), perturbed(trainer_model, seed=22)
    names = list(update)
    update[names[0]].view(-1)[1] = float("nan")
    update[names[-1]].view(-1)[0] = float("inf")

    async def scenario():
        await sync_weights(engines, served, "shared_memory")
        before = await versions(engines)
        sender = None
        if strategy == "broadcast":
            sender = await connect_broadcast(engines, backend="gloo", timeout_s=120, layout=layout, apply=apply,
                                             group_name=f"finite_{layout}")
        try:
            with pytest.raises(WeightUpdateError) as info:
                await sync_weights(engines, update, strategy, bucket_bytes=SMALL_BUCKETS, sender=sender,
                                   check_finite=True)
            assert set(info.value.problems) == {names[0], names[-1]}, info.value.problems
            assert await versions(engines) == before
            for engine in engines:
                assert (await greedy(engine))[0] == oracle_greedy(trainer_model, served)
            if sender is not None:  # the group is still in step: a clean update goes through
                clean = perturbed(trainer_model, seed=23)
                await sync_weights(engines, clean, strategy, bucket_bytes=SMALL_BUCKETS, sender=sender,
                                   check_finite=True)
                assert (await greedy(engines[0]))[0] == oracle_greedy(trainer_model, clean)
        finally:
            if sender is not None:
                sender.close()

    run(scenario())
