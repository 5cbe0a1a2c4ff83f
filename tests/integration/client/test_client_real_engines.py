"""The engine client over real engines: several in this process, Ray actors, and remote engines behind
engine servers.

Every assertion is checked against the engines themselves: outputs against the same engine's
uninterrupted output for the same request, routing against the request ids each engine received.
"""

from __future__ import annotations

import asyncio

import pytest
from observers import EngineObserver
from skyrl_backends.client import InferenceEngineClient

GREEDY = {"temperature": 0.0, "ignore_eos": True}


def prompts(count, length=6, start=10):
    # Distinct prompts of one length (no padding differences between batch shapes).
    return [[start + (i * 7 + j * 3) % 400 for j in range(length)] for i in range(count)]


async def one_by_one(client, batch, params):
    outs = await asyncio.gather(*(client.generate([p], params) for p in batch))
    return [o[0].token_ids for o in outs]


def test_batch_split_across_engines_comes_back_in_order(aio, engines):
    observed = [EngineObserver(e) for e in engines]

    async def main():
        client = InferenceEngineClient(observed)
        batch = prompts(12)
        params = {"max_generate_length": 12, **GREEDY}
        out = await client.generate(batch, params, request_ids=[f"order-{i}" for i in range(12)])
        reference = await one_by_one(client, batch, params)
        assert out.response_ids == reference
        assert len({tuple(r) for r in reference}) > 1, "distinct prompts should give distinct outputs"
        assert [c.request_id for c in out] == [f"order-{i}" for i in range(12)]
        # The batch really was split: every engine got a share.
        shares = [sum(rid.startswith("order-") for rid in o.request_ids) for o in observed]
        assert all(s > 0 for s in shares) and sum(shares) == 12

    aio.run(main(), 300)


def test_every_turn_of_a_session_lands_on_the_same_engine(aio, engines):
    observed = [EngineObserver(e) for e in engines]

    async def main():
        client = InferenceEngineClient(observed)
        sessions = [f"conversation-{i}" for i in range(16)]
        history = prompts(16, length=4)
        for turn in range(3):
            out = await client.generate(history, {"max_generate_length": 4, **GREEDY}, session_ids=sessions,
                                        request_ids=[f"{s}/turn-{turn}" for s in sessions])
            history = [h + c.token_ids + [20 + turn] for h, c in zip(history, out)]
        engines_of = {s: {k for k, o in enumerate(observed) if any(r.startswith(s + "/") for r in o.request_ids)}
                      for s in sessions}
        assert all(len(where) == 1 for where in engines_of.values()), engines_of
        assert len({next(iter(w)) for w in engines_of.values()}) > 1, "sessions should spread over engines"

    aio.run(main(), 300)


def test_adding_an_engine_moves_only_the_sessions_it_takes(aio, local_engines):
    pool = [EngineObserver(e) for e in local_engines[:-1]]
    newcomer = EngineObserver(local_engines[-1])

    async def served(client, tag, sessions):
        await client.generate([[11, 12, 13]] * len(sessions), {"max_generate_length": 1, **GREEDY},
                              session_ids=sessions, request_ids=[f"{tag}/{s}" for s in sessions])
        where = {}
        for k, o in enumerate(client.engines):
            for rid in o.request_ids:
                if rid.startswith(tag + "/"):
                    where[rid.split("/", 1)[1]] = k
        return where

    async def main():
        client = InferenceEngineClient(pool)
        sessions = [f"s{i}" for i in range(240)]
        before = await served(client, "before", sessions)
        client.add_engine(newcomer)
        after = await served(client, "after", sessions)
        moved = [s for s in sessions if before[s] != after[s]]
        assert all(after[s] == len(pool) for s in moved), "a session may only move to the new engine"
        ideal = 1 / (len(pool) + 1)
        assert 0.5 * ideal < len(moved) / len(sessions) < 1.5 * ideal, (len(moved), ideal)

    aio.run(main(), 300)


# The uninterrupted outputs of the 64-request test, per placement: both pause strategies compare
# against the same greedy outputs, which take as long to generate as the test itself.
_UNINTERRUPTED: dict[str, list] = {}


