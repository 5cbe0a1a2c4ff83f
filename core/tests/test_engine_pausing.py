"""The facade's pause modes, admission gate and weight-version labels, checked on a test double.

``SteppingEngineDouble`` is not a backend: it "generates" one token per event-loop step (counting up
from the last prompt token), honours abort and its own native pause, and, when told to label, labels
each token with the version it was given by the last weight update, as the hook contract asks. Real
engines are checked by the conformance suite's "In-flight weight update" group.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import skyrl_backends as sb
import torch
from doubles import DOUBLE_CAPABILITIES, ArithmeticEngineDouble, DoublePlugin
from skyrl_backends import hookimpl
from skyrl_backends.errors import ConfigError, EngineStateError, UnsupportedCapabilityError
from skyrl_backends.types import Completion, GenerateOutput, StreamChunk, TokenVersions, WeightUpdateRequest

LONG = {"max_generate_length": 400}


class SteppingEngineDouble(ArithmeticEngineDouble):
    label = False
    mislabel = False  # labels one token too few

    def __init__(self, config):
        super().__init__(config)
        self.version = 0
        self.paused = False
        self.aborted: set[str] = set()
        self.abort_all = 0
        self.produced: dict[str, int] = {}  # tokens produced so far, per request

    async def _one(self, rid: str, prompt: list[int], n: int) -> Completion:
        tokens, versions, epoch = [], [], self.abort_all
        finish = "length"
        while len(tokens) < n:
            while self.paused and rid not in self.aborted and epoch == self.abort_all:
                await asyncio.sleep(0.001)
            if rid in self.aborted or epoch != self.abort_all:
                finish = "abort"
                break
            tokens.append(prompt[-1] + len(tokens) + 1)
            versions.append(self.version)
            self.produced[rid] = len(tokens)
            await asyncio.sleep(0.001)
        labels = None
        if self.label:
            labels = TokenVersions.from_per_token(versions[:-1] if self.mislabel else versions)
        return Completion(tokens, finish, request_id=rid, token_versions=labels)

    @hookimpl
    async def skyrl_backends_generate(self, request):
        self.calls.append(("generate", request.request_ids))
        n = request.sampling_params.max_generate_length
        return GenerateOutput(list(await asyncio.gather(
            *(self._one(rid, p, n) for rid, p in zip(request.request_ids, request.prompt_token_ids)))))

    @hookimpl
    async def skyrl_backends_abort(self, request_ids):
        self.calls.append(("abort", request_ids))
        if request_ids is None:
            self.abort_all += 1
        else:
            self.aborted.update(request_ids)

    @hookimpl
    async def skyrl_backends_pause_generation(self, mode, recompute):
        self.calls.append(("pause", (mode, recompute)))
        self.paused = True

    @hookimpl
    async def skyrl_backends_resume_generation(self):
        self.calls.append(("resume", None))
        self.paused = False

    @hookimpl
    async def skyrl_backends_update_named_weights(self, request, version):
        self.calls.append(("update", version))
        self.version = version


def make_engine(tmp_path, name="stepping", label=False, mislabel=False, **declared):
    caps = dataclasses.replace(DOUBLE_CAPABILITIES, token_versions=label, **declared)

    class Engine(SteppingEngineDouble):
        pass

    Engine.label, Engine.mislabel = label, mislabel

    class Plugin(DoublePlugin):
        @hookimpl
        def skyrl_backends_create_engine(self, config):
            return Engine(config)

    sb.register_backend(Plugin(name, caps), name)
    try:
        return sb.create_engine(name, model=str(tmp_path))
    finally:
        sb.unregister_backend(name)


def update():
    # Real tensors: the facade checks what an in-process update delivers against its declaration.
    return WeightUpdateRequest(names=["b"], shapes=[(2,)], dtypes=["float32"], payload=[torch.zeros(2)])


async def until_produced(engine, rid: str, count: int = 5) -> None:
    while engine.impl.produced.get(rid, 0) < count:
        await asyncio.sleep(0.001)


def test_keep_holds_requests_across_an_update_and_the_labels_say_where_it_landed(tmp_path):
    engine = make_engine(tmp_path, label=True, native_pause=True)

    async def scenario():
        task = asyncio.create_task(engine.generate([[1]], {"max_generate_length": 60}, request_ids=["r"]))
        await until_produced(engine, "r")
        await engine.pause_generation("keep")
        seam = engine.impl.produced["r"]
        assert await engine.update_named_weights(update()) == 1
        await engine.resume_generation()
        return seam, (await task)[0]

    seam, completion = asyncio.run(scenario())
    assert 0 < seam < 60 and completion.finish_reason == "length"
    assert completion.token_versions.runs == ((0, 0), (seam, 1))
    assert ("pause", ("keep", False)) in engine.impl.calls


def test_new_requests_wait_at_the_gate_until_resume(tmp_path):
    engine = make_engine(tmp_path, label=True)

    async def scenario():
        await engine.pause_generation("wait")
        waiting = asyncio.create_task(engine.generate([[1]], {"max_generate_length": 3}))
        await asyncio.sleep(0.02)
        assert not waiting.done() and not any(c[0] == "generate" for c in engine.impl.calls)
        await engine.update_named_weights(update())
        await engine.resume_generation()
        return (await waiting)[0]

    completion = asyncio.run(scenario())
    assert completion.token_versions.runs == ((0, 1),), "admitted after the update: all new weights"


def test_abort_mode_ends_in_flight_requests_before_returning(tmp_path):
    engine = make_engine(tmp_path)  # no native pause: the facade aborts and drains

    async def scenario():
        task = asyncio.create_task(engine.generate([[1]], LONG, request_ids=["r"]))
        await until_produced(engine, "r")
        await engine.pause_generation("abort")
        assert task.done(), "pause('abort') returns once the aborted requests have returned"
        assert engine.num_inflight == 0 and engine.paused and engine.pause_mode == "abort"
        await engine.resume_generation()
        return (await task)[0]

    completion = asyncio.run(scenario())
    assert completion.finish_reason == "abort" and 0 < len(completion.token_ids) < 400
    assert completion.token_versions == TokenVersions.uniform(len(completion.token_ids), 0)
    assert ("abort", None) in engine.impl.calls


def test_wait_mode_lets_in_flight_requests_finish_before_returning(tmp_path):
    engine = make_engine(tmp_path)

    async def scenario():
        task = asyncio.create_task(engine.generate([[1]], {"max_generate_length": 30}, request_ids=["r"]))
        await until_produced(engine, "r", 2)
        await engine.pause_generation("wait")
        assert task.done()
        await engine.resume_generation()
        return (await task)[0]

    assert asyncio.run(scenario()).finish_reason == "length"


def test_native_modes_go_to_the_engine(tmp_path):
    engine = make_engine(tmp_path, pause_modes=("abort", "wait"))

    async def scenario():
        await engine.pause_generation("wait")
        await engine.resume_generation()
        await engine.pause_generation("abort")
        await engine.resume_generation()

    asyncio.run(scenario())
    calls = [c for c in engine.impl.calls if c[0] in ("pause", "resume")]
    assert calls == [("pause", ("wait", False)), ("resume", None), ("pause", ("abort", False)), ("resume", None)]


def test_aborting_a_request_waiting_at_the_gate_returns_it_empty(tmp_path):
    engine = make_engine(tmp_path)

    async def scenario():
        await engine.pause_generation("wait")
        waiting = asyncio.create_task(engine.generate([[1], [2]], LONG, request_ids=["a", "b"]))
        await asyncio.sleep(0.01)
        await engine.abort(["a"])
        await asyncio.sleep(0.01)
        assert not waiting.done(), "b still waits"
        await engine.resume_generation()
        return await waiting

    out = asyncio.run(scenario())
    assert out[0].token_ids == [] and out[0].finish_reason == "abort"
    assert out[1].finish_reason == "length" and len(out[1].token_ids) == 400
    assert [c[1] for c in engine.impl.calls if c[0] == "generate"] == [["b"]]


def test_an_update_on_a_backend_that_does_not_label_waits_for_requests_in_flight(tmp_path, caplog):
    engine = make_engine(tmp_path)

    async def scenario():
        running = asyncio.create_task(engine.generate([[1]], {"max_generate_length": 40}, request_ids=["r"]))
        await until_produced(engine, "r", 2)
        updating = asyncio.create_task(engine.update_named_weights(update()))
        await asyncio.sleep(0)
        later = asyncio.create_task(engine.generate([[1]], {"max_generate_length": 3}, request_ids=["later"]))
        assert await updating == 1
        return (await running)[0], (await later)[0]

    with caplog.at_level("INFO", logger="skyrl_backends.engine"):
        running, later = asyncio.run(scenario())
    names = [c[0] if c[0] != "generate" else c[1][0] for c in engine.impl.calls]
    assert names.index("update") > names.index("r") and names.index("later") > names.index("update")
    assert running.token_versions == TokenVersions.uniform(40, 0)
    assert later.token_versions == TokenVersions.uniform(3, 1)
    # The trainer is told why its update stood still, and how to keep requests running instead.
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "waits for the 1 request(s) in flight" in warnings[0]
    assert "InferenceEngineClient" in warnings[0] and "'token_versions'" in warnings[0]
    assert any("weight update 1 waited" in r.getMessage() for r in caplog.records if r.levelname == "INFO")


def test_the_warning_that_updates_wait_for_requests_comes_once_per_engine(tmp_path, caplog):
    engine = make_engine(tmp_path)

    async def one_update_under_a_request(rid: str) -> None:
        running = asyncio.create_task(engine.generate([[1]], {"max_generate_length": 20}, request_ids=[rid]))
        await until_produced(engine, rid, 2)
        await engine.update_named_weights(update())
        await running

    async def scenario():
        await one_update_under_a_request("first")
        await one_update_under_a_request("second")
        await engine.update_named_weights(update())  # nothing in flight: nothing to wait for

    with caplog.at_level("INFO", logger="skyrl_backends.engine"):
        asyncio.run(scenario())
    assert engine.weight_version == 3
    assert [r.levelname for r in caplog.records if "in flight" in r.getMessage()] == ["WARNING", "INFO", "INFO"]


def test_an_update_under_a_keep_pause_of_a_backend_that_does_not_label_is_refused(tmp_path):
    engine = make_engine(tmp_path, native_pause=True)

    async def scenario():
        task = asyncio.create_task(engine.generate([[1]], LONG, request_ids=["r"]))
        await until_produced(engine, "r")
        await engine.pause_generation("keep")
        with pytest.raises(EngineStateError, match="token_versions"):
            await engine.update_named_weights(update())
        await engine.resume_generation()
        return (await task)[0]

    assert asyncio.run(scenario()).token_versions == TokenVersions.uniform(400, 0)
    assert engine.weight_version == 0


def test_labels_that_do_not_cover_the_tokens_are_refused(tmp_path):
    engine = make_engine(tmp_path, label=True, mislabel=True)
    with pytest.raises(EngineStateError, match="labelled 2 token"):
        asyncio.run(engine.generate([[1]], {"max_generate_length": 3}))


def test_pause_arguments_and_capabilities_are_checked(tmp_path):
    plain = make_engine(tmp_path)
    with pytest.raises(ConfigError, match="mode"):
        asyncio.run(plain.pause_generation("freeze"))
    with pytest.raises(ConfigError, match="recompute"):
        asyncio.run(plain.pause_generation("abort", recompute=True))
    with pytest.raises(UnsupportedCapabilityError, match="native_pause"):
        asyncio.run(plain.pause_generation("keep"))
    keeping = make_engine(tmp_path, name="keeping", native_pause=True)
    with pytest.raises(UnsupportedCapabilityError, match="recompute_on_resume"):
        asyncio.run(keeping.pause_generation("keep", recompute=True))

    async def twice():
        await keeping.pause_generation("keep")
        await keeping.pause_generation("keep")  # the same mode again: nothing happens
        with pytest.raises(EngineStateError, match="already paused"):
            await keeping.pause_generation("wait")
        await keeping.resume_generation()
        await keeping.resume_generation()  # not paused: nothing happens

    asyncio.run(twice())
    assert [c[0] for c in keeping.impl.calls if c[0] in ("pause", "resume")] == ["pause", "resume"]


def test_a_pause_hook_written_before_modes_still_works(tmp_path):
    class OldEngine(ArithmeticEngineDouble):
        @hookimpl
        async def skyrl_backends_pause_generation(self):
            self.calls.append(("pause", None))

        @hookimpl
        async def skyrl_backends_resume_generation(self):
            self.calls.append(("resume", None))

    class Plugin(DoublePlugin):
        @hookimpl
        def skyrl_backends_create_engine(self, config):
            return OldEngine(config)

    sb.register_backend(Plugin("old", dataclasses.replace(DOUBLE_CAPABILITIES, native_pause=True)), "old")
    try:
        engine = sb.create_engine("old", model=str(tmp_path))
    finally:
        sb.unregister_backend("old")
    asyncio.run(engine.pause_generation())
    asyncio.run(engine.resume_generation())
    assert [c[0] for c in engine.impl.calls] == ["pause", "resume"]


def test_streamed_labels_must_add_up_to_the_completion_labels(tmp_path):
    class Streaming(SteppingEngineDouble):
        @hookimpl
        async def skyrl_backends_generate_stream(self, request):
            yield StreamChunk(0, [5, 6], token_versions=TokenVersions.uniform(2, 0))
            yield StreamChunk(0, [], completion=Completion([5, 6], "length",
                                                           token_versions=TokenVersions.from_per_token([0, 1])))

    class Plugin(DoublePlugin):
        @hookimpl
        def skyrl_backends_create_engine(self, config):
            return Streaming(config)

    caps = dataclasses.replace(DOUBLE_CAPABILITIES, streaming=True, token_versions=True)
    sb.register_backend(Plugin("lying", caps), "lying")
    try:
        engine = sb.create_engine("lying", model=str(tmp_path))
    finally:
        sb.unregister_backend("lying")

    async def consume():
        stream = engine.generate_stream([[1]], {"max_generate_length": 2})
        first = await stream.__anext__()
        engine.weight_version = 1  # as if an update had landed meanwhile: version 1 is plausible
        return [first] + [c async for c in stream]

    with pytest.raises(EngineStateError, match="streamed token versions"):
        asyncio.run(consume())


def test_declaring_native_pause_modes_without_the_hooks_is_refused(tmp_path):
    caps = dataclasses.replace(DOUBLE_CAPABILITIES, pause_modes=("abort",))
    sb.register_backend(DoublePlugin("nohooks", caps), "nohooks")
    try:
        with pytest.raises(sb.BackendLoadError, match="skyrl_backends_pause_generation"):
            sb.create_engine("nohooks", model=str(tmp_path))
    finally:
        sb.unregister_backend("nohooks")


def test_tokens_labelled_with_an_update_still_being_applied_are_accepted(tmp_path):
    class SlowToReturn(SteppingEngineDouble):
        @hookimpl
        async def skyrl_backends_update_named_weights(self, request, version):
            self.version = version  # the engine already serves it...
            await asyncio.sleep(0.05)  # ...while its hook has not returned yet

    class Plugin(DoublePlugin):
        @hookimpl
        def skyrl_backends_create_engine(self, config):
            engine = SlowToReturn(config)
            engine.label = True
            return engine

    sb.register_backend(Plugin("slow-update", dataclasses.replace(DOUBLE_CAPABILITIES, token_versions=True)),
                        "slow-update")
    try:
        engine = sb.create_engine("slow-update", model=str(tmp_path))
    finally:
        sb.unregister_backend("slow-update")

    async def scenario():
        task = asyncio.create_task(engine.generate([[1]], {"max_generate_length": 12}, request_ids=["r"]))
        await until_produced(engine, "r", 6)
        await engine.update_named_weights(update())
        return (await task)[0]

    completion = asyncio.run(scenario())
    assert completion.token_versions.oldest == 0 and completion.token_versions.newest == 1
