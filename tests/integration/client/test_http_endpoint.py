"""The OpenAI-compatible endpoint, driven by the official ``openai`` client, over real engines.

The server is started by the test on a free loopback port. Outputs are checked against the
engines' own greedy output for the same token ids (computed through the same client); errors are
checked for OpenAI's status codes and error body.
"""

from __future__ import annotations

import json

import pytest
from observers import EngineObserver

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

API_KEY = "test-key"
MODEL = "tiny"
BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def server(aio, local_engines, tokenizer):
    from skyrl_backends.client import InferenceEngineClient
    from skyrl_backends.http import BackgroundServer, create_app

    observed = [EngineObserver(e) for e in local_engines[:2]]
    client = InferenceEngineClient(observed, tokenizer=tokenizer)
    app = create_app(client, tokenizer, model_name=MODEL, api_key=API_KEY, max_body_bytes=BODY_LIMIT)
    with BackgroundServer(app, loop=aio) as running:
        running.client = client
        running.observed = observed
        yield running


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def engine_greedy(server, prompt_ids, max_tokens):
    out = server.run_coroutine(server.client.generate([prompt_ids], {"max_generate_length": max_tokens,
                                                                     "temperature": 0}))
    return out[0]


def chat_ids(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


MESSAGES = [{"role": "system", "content": "You count."}, {"role": "user", "content": "Count with me: one two"}]


def test_server_binds_loopback(server):
    assert server.host == "127.0.0.1"


def test_models_and_health(server, oai):
    assert [m.id for m in oai.models.list().data] == [MODEL]
    health = httpx.get(server.url + "/health")  # open without the key
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert set(health.json()["engines"]) == set(server.client.engine_ids)


def test_chat_completion_matches_the_engine(server, oai, tokenizer):
    reference = engine_greedy(server, chat_ids(tokenizer, MESSAGES), 12)
    response = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == reference.text
    assert choice.finish_reason == reference.finish_reason
    assert response.usage.prompt_tokens == len(chat_ids(tokenizer, MESSAGES))
    assert response.usage.completion_tokens == len(reference.token_ids)


def test_chat_streaming_gives_the_same_text(server, oai):
    whole = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    stream = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[0].choices[0].delta.role == "assistant"


def test_chat_logprobs(oai):
    response = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs), abs=1e-4)


def test_completions_with_several_prompts_samples_and_streaming(server, oai, tokenizer):
    prompts = ["The quick brown fox", "Hello world!"]
    whole = oai.completions.create(model=MODEL, prompt=prompts, max_tokens=10, temperature=0, n=2, logprobs=2)
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    for k, prompt in enumerate(prompts):
        reference = engine_greedy(server, tokenizer.encode(prompt), 10)
        for choice in whole.choices[2 * k:2 * k + 2]:
            assert choice.text == reference.text
            assert len(choice.logprobs.tokens) == len(reference.token_ids)
            # The sampled token and the top 2 (OpenAI: up to logprobs + 1 entries).
            assert all(2 <= len(top) <= 3 for top in choice.logprobs.top_logprobs)
    streamed = {}
    for chunk in oai.completions.create(model=MODEL, prompt=prompts, max_tokens=10, temperature=0, n=2, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [streamed[i] for i in range(4)] == [c.text for c in whole.choices]


def test_completion_from_token_ids_and_echo(server, oai, tokenizer):
    ids = tokenizer.encode("Numbers 0 1 2")
    reference = engine_greedy(server, ids, 6)
    response = oai.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0, echo=True)
    assert response.choices[0].text == tokenizer.decode(ids, skip_special_tokens=True) + reference.text


def test_session_id_routes_every_request_to_one_engine(server, oai):
    def counts():
        return [len(o.request_ids) for o in server.observed]

    for session in ("alpha", "beta", "gamma", "delta"):
        before = counts()
        for turn in range(3):
            oai.chat.completions.create(model=MODEL, messages=MESSAGES + [{"role": "user", "content": str(turn)}],
                                        max_tokens=2, extra_body={"session_id": session})
        grew = [after - b for after, b in zip(counts(), before)]
        assert sorted(grew) == [0, 3], f"session {session} spread over engines: {grew}"
        expected = server.client.engine_ids.index(server.client.route_session(session))
        assert grew[expected] == 3


