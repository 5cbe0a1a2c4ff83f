"""Hostile and mistaken input on the HTTP endpoint, over real engines: schema-valid values that used
to crash sampling, JSON nested too deep, requests over the server's limits, slow clients (trickled
headers and bodies, idle connections, too many requests at once), cross-origin and DNS-rebinding
requests, ``/health`` while the engines sleep or pause, and ``/v1/models`` with LoRA adapters.
Each answer is a 4xx naming the field or the limit (and the flag that raises it), never a 500 or
a hang. Time limits are set short here so the tests wait seconds, not minutes.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

MODEL = "tiny"
API_KEY = "hardening-key"


@pytest.fixture(scope="module")
def make_server(aio, local_engines, tokenizer):
    from skyrl_backends.client import InferenceEngineClient
    from skyrl_backends.http import BackgroundServer, create_app

    running = []

    def make(settings=None, engines=None, api_key=API_KEY, host="127.0.0.1"):
        client = InferenceEngineClient(engines or local_engines[:1], tokenizer=tokenizer)
        app = create_app(client, tokenizer, model_name=MODEL, api_key=api_key, settings=settings)
        server = BackgroundServer(app, host=host, loop=aio).start()
        server.client = client
        running.append(server)
        return server

    yield make
    for server in running:
        server.stop()


@pytest.fixture(scope="module")
def server(make_server):
    from skyrl_backends.http.settings import HTTPSettings

    return make_server(HTTPSettings(max_prompts_per_request=4, max_n=3, max_sequences_per_request=6))


def post(server, path, body, headers=None, key=API_KEY):
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    all_headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", **(headers or {})}
    return httpx.post(server.url + path, content=content, headers=all_headers, timeout=60)


def error_of(response, status):
    assert response.status_code == status, response.text
    return response.json()["error"]


# -- values that crashed ---------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, param", [
    ("temperature", 1e-40, "temperature"),
    ("seed", 2**64, "seed"),
    ("repetition_penalty", 1e-300, "repetition_penalty"),
])
def test_values_that_crashed_sampling_are_400_naming_the_field(server, field, value, param):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4, "temperature": 1.0, field: value}
    error = error_of(post(server, "/v1/completions", body), 400)
    assert error["param"] == param and param in error["message"]


def test_a_stop_token_past_the_vocabulary_with_min_tokens_is_400(server):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4, "min_tokens": 2, "stop_token_ids": [10**6]}
    error = error_of(post(server, "/v1/completions", body), 400)
    assert error["param"] == "stop_token_ids" and "vocabulary" in error["message"]


def test_json_nested_100k_deep_is_400(server):
    body = '{"model": "tiny", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"
    error = error_of(post(server, "/v1/completions", body), 400)
    assert "nested" in error["message"]


def test_the_server_still_serves_after_the_crashers(server):
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    assert oai.completions.create(model=MODEL, prompt="Hello", max_tokens=2).choices[0].finish_reason


# -- limits of one request -------------------------------------------------------------------------
def test_prompts_n_and_their_product_are_capped_naming_the_flag(server):
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError, match="max_prompts_per_request=4.*--max-prompts-per-request"):
        oai.completions.create(model=MODEL, prompt=["a"] * 5, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="max_n=3.*--max-n"):
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"}], n=4, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="--max-sequences-per-request"):
        oai.completions.create(model=MODEL, prompt=["a"] * 4, n=2, max_tokens=1)
    assert len(oai.completions.create(model=MODEL, prompt=["a"] * 3, n=2, max_tokens=1).choices) == 6


def test_twelve_thousand_prompts_are_refused_before_any_work(make_server):
    server = make_server()  # the default limits
    body = {"model": MODEL, "prompt": [[5]] * 12000, "n": 8, "max_tokens": 1}
    error = error_of(post(server, "/v1/completions", body), 400)
    assert "12000 prompts" in error["message"] and "--max-prompts-per-request" in error["message"]


# -- content type and host -------------------------------------------------------------------------
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None])
def test_a_post_that_is_not_json_is_415(server, content_type):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if content_type:
        headers["Content-Type"] = content_type
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1})
    response = httpx.post(server.url + "/v1/completions", content=body, headers=headers, timeout=30)
    assert "application/json" in error_of(response, 415)["message"]
    assert post(server, "/v1/completions", body, {"Content-Type": "application/json; charset=utf-8"}).status_code == 200


def test_a_foreign_host_on_a_loopback_bind_is_refused(make_server):
    from skyrl_backends.http.settings import HTTPSettings

    keyless = make_server(api_key=None)
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    error = error_of(post(keyless, "/v1/completions", body, {"Host": "attacker.example"}), 421)
    assert "--allowed-hosts" in error["message"]
    assert post(keyless, "/v1/completions", body, {"Host": f"localhost:{keyless.port}"}).status_code == 200
    assert post(keyless, "/v1/completions", body, {"Host": f"[::1]:{keyless.port}"}).status_code == 200
    allowed = make_server(HTTPSettings(allowed_hosts=("proxy.internal",)), api_key=None)
    assert post(allowed, "/v1/completions", body, {"Host": "proxy.internal:80"}).status_code == 200
    assert post(allowed, "/v1/completions", body, {"Host": "other.example"}).status_code == 421


# -- slow clients ----------------------------------------------------------------------------------
def read_reply(sock, timeout_s):
    """Everything the server sends until it closes the connection (or the timeout)."""
    sock.settimeout(timeout_s)
    reply = b""
    try:
        while chunk := sock.recv(4096):
            reply += chunk
    except TimeoutError:
        reply += b"<still open>"
    return reply.decode(errors="replace")


@pytest.fixture(scope="module")
def strict(make_server):
    from skyrl_backends.http.settings import HTTPSettings

    return make_server(HTTPSettings(header_timeout_s=1.0, body_timeout_s=1.5, keep_alive_timeout_s=1.0))


def test_trickled_headers_get_408_and_are_closed_without_the_key(strict):
    with socket.create_connection((strict.host, strict.port), timeout=30) as sock:
        started = time.monotonic()
        for part in (b"POST /v1/completions HTTP/1.1\r\n", b"Host: localhost\r\n", b"X-A: 1\r\n", b"X-B: 2\r\n"):
            try:
                sock.sendall(part)
            except OSError:
                break
            time.sleep(0.4)  # each piece well within the deadline; the headers as a whole are not
        reply = read_reply(sock, 10)
    assert reply.startswith("HTTP/1.1 408") and "request_timeout" in reply
    assert time.monotonic() - started < 8


def test_an_idle_connection_is_closed(strict):
    with socket.create_connection((strict.host, strict.port), timeout=30) as sock:
        assert "<still open>" not in read_reply(sock, 10)  # no byte ever sent: closed at the header deadline


def test_an_idle_keep_alive_connection_is_closed(strict):
    with socket.create_connection((strict.host, strict.port), timeout=30) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        reply = read_reply(sock, 10)
    assert reply.startswith("HTTP/1.1 200") and "<still open>" not in reply


def test_a_trickled_body_gets_408_within_the_whole_body_deadline(strict):
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}).encode()
    with socket.create_connection((strict.host, strict.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n")
        started = time.monotonic()
        for byte in body[:12]:  # a byte every 0.3 s: each read is quick, the body never completes
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.3)
        reply = read_reply(sock, 10)
    assert "408" in reply.split("\r\n", 1)[0] and "body_timeout_s" in reply
    assert time.monotonic() - started < 8


def test_requests_over_the_concurrency_limit_get_503_before_the_key_check(make_server):
    from skyrl_backends.http.settings import HTTPSettings

    limited = make_server(HTTPSettings(max_concurrent_requests=1, body_timeout_s=5.0))
    held = socket.create_connection((limited.host, limited.port), timeout=30)
    try:  # one request in progress: its body is still arriving
        held.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.5)
        refused = httpx.get(limited.url + "/v1/models", timeout=30)  # no key at all
        error = error_of(refused, 503)
        assert "--max-concurrent-requests" in error["message"] and refused.headers["retry-after"]
    finally:
        held.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if httpx.get(limited.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"},
                     timeout=30).status_code == 200:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the server did not recover once the held request ended")


# -- health and models -----------------------------------------------------------------------------
@pytest.mark.own_engines
def test_health_says_asleep_and_paused_while_staying_live(make_server, make_local_engine):
    engine = make_local_engine()
    server = make_server(engines=[engine])
    if not engine.capabilities.sleep:
        pytest.skip(f"{engine.backend} declares no sleep here")

    def health():
        response = httpx.get(server.url + "/health", timeout=30)
        return response.status_code, response.json()

    assert health()[0] == 200 and health()[1]["status"] == "ok"
    server.run_coroutine(server.client.sleep())
    try:
        status, body = health()
        assert status == 200 and body["status"] == "asleep"
        assert set(next(iter(body["engines"].values()))["asleep"]) == {"weights", "kv_cache"}
    finally:
        server.run_coroutine(server.client.wake_up())
    assert health()[1]["status"] == "ok"
    server.run_coroutine(server.client.pause_generation())
    try:
        assert health()[1]["status"] == "paused"
    finally:
        server.run_coroutine(server.client.resume_generation())
    assert health()[1]["status"] == "ok"


@pytest.mark.own_engines
def test_models_lists_loaded_lora_adapters_and_serves_them(make_server, aio, backend, model_dir, engine_options,
                                                           tokenizer):
    import os

    import skyrl_backends as sb

    lora_path = os.path.join(model_dir, "lora")
    if not os.path.isdir(lora_path):
        pytest.skip("the tiny model has no LoRA adapter")
    engine = aio.call(sb.create_engine, backend, model=model_dir, enable_lora=True, **engine_options)
    try:
        if not engine.capabilities.lora:
            pytest.skip(f"{backend} declares no LoRA here")
        server = make_server(engines=[engine])
        oai = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
        assert [m.id for m in oai.models.list().data] == [MODEL]
        server.run_coroutine(server.client.load_lora_adapter("counting", lora_path))
        listed = {m.id: m for m in oai.models.list().data}
        assert set(listed) == {MODEL, "counting"}
        assert listed["counting"].model_extra["parent"] == MODEL and listed["counting"].model_extra["root"] == lora_path
        ids = tokenizer.encode("one two three")
        via_http = oai.completions.create(model="counting", prompt=ids, max_tokens=8, temperature=0,
                                          extra_body={"return_token_ids": True, "ignore_eos": True})
        direct = server.run_coroutine(engine.generate([ids], {"max_tokens": 8, "temperature": 0, "ignore_eos": True},
                                                      lora_name="counting"))
        assert via_http.choices[0].model_extra["token_ids"] == direct[0].token_ids
        with pytest.raises(openai.NotFoundError, match="counting"):
            oai.completions.create(model="unknown-adapter", prompt="hi", max_tokens=1)
    finally:
        aio.run(engine.teardown(), 120)


def test_concurrent_requests_under_the_limit_all_succeed(server):
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    results, errors = [], []

    def one():
        try:
            results.append(oai.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].finish_reason)
        except Exception as exc:  # collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 8