@pytest.mark.parametrize("keep_strategy", ["auto", "continue"])
def test_pause_update_resume_with_64_requests_in_flight(aio, engines, placement, keep_strategy, model_weights):
    """64 requests in flight; pause, push weights, resume: none is lost and each has its exact
    length. The weights pushed are the model's own, so every output must equal the uninterrupted
    one token for token: the pause is invisible. ``continue`` forces the abort-and-resubmit pause."""
    batch = prompts(64, length=5)
    # Long enough that a fast engine cannot finish every request before the pause lands.
    lengths = [64 + (i * 5) % 29 for i in range(64)]

    async def main():
        client = InferenceEngineClient(engines, keep_strategy=keep_strategy)
        if placement not in _UNINTERRUPTED:
            _UNINTERRUPTED[placement] = await asyncio.gather(*(
                client.generate([p], {"max_generate_length": n, **GREEDY}) for p, n in zip(batch, lengths)))
        reference = _UNINTERRUPTED[placement]
        # Every other request is streamed: its chunks show when the engines are decoding. A fixed
        # sleep is not enough on a loaded machine, where the pause could land before any request
        # has a token (then no completion spans two versions).
        progress = [0] * len(batch)
        tasks = [asyncio.create_task(_streamed(client, p, n, progress, i) if i % 2 else
                                     client.generate([p], {"max_generate_length": n, **GREEDY}))
                 for i, (p, n) in enumerate(zip(batch, lengths))]
        await _until_in_flight(client, 64)
        await _until_decoding(progress, lengths)
        await client.pause_generation()
        if keep_strategy == "auto":  # natively paused sequences stay in their engines
            assert sum(h["inflight"] for h in client.health().values()) > 0
        if placement == "ray":
            from skyrl_backends.weight_sync import sync_weights

            versions = await sync_weights(client, model_weights, strategy="shared_memory")
            assert len(versions) == len(engines)
        else:
            await client.update_weights_from_tensors(model_weights)
        await client.resume_generation()
        outs = await asyncio.gather(*tasks)
        for out, ref, n in zip(outs, reference, lengths):
            assert out[0].finish_reason == "length"
            assert len(out[0].token_ids) == n
            assert out[0].token_ids == ref[0].token_ids
            # Per-token versions survive the engine kind (Ray included) and the continuation's seams.
            versions = out[0].token_versions
            assert versions is not None and versions.length == n
            assert versions.newest - versions.oldest <= 1 and len(versions.runs) <= 2
        assert any(len(out[0].token_versions.runs) == 2 for out in outs), (
            "the update landed while requests ran: some completion must span two versions")
        continuations = sum(h["continuations"] for h in client.health().values())
        if keep_strategy == "continue":
            assert continuations > 0, "the pause should have cut requests mid-way"
        else:
            assert continuations == 0

    aio.run(main(), 300)


def test_new_weights_during_pause_reach_every_engine_and_lengths_stay_exact(aio, engines, placement, model_weights):
    changed = [(name, t * 1.5 if t.dim() > 1 else t) for name, t in model_weights]
    probe = [[30, 31, 32, 33]]

    async def push(client, weights):
        if placement == "ray":
            from skyrl_backends.weight_sync import sync_weights

            await sync_weights(client, weights, strategy="shared_memory")
        else:
            await client.update_weights_from_tensors(weights)

    async def main():
        client = InferenceEngineClient(engines)
        before = [(await e.generate(probe, {"max_generate_length": 8, **GREEDY}))[0].token_ids for e in engines]
        tasks = [asyncio.create_task(client.generate([p], {"max_generate_length": 48, **GREEDY}))
                 for p in prompts(16)]
        await _until_in_flight(client, 16)
        await client.pause_generation()
        await push(client, changed)
        await client.resume_generation()
        outs = await asyncio.gather(*tasks)
        try:
            assert all(o[0].finish_reason == "length" and len(o[0].token_ids) == 48 for o in outs)
            after = [(await e.generate(probe, {"max_generate_length": 8, **GREEDY}))[0].token_ids for e in engines]
            assert len({tuple(a) for a in after}) == 1, "every engine serves the same new weights"
            assert after[0] != before[0], "the new weights change the output"
        finally:
            await push(client, model_weights)
        restored = [(await e.generate(probe, {"max_generate_length": 8, **GREEDY}))[0].token_ids for e in engines]
        assert restored == before

    aio.run(main(), 300)


