"""The remote engine against a real transformers engine behind the engine API: the same outputs and
the same exceptions as the engine in process, retries that never run a generation twice, aborts that
cannot miss, the API key on every engine route, and every feature of the engine API through the wire
(per-token weight versions, pause modes, LoRA adapters sent as tensors, check_finite)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import uuid

import httpx
import pytest
import skyrl_backends as sb
from conftest import API_KEY
from skyrl_backends import errors
from skyrl_backends.remote import connect_engine, wire
from skyrl_backends.types import TokenVersions, WeightUpdateRequest

GREEDY = {"max_generate_length": 12, "temperature": 0.0, "ignore_eos": True, "logprobs": 3}
LONG = {"max_generate_length": 400, "temperature": 0.0, "ignore_eos": True}
PROMPTS = [[5, 6, 7, 8], [100, 42, 17]]


def run(coro):
    return asyncio.run(coro)


def test_remote_output_is_the_engines_own_output(served, remote):
    ids = [uuid.uuid4().hex for _ in PROMPTS]
    local = served.run(served.engine.generate(PROMPTS, GREEDY))
    got = run(remote.generate(PROMPTS, GREEDY, request_ids=ids))
    assert got.response_ids == local.response_ids
    # Not bit-exact: the second run may be served from the prefix cache (floats cross JSON exactly:
    # core/tests/remote/test_wire.py).
    for ours, theirs in zip(got, local, strict=True):
        assert ours.logprobs == pytest.approx(theirs.logprobs, abs=1e-4)
        assert [sorted(step) for step in ours.top_logprobs] == [sorted(step) for step in theirs.top_logprobs]
    assert [c.request_id for c in got] == ids
    assert [c.token_versions for c in got] == [c.token_versions for c in local]
    assert [c.weight_version for c in got] == [served.engine.weight_version] * 2
    assert remote.backend == "transformers" and remote.capabilities.streaming
    assert remote.parallel_sizes() == served.engine.parallel_sizes()
    assert remote.engine_version() == served.engine.engine_version()


def test_capabilities_and_config_are_the_servers_plus_what_the_connection_carries(served, remote):
    from skyrl_backends.remote import transport_capabilities

    assert remote.capabilities == transport_capabilities(served.engine.capabilities, same_host=True)
    for strategies in (remote.capabilities.weight_sync_strategies, remote.capabilities.lora_from_tensors):
        assert strategies[0] == "tensors" and "shared_memory" in strategies  # in-process tensors by shared memory
    caps = remote.capabilities
    assert caps.token_versions and caps.native_pause and caps.recompute_on_resume
    assert (remote.config.model, remote.config.max_lora_rank, remote.config.enable_lora) == (
        served.engine.config.model, served.engine.config.max_lora_rank, True)


def test_n_samples_and_seeds_cross_the_wire(served, remote):
    params = {"max_generate_length": 6, "temperature": 1.0, "seed": 7, "n": 3}
    local = served.run(served.engine.generate(PROMPTS, params))
    got = run(remote.generate(PROMPTS, params))
    assert len(got) == 6 and got.response_ids == local.response_ids


def test_stream_chunks_add_up_to_the_completion(served, remote):
    async def main():
        chunks = [c async for c in remote.generate_stream([PROMPTS[0]], GREEDY)]
        return chunks

    chunks = run(main())
    local = served.run(served.engine.generate([PROMPTS[0]], GREEDY))
    assert len(chunks) > 1, "tokens should arrive as they are generated, not all at the end"
    assert [t for c in chunks for t in c.token_ids] == local[0].token_ids
    assert chunks[-1].completion is not None and chunks[-1].completion.token_ids == local[0].token_ids


def _outcome(call):
    try:
        call()
    except Exception as exc:  # what the engine raised, to compare
        return type(exc), str(exc), {k: v for k, v in vars(exc).items()}
    return None


def adapter(lora_dir: str) -> tuple[dict, dict]:
    """The tiny model's adapter: its tensors (PEFT naming) and its config as JSON."""
    from safetensors.torch import load_file

    with open(os.path.join(lora_dir, "adapter_config.json")) as f:
        return load_file(os.path.join(lora_dir, "adapter_model.safetensors")), json.load(f)


@pytest.mark.parametrize("case", ["logprobs_beyond_max", "sleep_level_3", "unknown_adapter", "bad_shape",
                                  "typo_name", "lora_missing_dir", "pause_mode_unknown", "recompute_outside_keep",
                                  "not_finite", "delivered_dtype_differs", "adapter_tensor_missing",
                                  "adapter_rank_too_high"])
