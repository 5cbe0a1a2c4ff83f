"""InferenceEngineClient logic on RecordingEngineDouble (routing, pause, abort, failover).

The same behaviours are proven on real engines in tests/integration/client; these tests pin the
client's own decisions, including failure modes a real engine cannot be made to show on demand
(an engine that hangs forever)."""

import asyncio

import pytest
from engine_doubles import RecordingEngineDouble, next_token
from skyrl_backends.client import InferenceEngineClient
from skyrl_backends.errors import EngineDeadError, SamplingParamsError, WeightUpdateError
from skyrl_backends.types import WeightUpdateRequest


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def doubles(count, **kw):
    return [RecordingEngineDouble(f"d{i}", **kw) for i in range(count)]


def expected(prompt, count):
    tokens = []
    for _ in range(count):
        tokens.append(next_token(prompt + tokens))
    return tokens


def served_by(engines, rid):
    return [e.name for e in engines if rid in e.received_request_ids]


def test_batch_is_split_and_returned_in_order():
    engines = doubles(3)

    async def main():
        client = InferenceEngineClient(engines)
        prompts = [[3 + i, 4] for i in range(12)]
        out = await client.generate(prompts, {"max_generate_length": 5})
        assert out.response_ids == [expected(p, 5) for p in prompts]
        assert all(len(e.requests) == 1 and len(e.requests[0]) == 4 for e in engines)

    run(main())


def test_n_samples_per_prompt_keep_prompt_major_order():
    engines = doubles(2)

    async def main():
        client = InferenceEngineClient(engines)
        out = await client.generate([[3], [4], [5]], {"max_generate_length": 3, "n": 2})
        assert out.response_ids == [expected(p, 3) for p in ([3], [3], [4], [4], [5], [5])]

    run(main())


def test_every_turn_of_a_session_goes_to_one_engine():
    engines = doubles(3)

    async def main():
        client = InferenceEngineClient(engines)
        for turn in range(3):
            sessions = [f"s{i}" for i in range(20)]
            out = await client.generate([[3, turn]] * 20, {"max_generate_length": 2}, session_ids=sessions,
                                        request_ids=[f"t{turn}-{s}" for s in sessions])
            assert len(out) == 20
        for s in (f"s{i}" for i in range(20)):
            where = {name for t in range(3) for name in served_by(engines, f"t{t}-{s}")}
            assert len(where) == 1
            assert where == {client.engine(client.route_session(s)).name}

    run(main())


@pytest.mark.parametrize("native", [False, True])
def test_pause_update_resume_loses_nothing_and_keeps_exact_lengths(native):
    engines = doubles(2, step_s=0.002, native_pause=native)

    async def main():
        client = InferenceEngineClient(engines)
        prompts = [[3 + i % 20, i] for i in range(64)]
        lengths = [20 + i % 17 for i in range(64)]
        tasks = [asyncio.create_task(client.generate([p], {"max_generate_length": n}))
                 for p, n in zip(prompts, lengths)]
        await asyncio.sleep(0.02)
        await client.pause_generation()
        update = WeightUpdateRequest(names=["w"], dtypes=["float32"], shapes=[()], payload=[1.0])
        assert await client.update_named_weights(update) == 1
        await client.resume_generation()
        outs = await asyncio.gather(*tasks)
        for p, n, out in zip(prompts, lengths, outs):
            assert out[0].finish_reason == "length"
            assert out[0].token_ids == expected(p, n)  # seamless: the same tokens as uninterrupted
        assert all(e.weights["w"] == 1.0 for e in engines)
        kinds = {kind for e in engines for kind, _ in e.calls}
        continuations = sum(s["continuations"] for s in client.health().values())
        if native:
            assert {"pause", "resume"} <= kinds and continuations == 0
        else:
            assert "abort" in kinds and continuations > 0

    run(main())


def test_stop_string_across_the_pause_seam_ends_the_output_where_it_would_have():
    from engine_doubles import decode

    engines = doubles(1, step_s=0.003)
    prompt = [3, 4, 5]
    full = expected(prompt, 200)
    stop = decode(full)[150:153]
    first = decode(full).find(stop)

    async def main():
        client = InferenceEngineClient(engines, decode=decode)
        uninterrupted = await client.generate([prompt], {"max_generate_length": 200, "stop": [stop]})
        task = asyncio.create_task(client.generate([prompt], {"max_generate_length": 200, "stop": [stop]}))
        await asyncio.sleep(0.05)
        await client.pause_generation()
        await client.resume_generation()
        out = await task
        assert out[0].token_ids == uninterrupted[0].token_ids == full[:first + 3]
        assert out[0].stop_reason == stop and out[0].text == decode(full)[:first + 3]

    run(main())


def test_abort_while_paused_returns_partial_output_at_once():
    engines = doubles(2, step_s=0.002)

    async def main():
        client = InferenceEngineClient(engines)
        task = asyncio.create_task(client.generate([[3]] * 4, {"max_generate_length": 500}))
        await asyncio.sleep(0.03)
        await client.pause_generation()
        waiting = asyncio.create_task(client.generate([[4]], {"max_generate_length": 5}))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        await client.abort()
        out, late = await task, await waiting
        assert all(c.finish_reason == "abort" and 0 < len(c.token_ids) < 500 for c in out)
        assert late[0].finish_reason == "abort" and late[0].token_ids == []
        await client.resume_generation()
        again = await client.generate([[4]], {"max_generate_length": 5})
        assert again[0].finish_reason == "length"

    run(main())


