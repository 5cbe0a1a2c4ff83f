"""The client's pause modes, staleness bound and version bookkeeping, on RecordingEngineDouble.

The doubles' tokens depend only on the context, so a request cut and continued anywhere must end
with exactly the tokens of an uninterrupted one; real engines are checked by the conformance
suite's "In-flight weight update" group and plugins/transformers_backend/tests."""

import asyncio

import pytest
from engine_doubles import RecordingEngineDouble, next_token
from skyrl_backends.capabilities import Capabilities
from skyrl_backends.client import Continuation, InferenceEngineClient
from skyrl_backends.client.pausing import pause_kind, stale_segments
from skyrl_backends.sampling import SamplingParams
from skyrl_backends.types import Completion, TokenVersions, WeightUpdateRequest

UPDATE = WeightUpdateRequest(names=["w"], dtypes=["float32"], shapes=[()], payload=[1.0])


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def expected(prompt, count):
    tokens = []
    for _ in range(count):
        tokens.append(next_token(prompt + tokens))
    return tokens


def continuations(client):
    return sum(h["continuations"] for h in client.health().values())


def test_abort_mode_ends_requests_with_what_they_have_and_does_not_continue_them():
    engines = [RecordingEngineDouble("d0", step_s=0.002, native_pause=True)]

    async def main():
        client = InferenceEngineClient(engines)
        tasks = [asyncio.create_task(client.generate([[3, i]], {"max_generate_length": 500})) for i in range(4)]
        await asyncio.sleep(0.03)
        await client.pause_generation("abort")
        waiting = asyncio.create_task(client.generate([[5]], {"max_generate_length": 4}))
        await asyncio.sleep(0.01)
        assert not waiting.done(), "new requests wait while paused"
        await client.resume_generation()
        outs = [(await t)[0] for t in tasks]
        assert all(o.finish_reason == "abort" and 0 < len(o.token_ids) < 500 for o in outs)
        assert (await waiting)[0].token_ids == expected([5], 4)
        assert continuations(client) == 0
        assert ("pause", "abort") in engines[0].calls

    run(main())


def test_wait_mode_returns_once_requests_in_flight_have_finished():
    engines = [RecordingEngineDouble("d0", step_s=0.002)]

    async def main():
        client = InferenceEngineClient(engines)
        task = asyncio.create_task(client.generate([[3]], {"max_generate_length": 20}))
        await asyncio.sleep(0.01)
        await client.pause_generation("wait")
        assert task.done() and (await task)[0].token_ids == expected([3], 20)
        await client.resume_generation()
        assert ("pause", "wait") in engines[0].calls

    run(main())


@pytest.mark.parametrize("max_staleness, cut", [(None, False), (0, True)])
def test_max_staleness_cuts_natively_kept_requests_and_continues_them(max_staleness, cut):
    engines = [RecordingEngineDouble(f"d{i}", step_s=0.002, native_pause=True) for i in range(2)]
    prompts = [[3 + i, i] for i in range(8)]

    async def main():
        client = InferenceEngineClient(engines, max_staleness=max_staleness)
        tasks = [asyncio.create_task(client.generate([p], {"max_generate_length": 60})) for p in prompts]
        await asyncio.sleep(0.03)
        await client.pause_generation("keep")
        await client.update_named_weights(UPDATE)
        await client.resume_generation()
        outs = [(await t)[0] for t in tasks]
        assert [o.token_ids for o in outs] == [expected(p, 60) for p in prompts]
        assert (continuations(client) > 0) == cut
        aborts = [c for e in engines for c in e.calls if c[0] == "abort"]
        assert bool(aborts) == cut

    run(main())


def test_max_staleness_one_keeps_a_request_across_one_update_and_cuts_it_at_the_second():
    engines = [RecordingEngineDouble("d0", step_s=0.003, native_pause=True)]

    async def main():
        client = InferenceEngineClient(engines, max_staleness=1)
        task = asyncio.create_task(client.generate([[3]], {"max_generate_length": 300}))
        await asyncio.sleep(0.03)
        await client.update_named_weights(UPDATE)  # version 1: the segment spans 0..1, allowed
        assert continuations(client) == 0 and not any(c[0] == "abort" for c in engines[0].calls)
        await asyncio.sleep(0.02)
        await client.update_named_weights(UPDATE)  # version 2 would make it span 0..2: cut
        out = (await task)[0]
        assert out.token_ids == expected([3], 300) and continuations(client) == 1

    run(main())


def test_pause_plan_and_staleness_rules():
    keeps = Capabilities(native_pause=True, token_versions=True, abort=True)
    unlabelled = Capabilities(native_pause=True, abort=True)
    assert pause_kind(keeps, "keep", False, "auto") == "engine"
    assert pause_kind(keeps, "keep", True, "auto") == "continue", "cannot recompute: a continuation does"
    assert pause_kind(keeps, "keep", False, "continue") == "continue"
    assert pause_kind(unlabelled, "keep", False, "auto") == "continue", "versions would not be exact"
    assert pause_kind(Capabilities(), "keep", False, "auto") == "drain"
    assert pause_kind(Capabilities(), "wait", False, "auto") == "engine"
    assert stale_segments({"a": 0, "b": 2}, 3, 1) == ["a"]
    assert stale_segments({"a": 0}, 9, None) == []
    with pytest.raises(ValueError, match="max_staleness"):
        InferenceEngineClient([RecordingEngineDouble("d")], max_staleness=-1)
    with pytest.raises(ValueError, match="keep_strategy"):
        InferenceEngineClient([RecordingEngineDouble("d")], keep_strategy="abort")


def test_continuation_concatenates_versions_and_cuts_them_with_a_stop_string():
    state = Continuation(prompt=[1], params=SamplingParams(max_generate_length=6, stop=("cd",)))
    state.absorb(Completion([3, 4], "abort", text="ab", token_versions=TokenVersions.uniform(2, 0)))
    state.absorb(Completion([5, 6, 7], "length", text="cde", token_versions=TokenVersions.uniform(3, 1)))
    assert state.token_versions.per_token() == [0, 0, 1, 1, 1]
    result = state.result(lambda ids: "".join(chr(ord("a") + t - 3) for t in ids))
    assert result.token_ids == [3, 4, 5, 6] and result.stop_reason == "cd"
    assert result.token_versions.runs == ((0, 0), (2, 1)) and result.token_versions.length == 4
    unknown = Continuation(prompt=[1], params=SamplingParams(max_generate_length=4))
    unknown.absorb(Completion([3], "abort"))
    assert unknown.result().token_versions is None, "a segment without versions leaves them unknown"
