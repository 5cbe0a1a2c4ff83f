"""The facade's generate_stream bookkeeping, checked on test doubles (no engine needed): index
mapping under n > 1, the fallback for backends without streaming, the chunk/completion check and
in-flight tracking. Real engines are checked by the conformance suite's streaming group."""

import asyncio
import dataclasses

import pytest
from doubles import DOUBLE_CAPABILITIES, ArithmeticEngineDouble, DoublePlugin

import skyrl_backends as sb
from skyrl_backends import hookimpl
from skyrl_backends.errors import EngineStateError
from skyrl_backends.types import Completion, GenerateRequest, StreamChunk

FALLBACK_CAPABILITIES = dataclasses.replace(DOUBLE_CAPABILITIES, seeded_sampling=True)
STREAMING_CAPABILITIES = dataclasses.replace(FALLBACK_CAPABILITIES, streaming=True)


class StreamingEngineDouble(ArithmeticEngineDouble):
    """The arithmetic double, handing out one token per chunk; ``lie`` makes the final completion
    disagree with the chunks."""

    lie = False

    @hookimpl
    async def skyrl_backends_generate_stream(self, request: GenerateRequest):
        output = await self.skyrl_backends_generate(request)
        for step in range(request.sampling_params.max_generate_length):
            for index, completion in enumerate(output.completions):
                yield StreamChunk(index, [completion.token_ids[step]])
                await asyncio.sleep(0)
        for index, completion in enumerate(output.completions):
            tokens = completion.token_ids + ([0] if self.lie else [])
            yield StreamChunk(index, [], completion=Completion(tokens, "length"))


class StreamingDoublePlugin(DoublePlugin):
    @hookimpl
    def skyrl_backends_create_engine(self, config):
        return StreamingEngineDouble(config)


@pytest.fixture(params=["fallback", "streaming"])
def engine(request, tmp_path):
    plugin = StreamingDoublePlugin(name="sdouble", capabilities=STREAMING_CAPABILITIES) \
        if request.param == "streaming" else DoublePlugin(name="sdouble", capabilities=FALLBACK_CAPABILITIES)
    sb.register_backend(plugin, "sdouble")
    yield sb.create_engine("sdouble", model=str(tmp_path))
    sb.unregister_backend("sdouble")


async def collect(engine, *args, **kwargs) -> list[StreamChunk]:
    return [chunk async for chunk in engine.generate_stream(*args, **kwargs)]


@pytest.mark.parametrize("seed", [None, 7])
def test_indices_follow_generate_order_with_n_samples(engine, seed):
    params = {"max_generate_length": 3, "n": 2, "seed": seed}
    expected = asyncio.run(engine.generate([[10], [20], [30]], params))
    chunks = asyncio.run(collect(engine, [[10], [20], [30]], params))
    finals = {c.index: c.completion for c in chunks if c.finished}
    assert sorted(finals) == list(range(6))
    for index, completion in finals.items():
        assert completion.token_ids == expected[index].token_ids
        assert [t for c in chunks if c.index == index for t in c.token_ids] == completion.token_ids
        assert completion.request_id


def test_streaming_backend_yields_tokens_before_the_end(engine):
    chunks = asyncio.run(collect(engine, [[10]], {"max_generate_length": 4}))
    streaming = engine.capabilities.streaming
    assert len(chunks) == (5 if streaming else 1)
    assert chunks[-1].finished and all(not c.finished for c in chunks[:-1])
    assert chunks[-1].completion.weight_version == engine.weight_version


def test_inflight_is_tracked_and_released(engine):
    async def watch():
        seen = []
        async for _ in engine.generate_stream([[10], [20]], {"max_generate_length": 2}):
            seen.append(engine.num_inflight)
        return seen

    seen = asyncio.run(watch())
    # Without streaming the whole batch has returned before its first chunk is handed out.
    assert seen[0] == (2 if engine.capabilities.streaming else 0)
    assert engine.num_inflight == 0


def test_state_checks_apply_before_streaming(engine):
    asyncio.run(engine.sleep(level=1))
    with pytest.raises(sb.EngineAsleepError):
        asyncio.run(collect(engine, [[10]], {"max_generate_length": 2}))


def test_chunks_that_disagree_with_the_completion_are_refused(tmp_path):
    plugin = StreamingDoublePlugin(name="liar", capabilities=STREAMING_CAPABILITIES)
    sb.register_backend(plugin, "liar")
    try:
        engine = sb.create_engine("liar", model=str(tmp_path))
        engine.impl.lie = True
        with pytest.raises(EngineStateError, match="streamed tokens"):
            asyncio.run(collect(engine, [[10]], {"max_generate_length": 2}))
    finally:
        sb.unregister_backend("liar")


def test_declaring_streaming_without_the_hook_is_rejected(tmp_path):
    sb.register_backend(DoublePlugin(name="nohook", capabilities=STREAMING_CAPABILITIES), "nohook")
    try:
        with pytest.raises(Exception, match="skyrl_backends_generate_stream"):
            sb.create_engine("nohook", model=str(tmp_path))
    finally:
        sb.unregister_backend("nohook")