def test_errors_are_the_same_class_and_message_as_in_process(served, remote, case, lora_dir):
    spec = next(iter(served.run(served.engine.weight_specs()).values()))

    def call(engine, execute):
        if case == "pause_mode_unknown":
            return lambda: execute(engine.pause_generation("freeze"))
        if case == "recompute_outside_keep":
            return lambda: execute(engine.pause_generation("abort", recompute=True))
        if case.startswith("adapter_"):
            from skyrl_backends.weight_sync import sync_lora_adapter

            tensors, config = adapter(lora_dir)
            if case == "adapter_tensor_missing":
                tensors = {k: v for k, v in tensors.items() if "layers.0" not in k}
            if case == "adapter_rank_too_high":
                config = {**config, "r": 1000}
            return lambda: execute(sync_lora_adapter(engine, "a", tensors, config, "tensors"))
        if case == "logprobs_beyond_max":
            return lambda: execute(engine.generate(PROMPTS, {"max_generate_length": 2, "logprobs": 50}))
        if case == "sleep_level_3":
            return lambda: execute(engine.sleep(level=3))
        if case == "unknown_adapter":
            return lambda: execute(engine.unload_lora_adapter("nope"))
        if case == "lora_missing_dir":
            return lambda: execute(engine.load_lora_adapter("a", "/no/such/dir"))
        import torch

        if case == "bad_shape":
            return lambda: execute(engine.update_weights_from_tensors([(spec.name, torch.zeros(3))]))
        if case == "not_finite":
            bad = torch.full(spec.shape, math.nan, dtype=getattr(torch, spec.dtype))
            return lambda: execute(engine.update_named_weights(
                WeightUpdateRequest.from_named_tensors([(spec.name, bad)], check_finite=True)))
        if case == "delivered_dtype_differs":  # declared as the engine holds it, delivered as float16
            request = WeightUpdateRequest([spec.name], [spec.dtype], [spec.shape], "tensors",
                                          [torch.zeros(spec.shape, dtype=torch.float16)])
            return lambda: execute(engine.update_named_weights(request))
        request = WeightUpdateRequest([spec.name + "x"], [spec.dtype], [spec.shape])
        return lambda: execute(engine.validate_weight_update(request))

    before = served.engine.weight_version
    local = _outcome(call(served.engine, served.run))
    got = _outcome(call(remote, run))
    assert served.engine.weight_version == before and not served.engine.lora_adapters  # nothing was applied
    assert local is not None and got is not None
    assert got[0] is local[0], f"{got[0].__name__} instead of {local[0].__name__}"
    assert got[1] == local[1]
    assert got[2] == local[2]


def test_state_errors_and_the_mirrored_state(served, remote):
    async def main():
        await remote.sleep(tags=["kv_cache"])
        assert remote.asleep_tags == {"kv_cache"}
        with pytest.raises(errors.EngineAsleepError) as info:
            await remote.generate(PROMPTS, GREEDY)
        assert info.value.asleep_tags == ["kv_cache"]
        await remote.wake_up()
        assert remote.asleep_tags == frozenset() and remote.weights_loaded
        await remote.pause_generation()
        assert remote.paused and (await remote.health())["status"] == "paused"
        await remote.resume_generation()
        assert not remote.paused and (await remote.health())["status"] == "ok"

    run(main())


def test_a_dropped_connection_is_retried_without_running_the_generation_twice(served, proxy):
    remote = connect_engine(proxy.url, api_key=API_KEY, retries=3)
    rid = uuid.uuid4().hex
    proxy.cut_after(b'"accepted"')
    before = served.observed.request_ids.count(rid)
    out = run(remote.generate([PROMPTS[0]], GREEDY, request_ids=[rid]))
    assert proxy.cuts == 1, "the proxy should have broken the first answer"
    assert served.observed.request_ids.count(rid) - before == 1, "the retry started a second generation"
    local = served.run(served.engine.generate([PROMPTS[0]], GREEDY))
    assert out.response_ids == local.response_ids and out[0].request_id == rid
    run(remote.teardown())