@pytest.mark.own_engines
def test_engine_killed_mid_run_is_detected_and_its_requests_fail_over(aio, engines, placement, make_local_engine,
                                                                      request):
    """One engine of the pool dies while it serves requests: they complete on the others, with
    the same tokens as an uninterrupted run."""
    if placement == "ray":
        victim = request.getfixturevalue("make_ray_engines")(1)[0]
    elif placement == "remote":
        victim = request.getfixturevalue("make_remote_engines")(1)[0]
    else:
        victim = make_local_engine()
    batch = prompts(24, length=5, start=50)
    # Long enough that the victim cannot finish its share between the in-flight check and the kill.
    params = {"max_generate_length": 96, **GREEDY}

    async def kill():
        if placement == "ray":
            import ray

            ray.kill(victim.actor, no_restart=True)
        elif placement == "remote":
            victim._owned_server.process.kill()  # the server's process dies mid-answer
        else:
            await victim.teardown()

    async def main():
        client = InferenceEngineClient(list(engines) + [victim])
        victim_id = client.engine_ids[-1]
        reference = await one_by_one(InferenceEngineClient(engines), batch, params)
        task = asyncio.create_task(client.generate(batch, params))
        await _until_in_flight(client, 1, engine_id=victim_id)
        await asyncio.sleep(0.02)
        await kill()
        out = await task
        assert out.response_ids == reference
        health = client.health()
        assert health[victim_id]["healthy"] is False and health[victim_id]["failure"]
        assert health[victim_id]["sequences_submitted"] > 0
        # Afterwards nothing is routed to it.
        again = await client.generate(batch[:6], params)
        assert again.response_ids == reference[:6]
        assert client.health()[victim_id]["sequences_submitted"] == health[victim_id]["sequences_submitted"]

    aio.run(main(), 300)


@pytest.mark.own_engines
def test_engine_torn_down_mid_batch_returns_partial_output_and_the_batch_continues_from_it(
        aio, local_engines, make_local_engine):
    """An in-process engine torn down while it generates part of a batch hands back what it has
    (finish reason "abort"), and the client continues each of those sequences from there on the
    engines left: no prompt restarts from scratch, every output is the uninterrupted one (greedy),
    and no engine times out (``request_timeout``) on the way."""
    victim = EngineObserver(make_local_engine())
    survivors = [EngineObserver(e) for e in local_engines]
    batch = prompts(24, length=5, start=90)
    # Long enough that the victim is still generating when it is torn down.
    params = {"max_generate_length": 200, **GREEDY}

    async def main():
        undisturbed_s = -asyncio.get_running_loop().time()
        reference = (await InferenceEngineClient(local_engines).generate(batch, params)).response_ids
        undisturbed_s += asyncio.get_running_loop().time()
        client = InferenceEngineClient(survivors + [victim], request_timeout=60)
        victim_id = client.engine_ids[-1]
        started = asyncio.get_running_loop().time()
        task = asyncio.create_task(client.generate(batch, params))
        await _until_in_flight(client, 1, engine_id=victim_id)
        await asyncio.sleep(0.2)  # let it generate a few tokens
        await victim.teardown()
        out = await task
        elapsed_s = asyncio.get_running_loop().time() - started
        assert out.response_ids == reference
        assert out.finish_reasons == ["length"] * len(batch)
        # What the victim handed back: partial output, finish reason "abort".
        [cut] = victim.outputs
        assert {c.finish_reason for c in cut} == {"abort"}
        assert all(len(c.token_ids) < params["max_generate_length"] for c in cut)
        # Each cut sequence went on from its partial output: the continuation's prompt is the
        # original prompt plus those tokens, and nothing of the victim's share started over.
        victim_prompts = victim.requests[0].prompt_token_ids
        continued = [p for s in survivors for r in s.requests for p in r.prompt_token_ids
                     if len(p) > len(batch[0])]
        assert sorted(continued) == sorted(p + c.token_ids for p, c in zip(victim_prompts, cut))
        restarted = [p for s in survivors for r in s.requests for p in r.prompt_token_ids if p in victim_prompts]
        assert restarted == []
        health = client.health()
        assert health[victim_id]["healthy"] is False and "torn down" in health[victim_id]["failure"]
        assert health[victim_id]["continuations"] == len(cut) and health[victim_id]["failovers"] == 0
        assert all(health[e]["healthy"] for e in client.engine_ids[:-1]), health
        print(f"\n{len(cut)} of {len(batch)} sequences cut after {sorted(len(c.token_ids) for c in cut)} tokens "
              f"and continued; the batch took {elapsed_s:.2f}s (undisturbed on the survivors: {undisturbed_s:.2f}s)")

    aio.run(main(), 300)


