"""What an update delivers must be what it declares, on real engines of this process: the
transformers (reference) backend and the example plugin of docs/writing-a-backend.md.

Each bad update is declared correctly (so the declaration alone passes the engine's weight specs)
and delivers something else. The engine must refuse it naming the tensor, and afterwards hold
exactly the weights it held before (every parameter compared bit for bit), at the same weight
version, still serving them.
"""

from __future__ import annotations

import asyncio

import pytest
import skyrl_backends as sb
import torch
from skyrl_backends.errors import WeightUpdateError
from skyrl_backends.types import WeightUpdateRequest
from skyrl_backends.weight_sync import connect_broadcast, sync_weights

PROMPT = [[5, 6, 7, 8]]
GREEDY = {"max_generate_length": 6, "temperature": 0.0, "ignore_eos": True}
SMALL_BUCKETS = 64 * 1024  # several buckets for the tiny model
FIRST, SECOND = "model.embed_tokens.weight", "model.norm.weight"  # a matrix and a vector


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(params=["transformers", "minimal"])
def engine(request, model_dir):
    engine = sb.create_engine(request.param, model=model_dir, dtype="float32")
    yield engine
    run(engine.teardown())


def _parameters(engine) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in engine.impl.model.named_parameters()}


def _declared(names, engine) -> WeightUpdateRequest:
    """A request declaring ``names`` exactly as the engine holds them, with no payload yet."""
    specs = run(engine.weight_specs())
    return WeightUpdateRequest(names, [specs[n].dtype for n in names], [specs[n].shape for n in names])


def _bad_payloads(engine) -> dict[str, tuple[list[torch.Tensor], str]]:
    """Payloads for the declaration [FIRST, SECOND], and the tensor each must be refused for."""
    params = _parameters(engine)
    new_first = params[FIRST] + 1.0  # valid, so applying it before noticing the rest would show
    vector = params[SECOND]
    return {
        "second has the wrong shape": ([new_first, torch.ones(vector.numel() + 1)], SECOND),
        "one tensor for two names": ([new_first], SECOND),
        "a scalar declared as a matrix": ([torch.tensor(0.5), vector + 1.0], FIRST),
        "second has the wrong dtype": ([new_first, vector.to(torch.float16)], SECOND),
        "not a tensor": ([new_first, vector.tolist()], SECOND),
    }


@pytest.mark.parametrize("case", ["second has the wrong shape", "one tensor for two names",
                                  "a scalar declared as a matrix", "second has the wrong dtype", "not a tensor"])
def test_tensors_unlike_their_declaration_are_refused_and_change_nothing(engine, case):
    before = _parameters(engine)
    tokens_before = run(engine.generate(PROMPT, GREEDY))[0].token_ids
    payload, offender = _bad_payloads(engine)[case]
    request = _declared([FIRST, SECOND], engine)
    request.payload = payload
    with pytest.raises(WeightUpdateError) as info:
        run(engine.validate_weight_update(request))
    assert offender in info.value.problems, info.value.problems
    with pytest.raises(WeightUpdateError) as info:
        run(engine.update_named_weights(request))
    assert offender in info.value.problems, info.value.problems
    assert engine.weight_version == 0 and engine.weights_loaded
    after = _parameters(engine)
    assert all(torch.equal(after[n], before[n]) for n in before), "a refused update changed a parameter"
    assert run(engine.generate(PROMPT, GREEDY))[0].token_ids == tokens_before


def test_more_tensors_than_names_are_refused(engine):
    params = _parameters(engine)
    request = _declared([SECOND], engine)
    request.payload = [params[SECOND] + 1.0, params[SECOND] + 2.0]
    with pytest.raises(WeightUpdateError) as info:
        run(engine.update_named_weights(request))
    assert "2 tensors for 1 names" in info.value.problems["payload"]
    assert engine.weight_version == 0 and torch.equal(_parameters(engine)[SECOND], params[SECOND])


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_values_are_refused_when_the_request_asks(engine, poison):
    before = _parameters(engine)
    tokens_before = run(engine.generate(PROMPT, GREEDY))[0].token_ids
    first = before[FIRST] + 1.0
    second = before[SECOND].clone()
    second[3] = poison
    update = WeightUpdateRequest.from_named_tensors([(FIRST, first), (SECOND, second)], check_finite=True)
    with pytest.raises(WeightUpdateError) as info:
        run(engine.update_named_weights(update))
    assert list(info.value.problems) == [SECOND] and "NaN or infinite" in info.value.problems[SECOND]
    assert engine.weight_version == 0
    assert all(torch.equal(_parameters(engine)[n], before[n]) for n in before)
    assert run(engine.generate(PROMPT, GREEDY))[0].token_ids == tokens_before
    # The same values pass where nothing asks to check them (the check is opt-in).
    clean = WeightUpdateRequest.from_named_tensors([(FIRST, first)], check_finite=True)
    assert run(engine.update_named_weights(clean)) == 1