def test_a_broken_stream_resumes_where_it_broke(served, proxy):
    remote = connect_engine(proxy.url, api_key=API_KEY, retries=3)
    rid = uuid.uuid4().hex
    params = {**GREEDY, "max_generate_length": 24}

    async def main():
        proxy.cut_after(b'"chunk"')
        return [c async for c in remote.generate_stream([PROMPTS[1]], params, request_ids=[rid])]

    chunks = run(main())
    local = served.run(served.engine.generate([PROMPTS[1]], params))
    assert proxy.cuts == 1
    assert served.observed.request_ids.count(rid) == 1
    assert [t for c in chunks for t in c.token_ids] == local[0].token_ids  # nothing lost, nothing twice
    assert chunks[-1].completion.token_ids == local[0].token_ids
    run(remote.teardown())


def test_a_call_the_server_forgot_is_not_spliced_from_two_runs(served, proxy):
    """The stream breaks and the server loses the call (as if it restarted): resuming would join two
    generations, so the remote engine reports the engine dead instead."""
    remote = connect_engine(proxy.url, api_key=API_KEY, retries=3)

    def forget():
        served.loop.loop.call_soon_threadsafe(served.log._operations.clear)

    async def main():
        proxy.cut_after(b'"chunk"', then=forget)
        return [c async for c in remote.generate_stream([PROMPTS[1]], {**GREEDY, "max_generate_length": 24})]

    with pytest.raises(errors.EngineDeadError, match="lost a call in progress"):
        run(main())
    run(remote.teardown())


def test_a_silent_server_is_reported_dead_and_the_call_is_not_repeated(served, proxy):
    remote = connect_engine(proxy.url, api_key=API_KEY, retries=1, heartbeat_timeout_s=1.0)
    rid = uuid.uuid4().hex
    proxy.stall()
    try:
        with pytest.raises(errors.EngineDeadError, match="did not answer"):
            run(remote.generate([PROMPTS[0]], {"max_generate_length": 4}, request_ids=[rid]))
    finally:
        proxy.resume()
    assert served.observed.request_ids.count(rid) == 1
    run(remote.teardown())


def test_an_abort_that_overtakes_its_request_still_aborts_it(served, remote):
    async def main():
        await remote.abort(["overtaken"])  # the generate below has not reached the server yet
        return await remote.generate([PROMPTS[0]], LONG, request_ids=["overtaken"])

    out = run(main())
    assert out[0].finish_reason == "abort" and len(out[0].token_ids) < LONG["max_generate_length"]


def test_abort_of_a_running_request_and_abort_all(served, remote):
    async def main():
        victim = asyncio.ensure_future(remote.generate([PROMPTS[0]], LONG, request_ids=["victim"]))
        others = [asyncio.ensure_future(remote.generate([p], LONG)) for p in PROMPTS]
        while remote.num_inflight < 3:
            await asyncio.sleep(0.01)
        await remote.abort(["victim"])
        first = await victim
        await remote.abort()
        return first, await asyncio.gather(*others)

    first, rest = run(main())
    assert first[0].finish_reason == "abort"
    assert all(o[0].finish_reason == "abort" for o in rest)
    assert remote.num_inflight == 0


def test_an_abandoned_stream_is_aborted_on_the_server(served):
    key = uuid.uuid4().hex
    body = {"prompt_token_ids": [PROMPTS[0]], "sampling_params": LONG, "request_ids": [key], "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}", "Accept": wire.NDJSON, wire.IDEMPOTENCY_HEADER: key}
    with httpx.stream("POST", served.url + "/skyrl/v1/generate", json=body, headers=headers, timeout=30) as response:
        for line in response.iter_lines():
            if '"chunk"' in line:
                break  # the caller goes away mid-stream
    operation = next(op for op in list(served.log._operations.values()) if op.key == key)
    terminal = served.run(operation.wait(), 60)
    finals = [e["chunk"]["completion"] for e in operation.events if e.get("event") == "chunk"
              and e["chunk"]["completion"]]
    assert terminal["event"] == "result" and finals and finals[0]["finish_reason"] == "abort"


def test_a_key_reused_for_another_request_is_refused(served):
    headers = {"Authorization": f"Bearer {API_KEY}", wire.IDEMPOTENCY_HEADER: uuid.uuid4().hex}
    first = httpx.post(served.url + "/skyrl/v1/generate", headers=headers, timeout=60,
                       json={"prompt_token_ids": [[1, 2]], "sampling_params": {"max_generate_length": 2}})
    second = httpx.post(served.url + "/skyrl/v1/generate", headers=headers, timeout=60,
                        json={"prompt_token_ids": [[3, 4]], "sampling_params": {"max_generate_length": 2}})
    assert first.status_code == 200 and len(first.json()["result"]["completions"]) == 1
    assert second.status_code == 409 and second.json()["error"]["param"] == "Idempotency-Key"