async def _streamed(client, prompt, length, progress, index):
    """``client.generate([prompt], ...)`` through the client's stream, counting tokens in
    ``progress[index]`` as they arrive."""
    async for chunk in client.generate_stream([prompt], {"max_generate_length": length, **GREEDY}):
        progress[index] += len(chunk.token_ids)
        if chunk.completion is not None:
            return [chunk.completion]
    raise AssertionError("the stream ended without its completion")


async def _until(condition, what, timeout_s, poll_s=0.005):
    """Wait (bounded) until ``condition()`` holds; fail naming ``what()`` was never seen."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() >= deadline:
            raise AssertionError(what())
        await asyncio.sleep(poll_s)


async def _until_decoding(progress, lengths, timeout_s=120.0):
    """Wait (bounded) until some streamed request has tokens and is far from done, so that a
    pause now lands mid-way through it."""
    # 40 tokens to go: a remote engine's chunks can reach the client many tokens late.
    await _until(lambda: any(0 < done <= n - 40 for done, n in zip(progress, lengths)),
                 lambda: f"no streamed request was ever mid-way (tokens so far: {progress})", timeout_s, poll_s=0.002)


async def _until_in_flight(client, count, engine_id=None, timeout_s=60.0):
    """Wait (bounded) until the client has ``count`` sequences in flight (on one engine if given)."""
    def inflight():
        health = client.health()
        return health[engine_id]["inflight"] if engine_id else sum(h["inflight"] for h in health.values())

    await _until(lambda: inflight() >= count, lambda: f"fewer than {count} requests were ever in flight", timeout_s)


def test_ray_engines_colocated_on_the_trainers_placement_group(aio, ray_session, backend, model_dir,
                                                               engine_options):
    """Engines scheduled on bundles of a placement group the trainer owns (``colocate=True``), as
    with ``colocate_all``: on this CPU-only Ray the GPU fraction is 0, the placement is the same."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from skyrl_backends.errors import ConfigError
    from skyrl_backends.ray_wrapper import create_ray_engines

    with pytest.raises(ConfigError, match="placement_group"):
        create_ray_engines(1, backend, model_dir, colocate=True)
    trainer_group = placement_group([{"CPU": 0.5}])
    ray_session.get(trainer_group.ready(), timeout=120)
    try:
        engines = create_ray_engines(1, backend, model_dir, placement_group=trainer_group, colocate=True,
                                     num_cpus_per_engine=0.5, **engine_options)

        async def main():
            client = InferenceEngineClient(engines)
            out = await client.generate(prompts(2), {"max_generate_length": 4, **GREEDY})
            assert [len(c.token_ids) for c in out] == [4, 4]
            await client.teardown()

        aio.run(main(), 300)
        table = ray_session.util.placement_group_table(trainer_group)
        assert table["state"] == "CREATED"
    finally:
        remove_placement_group(trainer_group)


def test_a_ray_engines_weight_specs_are_asked_of_its_actor_once(aio, request):
    """``sync_weights`` reads the engines' weight specs at every sync: a Ray engine answers from what
    it was told the first time, not with a round trip to its actor each time."""
    if "ray" not in request.config.getoption("--client-placements").split(","):
        pytest.skip("ray engines not chosen (--client-placements)")
    proxy = request.getfixturevalue("ray_engines")[0]
    asked: list[str] = []
    call = proxy._call

    async def counting(method, *args, **kwargs):
        asked.append(method)
        return await call(method, *args, **kwargs)

    proxy._call = counting
    try:
        first = aio.run(proxy.weight_specs(), 60)
        first.clear()  # a caller's copy: changing it changes nothing kept
        second, third = aio.run(proxy.weight_specs(), 60), aio.run(proxy.weight_specs(), 60)
    finally:
        del proxy._call
    assert second and second == third
    assert asked.count("weight_specs") <= 1