def test_stop_strings_end_the_text(oai):
    whole = oai.completions.create(model=MODEL, prompt="Count with me:", max_tokens=20, temperature=0)
    text = whole.choices[0].text
    if len(text) < 4:
        pytest.fail(f"the tiny model should produce text here, got {text!r}")
    stop = text[2:4]
    cut = oai.completions.create(model=MODEL, prompt="Count with me:", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    # OpenAI's rule: the text ends before the stop string (the engine API keeps it).
    assert cut.choices[0].text == text[:text.find(stop)]


# -- errors ------------------------------------------------------------------------------------
def raw_post(server, path, content, key=API_KEY, headers=None):
    all_headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", **(headers or {})}
    return httpx.post(server.url + path, content=content, headers=all_headers, timeout=60)


def assert_openai_error(response, status, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param
    return error


def test_malformed_json_is_400(server):
    error = assert_openai_error(raw_post(server, "/v1/chat/completions", b'{"model": "tiny", "messages": ['), 400)
    assert "Malformed JSON" in error["message"]
    assert_openai_error(raw_post(server, "/v1/completions", b'[1, 2]'), 400)
    assert_openai_error(raw_post(server, "/v1/completions", b'\xff\xfe'), 400)


def test_unknown_model_is_404(oai):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)


@pytest.mark.parametrize("field, value, param", [
    ("temperature", 5, "temperature"), ("max_tokens", 0, "max_tokens"), ("n", 0, "n"), ("top_p", 0, "top_p"),
    ("stop", 5, None), ("frobnicate", 1, "frobnicate"), ("presence_penalty", 0.5, "presence_penalty"),
    ("top_k", -5, "top_k"), ("min_tokens", 50, "min_new_tokens"),
])
def test_bad_parameters_are_400_naming_the_field(server, field, value, param):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4, field: value}
    error = assert_openai_error(raw_post(server, "/v1/completions", json.dumps(body)), 400)
    if param is not None:
        assert param in (error["param"] or "") or param in error["message"]


def test_bad_prompts_are_400(server):
    for body in ({"model": MODEL, "prompt": [999999]}, {"model": MODEL, "prompt": []},
                 {"model": MODEL, "messages": []}, {"model": MODEL, "prompt": [[-1]]}):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        assert_openai_error(raw_post(server, path, json.dumps(body)), 400)


def test_oversize_body_is_413(server):
    body = json.dumps({"model": MODEL, "prompt": "x" * (BODY_LIMIT + 10)})
    assert_openai_error(raw_post(server, "/v1/completions", body), 413)

    def chunks():  # no Content-Length: the limit still holds
        for _ in range(BODY_LIMIT // 1024 + 2):
            yield b"x" * 1024

    response = httpx.post(server.url + "/v1/completions", content=chunks(),
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
                          timeout=60)
    assert_openai_error(response, 413)


def test_api_key_is_required(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert_openai_error(httpx.get(server.url + "/v1/models"), 401)


def test_unknown_route_and_method_are_openai_errors(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert_openai_error(httpx.get(server.url + "/v1/nothing", headers=headers), 404)
    assert_openai_error(httpx.get(server.url + "/v1/completions", headers=headers), 405)


def test_server_still_serves_after_errors(oai):
    response = oai.completions.create(model=MODEL, prompt="Hello", max_tokens=3)
    assert response.choices[0].finish_reason in ("length", "stop")


def test_a_body_that_never_arrives_gets_408_not_a_hung_connection(aio, local_engines, tokenizer):
    import socket

    from skyrl_backends.client import InferenceEngineClient
    from skyrl_backends.http import BackgroundServer, create_app
    from skyrl_backends.http.settings import HTTPSettings

    app = create_app(InferenceEngineClient(local_engines[:1]), tokenizer, model_name=MODEL,
                     settings=HTTPSettings(body_timeout_s=1.0))
    with BackgroundServer(app, loop=aio) as running:
        with socket.create_connection((running.host, running.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"model\":")
            reply = b""
            while b"}}" not in reply:  # headers and body may come in separate segments
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
            reply = reply.decode()
    assert reply.startswith("HTTP/1.1 408") and "request_timeout" in reply