def test_plain_json_and_server_sent_events(served):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"prompt_token_ids": [[1, 2, 3]], "sampling_params": {"max_generate_length": 3, "temperature": 0},
            "stream": True}
    with httpx.stream("POST", served.url + "/skyrl/v1/generate", json=body, timeout=60,
                      headers={**headers, "Accept": wire.SSE}) as response:
        assert response.headers["content-type"].startswith(wire.SSE)
        events = [wire.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]
    assert events[0]["event"] == "accepted" and events[-1]["event"] == "result"
    assert sum(len(e["chunk"]["token_ids"]) for e in events if e["event"] == "chunk") == 3
    bad = httpx.post(served.url + "/skyrl/v1/sleep", headers=headers, json={"level": 1, "tgas": ["weights"]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tgas"
    not_json = httpx.post(served.url + "/skyrl/v1/wake_up", content=b"{nope",
                          headers={**headers, "Content-Type": "application/json"})
    assert not_json.status_code == 400 and not_json.json()["error"]["param"] == "body"
    form = httpx.post(served.url + "/skyrl/v1/wake_up", headers=headers, data={"tags": "weights"})
    assert form.status_code == 415  # JSON only, as on the OpenAI routes


def test_every_engine_route_needs_the_key(served):
    routes = [("GET", p) for p in ("/info", "/health", "/state", "/capabilities", "/weights/version",
                                   "/weights/specs")]
    routes += [("POST", p) for p in (*wire.POST_OPERATIONS.values(), "/host/probe")]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = httpx.request(method, served.url + wire.API_PREFIX + path, headers=headers, json={})
            assert response.status_code == 401, (method, path, response.status_code)
    with pytest.raises(errors.ConfigError) as info:
        connect_engine(served.url, api_key="wrong")
    assert info.value.field == "remote_inference_engine_api_key"


def test_create_engine_from_skyrl_keys(served, monkeypatch):
    monkeypatch.setenv("SKYRL_BACKENDS_API_KEY", "wrong")  # the config's key wins over the environment
    engine = sb.create_engine(run_engines_locally=False, remote_inference_engine_urls=[served.url.split("//")[1]],
                              remote_inference_engine_api_key=API_KEY)
    engines = sb.create_engines(config={"run_engines_locally": False, "remote_inference_engine_api_key": API_KEY,
                                        "remote_inference_engine_urls": [served.url, served.url]})
    try:
        from skyrl_backends.remote import RemoteEngine

        assert isinstance(engine, RemoteEngine) and len(engines) == 2
        out = run(engines[1].generate(PROMPTS, GREEDY))
        assert out.response_ids == served.run(served.engine.generate(PROMPTS, GREEDY)).response_ids
    finally:
        for e in (engine, *engines):
            run(e.teardown())


def test_in_process_tensors_travel_through_shared_memory_on_the_same_host(served, remote, model_dir):
    from safetensors.torch import load_file

    assert remote.same_host and "tensors" in remote.capabilities.weight_sync_strategies
    original = load_file(f"{model_dir}/model.safetensors")
    specs = run(remote.weight_specs())
    reference = served.run(served.engine.generate(PROMPTS, GREEDY))
    changed = [(n, original[n] * 1.5 if original[n].dim() > 1 else original[n]) for n in specs]
    before = served.engine.weight_version
    version = run(remote.update_weights_from_tensors(changed))
    assert version == before + 1 == remote.weight_version == served.engine.weight_version
    moved = run(remote.generate(PROMPTS, GREEDY))
    assert moved.response_ids == served.run(served.engine.generate(PROMPTS, GREEDY)).response_ids
    assert moved.response_ids != reference.response_ids, "the new weights did not reach the engine"
    run(remote.update_weights_from_tensors([(n, original[n]) for n in specs]))
    assert run(remote.generate(PROMPTS, GREEDY)).response_ids == reference.response_ids


def test_a_server_elsewhere_offers_no_same_host_strategy(served, remote):
    from skyrl_backends.remote import RemoteEngine

    elsewhere = RemoteEngine(remote._dialect, remote.description, same_host=False, url=remote.url)
    assert elsewhere.capabilities.weight_sync_strategies == ("broadcast",)
    assert elsewhere.capabilities.lora_from_tensors == ("broadcast",)
    with pytest.raises(errors.UnsupportedCapabilityError, match="connect_broadcast"):
        run(elsewhere.update_weights_from_tensors([("x", __import__("torch").zeros(1))]))


def test_a_server_at_its_concurrency_limit_is_waited_for_not_failed(served):
    """The endpoint's guard refuses calls over max_concurrent_requests before they start (503,
    Retry-After): the remote engine sends them again, so every call completes, each once."""
    from skyrl_backends.http import BackgroundServer
    from skyrl_backends.http.engine_routes import create_engine_app
    from skyrl_backends.http.settings import HTTPSettings

    app = create_engine_app(served.observed, api_key=API_KEY, settings=HTTPSettings(max_concurrent_requests=2))
    with BackgroundServer(app, loop=served.loop) as narrow:
        remote = connect_engine(narrow.url, api_key=API_KEY, retries=1)
        ids = [f"narrow-{i}-{uuid.uuid4().hex}" for i in range(6)]

        async def main():
            return await asyncio.gather(*(remote.generate([PROMPTS[i % 2]], GREEDY, request_ids=[rid])
                                          for i, rid in enumerate(ids)))

        outs = run(main())
        run(remote.teardown())
    assert all(o[0].finish_reason == "length" for o in outs)
    assert all(served.observed.request_ids.count(rid) == 1 for rid in ids)


# -- the newer engine API through the wire ----------------------------------------------------------------------
def _original(model_dir: str, names) -> list:
    from safetensors.torch import load_file

    weights = load_file(f"{model_dir}/model.safetensors")
    return [(n, weights[n]) for n in names]


class _Stream:
    """A remote stream read in the background, its chunks kept."""

    def __init__(self, engine, prompt, params) -> None:
        self.chunks = []
        self.running = asyncio.Event()
        self.task = asyncio.ensure_future(self._read(engine, prompt, params))

    async def _read(self, engine, prompt, params):
        async for chunk in engine.generate_stream([prompt], params):
            self.chunks.append(chunk)
            if sum(len(c.token_ids) for c in self.chunks) >= 4:
                self.running.set()
        self.running.set()
        return self.chunks[-1].completion

    def versions(self) -> TokenVersions:
        versions = TokenVersions((), 0)
        for chunk in self.chunks:
            assert chunk.token_versions is not None and chunk.token_versions.length == len(chunk.token_ids)
            versions = versions.concat(chunk.token_versions)
        return versions


@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "keep+recompute"])
def test_a_kept_request_spans_a_weight_update_with_per_token_versions(served, remote, model_dir, recompute):
    """Pause "keep" through the wire, update the weights under the kept request, resume: its tokens
    say which version produced each, in the completion and in the stream chunks."""
    names = list(run(remote.weight_specs()))
    same_weights = _original(model_dir, names)  # a new version of the same values: the tokens do not change
    reference = served.run(served.engine.generate([PROMPTS[0]], LONG))[0]

    async def main():
        old = remote.weight_version
        stream = _Stream(remote, PROMPTS[0], LONG)
        await asyncio.wait_for(stream.running.wait(), 300)  # a bound on a hang, not a speed check
        await remote.pause_generation("keep", recompute=recompute)
        assert remote.paused and remote.pause_mode == "keep" and not stream.task.done()
        new = await remote.update_weights_from_tensors(same_weights)
        await remote.resume_generation()
        assert not remote.paused and remote.pause_mode is None
        return old, new, await stream.task, stream

    old, new, final, stream = run(main())
    assert new == old + 1 and final.finish_reason == "length" and final.token_ids == reference.token_ids
    (start, first), (seam, second) = final.token_versions.runs
    assert (start, first, second) == (0, old, new) and 0 < seam < len(final.token_ids)
    assert stream.versions() == final.token_versions