def test_sync_weights_check_finite_over_shared_memory(model_dir):
    """The receiver checks the values it maps, before the engine loads any of them."""
    async def scenario():
        engine = sb.create_engine("transformers", model=model_dir, dtype="float32")
        try:
            before = _parameters(engine)
            weights = {n: t + 0.25 for n, t in before.items()}
            weights["model.layers.1.mlp.down_proj.weight"][0, 0] = float("-inf")
            with pytest.raises(WeightUpdateError) as info:
                await sync_weights(engine, weights, "shared_memory", bucket_bytes=SMALL_BUCKETS, check_finite=True)
            assert list(info.value.problems) == ["model.layers.1.mlp.down_proj.weight"]
            assert engine.weight_version == 0
            assert all(torch.equal(_parameters(engine)[n], before[n]) for n in before)
            # Unchecked, the same update goes in (what check_finite=False has always done).
            assert await sync_weights(engine, weights, "shared_memory", bucket_bytes=SMALL_BUCKETS) == [1]
        finally:
            await engine.teardown()

    run(scenario())


@pytest.mark.parametrize("layout, apply", [("packed", "atomic"), ("per_tensor", "atomic"), ("packed", "streamed")])
def test_broadcast_check_finite_refuses_before_loading_and_keeps_the_group_in_step(model_dir, layout, apply):
    """Atomic: nothing is applied. Streamed: the buckets before the offending one are applied, the
    engine refuses to generate, and the rest of the broadcast was still received, so the next update
    over the same group goes through."""
    async def scenario():
        engine = sb.create_engine("transformers", model=model_dir, dtype="float32")
        sender = await connect_broadcast(engine, backend="gloo", timeout_s=60, layout=layout, apply=apply,
                                         group_name=f"finite_{layout}_{apply}")
        try:
            before = _parameters(engine)
            tokens_before = (await engine.generate(PROMPT, GREEDY))[0].token_ids
            weights = {n: t + 0.25 for n, t in before.items()}
            last = list(weights)[-1]
            weights[last].view(-1)[0] = float("nan")
            with pytest.raises(WeightUpdateError) as info:
                await sync_weights(engine, weights, "broadcast", sender=sender, bucket_bytes=SMALL_BUCKETS,
                                   check_finite=True)
            assert list(info.value.problems) == [last]
            assert engine.weight_version == 0
            if apply == "atomic":
                assert not info.value.partly_applied and engine.weights_loaded
                assert all(torch.equal(_parameters(engine)[n], before[n]) for n in before)
                assert (await engine.generate(PROMPT, GREEDY))[0].token_ids == tokens_before
            else:
                assert info.value.partly_applied and not engine.weights_loaded
                assert not torch.equal(_parameters(engine)[FIRST], before[FIRST]), "the first bucket was applied"
                assert torch.equal(_parameters(engine)[last], before[last]), "the offending bucket was loaded"
            weights[last].view(-1)[0] = 0.0
            assert await sync_weights(engine, weights, "broadcast", sender=sender, bucket_bytes=SMALL_BUCKETS,
                                      check_finite=True) == [1]
            assert engine.weights_loaded
            assert all(torch.equal(_parameters(engine)[n], weights[n]) for n in weights)
        finally:
            sender.close()
            await engine.teardown()

    run(scenario())



def test_check_finite_names_exactly_the_non_finite_tensors():
    from skyrl_backends.weight_sync.delivery import check_finite

    big = torch.full((1000,), 60000.0, dtype=torch.float16)  # finite values whose fp16 sum overflows
    assert torch.isinf(big.sum())
    fine = [("big", big), ("ints", torch.arange(5)), ("flags", torch.ones(3, dtype=torch.bool)),
            ("empty", torch.empty(0)), ("fp8", torch.ones(4).to(torch.float8_e4m3fn)),
            ("bf16", torch.randn(64, 64).to(torch.bfloat16))]
    check_finite(fine)
    nan8 = torch.ones(4).to(torch.float8_e4m3fn)
    nan8[1] = float("nan")
    bad = [("neg_inf", torch.tensor([1.0, float("-inf")])), ("nan8", nan8),
           ("nan_bf16", torch.tensor([float("nan")], dtype=torch.bfloat16))]
    with pytest.raises(WeightUpdateError) as info:
        check_finite(fine + bad)
    assert sorted(info.value.problems) == ["nan8", "nan_bf16", "neg_inf"]
