"""The HTTP endpoint's extension field ``token_versions`` (``[[first token index, weight version],
...]`` per choice), driven by the official ``openai`` client over real engines: present on every
choice, and, for a request a paused weight update overtakes, saying which tokens each version made."""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(aio, local_engines, tokenizer):
    from skyrl_backends.client import InferenceEngineClient
    from skyrl_backends.http import BackgroundServer, create_app

    client = InferenceEngineClient(local_engines[:1], tokenizer=tokenizer)
    with BackgroundServer(create_app(client, tokenizer, model_name=MODEL), loop=aio) as running:
        running.client = client
        yield running


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_every_choice_says_which_version_made_its_tokens(server, oai):
    version = server.client.engines[0].weight_version
    response = oai.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=6, temperature=0, n=2, seed=1)
    for choice in response.choices:
        assert choice.model_extra["token_versions"] == [[0, version]]
    chunks = list(oai.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=6, temperature=0, stream=True,
                                         logprobs=0))
    finishing = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishing[0].model_extra["token_versions"] == [[0, version]]
    with_tokens = [c.choices[0] for c in chunks if c.choices and c.choices[0].logprobs]
    assert with_tokens and all(ch.model_extra["token_versions"] == [[0, version]] for ch in with_tokens)


def test_a_request_overtaken_by_an_update_reports_the_seam(server, oai, model_weights):
    client = server.client
    old = client.engines[0].weight_version
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(oai.chat.completions.create, model=MODEL, max_tokens=200, temperature=0,
                              messages=[{"role": "user", "content": "Count: one two three"}],
                              extra_body={"ignore_eos": True})

        async def update_midway() -> None:
            while not any(h["inflight"] for h in client.health().values()):
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)
            await client.pause_generation("keep")
            await client.update_weights_from_tensors(model_weights)  # the same weights: a new version only
            await client.resume_generation()

        server.run_coroutine(update_midway(), 300)
        response = pending.result(300)
    runs = response.choices[0].model_extra["token_versions"]
    assert response.usage.completion_tokens == 200
    assert runs[0] == [0, old] and runs[-1][1] == old + 1 and len(runs) == 2, runs
    assert 0 < runs[1][0] < 200