@pytest.mark.parametrize("mode", ["abort", "wait"])
def test_pause_modes_that_end_or_finish_running_requests(served, remote, mode):
    async def main():
        stream = _Stream(remote, PROMPTS[1], LONG)
        await asyncio.wait_for(stream.running.wait(), 300)
        await remote.pause_generation(mode)
        state = (remote.paused, remote.pause_mode, (await remote.health())["status"])
        await remote.resume_generation()
        return state, await stream.task, stream

    state, final, stream = run(main())
    assert state == (True, mode, "paused")
    if mode == "abort":
        assert final.finish_reason == "abort" and 0 < len(final.token_ids) < LONG["max_generate_length"]
    else:  # "wait" returned once the running request had finished
        assert final.finish_reason == "length" and len(final.token_ids) == LONG["max_generate_length"]
    assert stream.versions() == final.token_versions == TokenVersions.uniform(len(final.token_ids),
                                                                              remote.weight_version)


@pytest.mark.parametrize("strategy", ["tensors", "shared_memory"])
def test_a_lora_adapter_sent_as_tensors_serves_what_its_folder_serves(served, remote, lora_dir, strategy):
    from skyrl_backends.weight_sync import sync_lora_adapter

    tensors, config = adapter(lora_dir)
    served.run(served.engine.load_lora_adapter("from-folder", lora_dir))
    try:
        expected = served.run(served.engine.generate(PROMPTS, GREEDY, lora_name="from-folder")).response_ids
    finally:
        served.run(served.engine.unload_lora_adapter("from-folder"))
    name = f"from-{strategy}"

    async def main():
        try:
            versions = [await sync_lora_adapter(remote, name, tensors, config, strategy) for _ in range(2)]
            assert remote.lora_versions == {name: 2} and remote.lora_adapters.keys() == {name}
            return versions, await remote.generate(PROMPTS, GREEDY, lora_name=name)
        finally:
            await remote.unload_lora_adapter(name)

    versions, out = run(main())
    assert versions == [[1], [2]]  # a second load under the name replaces the adapter, with a new version
    assert out.response_ids == expected
    assert [c.lora_version for c in out] == [2, 2]
    assert not remote.lora_adapters and not served.engine.lora_adapters