def test_abort_by_request_id_leaves_the_others_running():
    engines = doubles(2, step_s=0.002)

    async def main():
        client = InferenceEngineClient(engines)
        task = asyncio.create_task(client.generate([[3], [4]], {"max_generate_length": 100},
                                                   request_ids=["keep", "stop"]))
        await asyncio.sleep(0.02)
        await client.abort(["stop"])
        out = await task
        assert out[0].finish_reason == "length" and len(out[0].token_ids) == 100
        assert out[1].finish_reason == "abort" and len(out[1].token_ids) < 100

    run(main())


def test_dead_engine_is_marked_unhealthy_and_its_prompts_fail_over():
    engines = doubles(3, step_s=0.002)

    async def main():
        client = InferenceEngineClient(engines)
        sessions = [f"s{i}" for i in range(30)]
        victim_id = client.route_session("s0")
        victim = client.engine(victim_id)
        task = asyncio.create_task(client.generate([[3, i] for i in range(30)], {"max_generate_length": 40},
                                                   session_ids=sessions))
        await asyncio.sleep(0.02)
        victim.dead = True
        out = await task
        assert [c.token_ids for c in out] == [expected([3, i], 40) for i in range(30)]
        health = client.health()
        assert not health[victim_id]["healthy"] and "EngineDeadError" in health[victim_id]["failure"]
        assert client.route_session("s0") != victim_id
        # Sessions of the healthy engines did not move.
        others = [s for s in sessions if s != "s0"]
        client.mark_healthy(victim_id)
        back = {s: client.route_session(s) for s in others}
        client.mark_unhealthy(victim_id, "test")
        assert all(client.route_session(s) == back[s] for s in others if back[s] != victim_id)

    run(main())


def test_hung_engine_times_out_and_fails_over():
    engines = doubles(2)
    engines[0].hung = True

    async def main():
        client = InferenceEngineClient(engines, request_timeout=0.5)
        out = await client.generate([[3, i] for i in range(6)], {"max_generate_length": 4})
        assert out.response_ids == [expected([3, i], 4) for i in range(6)]
        health = client.health()
        assert not health["engine-0"]["healthy"] and "request_timeout" in health["engine-0"]["failure"]
        assert health["engine-1"]["healthy"]

    run(main())


def test_no_engine_left_fails_with_a_clear_error():
    engines = doubles(2)
    for e in engines:
        e.dead = True

    async def main():
        client = InferenceEngineClient(engines)
        with pytest.raises(EngineDeadError, match="no healthy engine"):
            await client.generate([[3]], {"max_generate_length": 4})

    run(main())


def test_request_errors_are_raised_not_failed_over():
    engines = doubles(2)

    async def main():
        client = InferenceEngineClient(engines)
        with pytest.raises(SamplingParamsError, match="max_generate_length"):
            await client.generate([[3]], {"max_generate_length": 0})
        assert all(h["healthy"] for h in client.health().values())

    run(main())


def test_a_bad_weight_update_changes_no_engine():
    engines = doubles(2)

    async def main():
        client = InferenceEngineClient(engines)
        bad = WeightUpdateRequest(names=["w", "nope"], dtypes=["float32"] * 2, shapes=[(), ()], payload=[5.0, 1.0])
        with pytest.raises(WeightUpdateError, match="nope"):
            await client.update_named_weights(bad)
        assert all(e.weights == {"w": 0.0} for e in engines)
        assert not any(kind == "update" for e in engines for kind, _ in e.calls)

    run(main())


def test_cancelled_caller_aborts_its_engine_requests():
    engines = doubles(1, step_s=0.002)

    async def main():
        client = InferenceEngineClient(engines)
        task = asyncio.create_task(client.generate([[3]], {"max_generate_length": 1000}, request_ids=["gone"]))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.02)
        assert ("abort", ["gone"]) in engines[0].calls
        assert client.health()["engine-0"]["inflight"] == 0

    run(main())


def test_adding_an_engine_moves_only_sessions_onto_it():
    engines = doubles(3)
    client = InferenceEngineClient(engines)
    sessions = [f"s{i}" for i in range(2000)]
    before = {s: client.route_session(s) for s in sessions}
    new_id = client.add_engine(RecordingEngineDouble("d3"))
    after = {s: client.route_session(s) for s in sessions}
    moved = [s for s in sessions if before[s] != after[s]]
    assert all(after[s] == new_id for s in moved)
    assert 0.15 < len(moved) / len(sessions) < 0.35


def test_fan_out_reaches_every_healthy_engine_and_teardown_every_engine():
    engines = doubles(3)

    async def main():
        client = InferenceEngineClient(engines)
        client.mark_unhealthy("engine-2", "test")
        await client.sleep(level=1)
        await client.wake_up()
        assert [("sleep", (None, 1)) in e.calls for e in engines] == [True, True, False]
        await client.teardown()
        assert all(e.closed for e in engines)

    run(main())


def test_engines_that_can_neither_pause_nor_abort_are_drained():
    engines = doubles(1, step_s=0.002, abortable=False)

    async def main():
        client = InferenceEngineClient(engines)
        running = asyncio.create_task(client.generate([[3]], {"max_generate_length": 30}))
        await asyncio.sleep(0.01)
        await client.pause_generation()  # returns once the running request has finished
        assert running.done() and len(running.result()[0].token_ids) == 30
        waiting = asyncio.create_task(client.generate([[4]], {"max_generate_length": 5}))
        await asyncio.sleep(0.02)
        assert not waiting.done() and len(engines[0].requests) == 1
        await client.resume_generation()
        assert (await waiting)[0].token_ids == expected([4], 5)
        assert not any(kind == "abort" for kind, _ in engines[0].calls)

    run(main())