@pytest.mark.parametrize("strategy", ["tensors", "shared_memory"])
def test_check_finite_is_honoured_by_the_servers_engine(served, remote, model_dir, strategy):
    import torch
    from skyrl_backends.weight_sync import sync_weights

    names = list(run(remote.weight_specs()))
    weights = dict(_original(model_dir, names))
    victim = names[-1]
    weights[victim] = torch.full_like(weights[victim], math.nan)
    before = served.engine.weight_version
    reference = served.run(served.engine.generate(PROMPTS, GREEDY)).response_ids
    with pytest.raises(errors.WeightUpdateError) as info:
        run(sync_weights(remote, weights, strategy, check_finite=True))
    assert list(info.value.problems) == [victim] and "NaN" in info.value.problems[victim]
    assert served.engine.weight_version == before == remote.weight_version
    assert run(remote.generate(PROMPTS, GREEDY)).response_ids == reference


def test_a_layout_crosses_in_full_once_then_by_id_and_again_in_full_when_the_server_forgot_it(served, remote,
                                                                                           model_dir):
    """A sync's names, dtypes and shapes travel once; later syncs name them by id. A server that no
    longer keeps the id (here: sent more other layouts than it keeps) refuses it by name, changes
    nothing, and the sync goes through in full at once."""
    from skyrl_backends.weight_sync import make_sender, sync_weights
    from skyrl_backends.weight_sync.layout_refs import KEPT, LAYOUT_FIELD

    bodies: list[dict] = []
    transport = remote._dialect.transport
    call = transport.call

    async def recording(path, body, key):
        if "request" in body:
            bodies.append(body["request"])
        return await call(path, body, key)

    transport.call = recording
    names = list(run(remote.weight_specs()))
    weights = dict(_original(model_dir, names))
    sender = make_sender("shared_memory")
    try:
        for _ in range(3):
            before = served.engine.weight_version
            run(sync_weights(remote, weights, "shared_memory", sender=sender))
            assert served.engine.weight_version == before + 1
        assert [("names" in b, LAYOUT_FIELD in b) for b in bodies] == [(True, True), (False, True), (False, True)]
        assert len({b[LAYOUT_FIELD] for b in bodies}) == 1
        assert len(json.dumps(bodies[1])) < len(json.dumps(bodies[0])) / 2
        for count in range(1, KEPT + 1):  # other layouts (each a part of the model), until the first is gone
            part = WeightUpdateRequest(names[:count], ["float32"] * count,
                                       [tuple(weights[n].shape) for n in names[:count]], "shared_memory")
            run(remote.validate_weight_update(part))
        bodies.clear()
        before = served.engine.weight_version
        run(sync_weights(remote, weights, "shared_memory", sender=sender))
        assert served.engine.weight_version == before + 1
        assert [("names" in b) for b in bodies] == [False, True]  # refused by id, then sent in full
        reference = served.run(served.engine.generate(PROMPTS, GREEDY)).response_ids
        assert run(remote.generate(PROMPTS, GREEDY)).response_ids == reference
    finally:
        transport.call = call
        sender.close()
