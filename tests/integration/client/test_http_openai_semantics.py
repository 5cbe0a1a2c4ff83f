"""OpenAI semantics and the agent extensions of the endpoint, with the official ``openai`` client,
over real engines: stop strings left out of the text, completions log-probabilities with the
sampled token, the context-length check, prompts and results as token ids (``return_token_ids``),
session routing from a header or ``user``, ``/tokenize``, ``/detokenize``, ``/metrics``,
``/v1/models`` with LoRA adapters, and chat templates with ``tools``.

The engines are wrapped in observers that record what each engine was given and generated, so the
token ids the endpoint returns are checked against the engines' own, not against the endpoint.
"""

from __future__ import annotations

import pytest
from observers import EngineObserver

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

MODEL = "tiny"
MESSAGES = [{"role": "system", "content": "You count."}, {"role": "user", "content": "Count with me: one two"}]
PROMPT = "one two three four"


@pytest.fixture(scope="module")
def server(aio, local_engines, tokenizer):
    from skyrl_backends.client import InferenceEngineClient
    from skyrl_backends.http import BackgroundServer, create_app

    observed = [EngineObserver(e) for e in local_engines[:2]]
    client = InferenceEngineClient(observed, tokenizer=tokenizer)
    with BackgroundServer(create_app(client, tokenizer, model_name=MODEL), loop=aio) as running:
        running.client = client
        running.observed = observed
        yield running


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def root(server):
    """The same client on the server's root, for vLLM's non-/v1 routes (/tokenize, /metrics...)."""
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def chat_ids(tokenizer, messages, **kwargs):
    """The chat template's token ids, as the endpoint computes them (template text, then encode)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
    return tokenizer.encode(text, add_special_tokens=False)


def engine_calls(server):
    return {id(o): (len(o.prompts), len(o.generated)) for o in server.observed}


def new_calls(server, before):
    """The (prompt, generated) pairs the engines received since ``before`` (engine_calls' result)."""
    pairs = []
    for o in server.observed:
        start_p, start_g = before[id(o)]
        pairs += list(zip(o.prompts[start_p:], o.generated[start_g:]))
    return pairs


# -- stop strings ----------------------------------------------------------------------------------
def test_stop_strings_are_left_out_of_chat_text_streamed_and_not(oai):
    full = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].message.content
    stop = next((full[k:k + 2] for k in range(3, len(full) - 2) if full[k:k + 2].strip() == full[k:k + 2]
                 and "\ufffd" not in full[:k + 2]), None)
    assert stop, f"test self-check: no usable stop string in {full!r}"
    cut = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0, stop=[stop],
                                      extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[:full.find(stop)]
    streamed = "".join(e.choices[0].delta.content or "" for e in oai.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0, stop=[stop], stream=True,
        extra_body={"ignore_eos": True}) if e.choices)
    assert streamed == full[:full.find(stop)]


# -- completions log-probabilities -----------------------------------------------------------------
def test_completion_logprobs_always_hold_the_sampled_token(oai):
    response = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=37, temperature=1.0, seed=7,
                                      logprobs=1, extra_body={"ignore_eos": True})
    lp = response.choices[0].logprobs
    assert len(lp.tokens) == 37
    outside_top = 0
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert token in top and top[token] == pytest.approx(logprob)
        assert 1 <= len(top) <= 2
        outside_top += len(top) == 2
    assert outside_top, "test self-check: sampling at temperature 1 should pick a non-top token somewhere"
    stream = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=37, temperature=1.0, seed=7, logprobs=1,
                                    stream=True, extra_body={"ignore_eos": True})
    streamed = [(t, top) for e in stream for c in e.choices if c.logprobs
                for t, top in zip(c.logprobs.tokens, c.logprobs.top_logprobs)]
    assert [t for t, _ in streamed] == lp.tokens
    assert all(t in top for t, top in streamed)


def test_tokens_that_decode_alike_keep_their_own_entries(oai, tokenizer):
    response = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=20,
                                      extra_body={"ignore_eos": True})
    lp = response.choices[0].logprobs
    by_id = 0
    for token, top in zip(lp.tokens, lp.top_logprobs):
        assert len(top) >= 20, f"entries overwrote each other: {len(top)} keys for the top 20"
        assert token in top
        by_id += sum(key.startswith("token_id:") for key in top)
        for key in top:
            if key.startswith("token_id:"):  # a token whose text another entry has
                other = tokenizer.decode([int(key.split(":")[1])])
                assert other in top
    assert by_id, "test self-check: byte tokens that decode to U+FFFD should collide in the top 20"
    as_ids = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2,
                                    extra_body={"return_tokens_as_token_ids": True}).choices[0].logprobs
    assert all(t.startswith("token_id:") for t in as_ids.tokens)
    assert all(k.startswith("token_id:") for top in as_ids.top_logprobs for k in top)


def test_chat_logprob_bytes_are_the_tokens_own_bytes(oai, tokenizer):
    response = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0,
                                           logprobs=True, extra_body={"ignore_eos": True, "return_token_ids": True})
    content = response.choices[0].logprobs.content
    joined = b"".join(bytes(entry.bytes) for entry in content)
    assert joined.decode("utf-8", errors="replace") == tokenizer.decode(response.choices[0].token_ids)


# -- context length --------------------------------------------------------------------------------
def test_max_tokens_beyond_the_context_is_a_400_naming_both_numbers(oai, tokenizer, model_dir):
    import json
    import os

    with open(os.path.join(model_dir, "config.json")) as f:
        context = json.load(f)["max_position_embeddings"]  # the engines set no max_model_len
    prompt_len = len(tokenizer.encode(PROMPT))
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=100000)
    message = info.value.body["message"]
    assert str(context) in message and str(prompt_len + 100000) in message and "100000" in message
    assert info.value.body["param"] == "max_tokens" and info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match=str(context)):
        oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=context)
    assert oai.models.list().data[0].model_extra["max_model_len"] == context


def test_without_max_tokens_chat_fills_the_context(aio, local_engines, tokenizer):
    from skyrl_backends.client import InferenceEngineClient
    from skyrl_backends.http import BackgroundServer, create_app
    from skyrl_backends.http.settings import HTTPSettings

    prompt_len = len(chat_ids(tokenizer, MESSAGES))
    settings = HTTPSettings(max_model_len=prompt_len + 5)
    app = create_app(InferenceEngineClient(local_engines[:1]), tokenizer, model_name=MODEL, settings=settings)
    with BackgroundServer(app, loop=aio) as running:
        oai = openai.OpenAI(base_url=running.url + "/v1", api_key="x", max_retries=0, timeout=120)
        response = oai.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"ignore_eos": True})
        assert response.usage.completion_tokens == 5 and response.choices[0].finish_reason == "length"


# -- token ids in and out --------------------------------------------------------------------------
def test_return_token_ids_gives_the_engines_own_ids(server, oai, tokenizer):
    before = engine_calls(server)
    chat = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0,
                                       extra_body={"return_token_ids": True})
    (prompt, generated), = new_calls(server, before)
    assert chat.prompt_token_ids == prompt
    assert chat.choices[0].token_ids == generated
    before = engine_calls(server)
    completion = oai.completions.create(model=MODEL, prompt=[PROMPT, "Hello"], max_tokens=6, temperature=0, n=2,
                                        extra_body={"return_token_ids": True})
    calls = new_calls(server, before)
    for choice in completion.choices:
        assert (choice.prompt_token_ids, choice.token_ids) in calls
    prompts = [c.prompt_token_ids for c in completion.choices][::2]
    assert prompts == [tokenizer.encode(PROMPT), tokenizer.encode("Hello")]


def test_return_token_ids_when_streaming(server, oai):
    before = engine_calls(server)
    events = list(oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0,
                                              stream=True, extra_body={"return_token_ids": True}))
    (prompt, generated), = new_calls(server, before)
    assert events[0].model_extra["prompt_token_ids"] == prompt
    assert [t for e in events for c in e.choices for t in (c.model_extra.get("token_ids") or [])] == generated
    before = engine_calls(server)
    events = list(oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                         extra_body={"return_token_ids": True}))
    (prompt, generated), = new_calls(server, before)
    assert [c.model_extra["prompt_token_ids"] for e in events for c in e.choices
            if c.model_extra.get("prompt_token_ids")] == [prompt]
    assert [t for e in events for c in e.choices for t in (c.model_extra.get("token_ids") or [])] == generated


def test_prompts_as_token_ids_on_both_endpoints(server, oai, tokenizer):
    ids = chat_ids(tokenizer, MESSAGES)
    by_text = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    by_ids = oai.chat.completions.create(model=MODEL, messages=[], max_tokens=8, temperature=0,
                                         extra_body={"prompt_token_ids": ids, "return_token_ids": True})
    assert by_ids.choices[0].message.content == by_text.choices[0].message.content
    assert by_ids.prompt_token_ids == ids
    batch = [tokenizer.encode(PROMPT), tokenizer.encode("Hello")]
    by_ids = oai.completions.create(model=MODEL, prompt=batch, max_tokens=5, temperature=0)
    by_text = oai.completions.create(model=MODEL, prompt=[PROMPT, "Hello"], max_tokens=5, temperature=0)
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    with pytest.raises(openai.BadRequestError, match="not both"):
        oai.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"prompt_token_ids": ids})


def test_a_multi_turn_chat_gives_the_trainer_the_engines_token_ids(server, oai, tokenizer):
    """Three turns through the endpoint, each continuing the previous one by token ids: the
    trajectory the trainer assembles from the responses is exactly what the engines were given and
    generated, with no re-tokenization anywhere."""
    session = "multi-turn-rollout"
    trajectory: list[int] = []
    messages = list(MESSAGES)
    before = engine_calls(server)
    for turn in range(3):
        if turn == 0:
            body = {"messages": messages}
        else:  # the new user turn, templated on its own, appended to the ids so far
            suffix = tokenizer.encode(f"<|im_end|>\n<|im_start|>user\nturn {turn}<|im_end|>\n<|im_start|>assistant\n",
                                      add_special_tokens=False)
            body = {"messages": [], "extra_body": {"prompt_token_ids": trajectory + suffix}}
        extra = {"return_token_ids": True, "session_id": session, "ignore_eos": True}
        extra.update(body.pop("extra_body", {}))
        response = oai.chat.completions.create(model=MODEL, max_tokens=6, temperature=1.0, seed=turn,
                                               extra_body=extra, **body)
        prompt_ids, completion_ids = response.prompt_token_ids, response.choices[0].token_ids
        if turn:
            assert prompt_ids[:len(trajectory)] == trajectory  # the prefix is never re-tokenized
        trajectory = prompt_ids + completion_ids
    calls = new_calls(server, before)
    assert len(calls) == 3
    engine_prompt, engine_generated = calls[-1]
    assert trajectory == engine_prompt + engine_generated
    # Every turn ran on one engine (the session's).
    served = [o for o in server.observed if len(o.prompts) > before[id(o)][0]]
    assert len(served) == 1


# -- session routing -------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["header", "user"])
def test_session_from_header_or_user_routes_to_one_engine(server, oai, how):
    for session in ("s-alpha", "s-beta", "s-gamma"):
        before = [len(o.prompts) for o in server.observed]
        for turn in range(3):
            kwargs = {"extra_headers": {"X-Session-ID": session}} if how == "header" else {"user": session}
            oai.chat.completions.create(model=MODEL, messages=MESSAGES + [{"role": "user", "content": str(turn)}],
                                        max_tokens=2, **kwargs)
        grew = [len(o.prompts) - b for o, b in zip(server.observed, before)]
        expected = server.client.engine_ids.index(server.client.route_session(session))
        assert grew[expected] == 3 and sum(grew) == 3, f"session {session} spread over engines: {grew}"


# -- streaming exactness over a long response -------------------------------------------------------
def test_a_long_stream_joins_to_the_non_streamed_text(oai):
    whole = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=300, temperature=0,
                                   extra_body={"ignore_eos": True})
    streamed = "".join(c.text for e in oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=300,
                                                                temperature=0, stream=True,
                                                                extra_body={"ignore_eos": True})
                       for c in e.choices)
    assert whole.usage.completion_tokens == 300
    assert streamed == whole.choices[0].text


# -- vLLM's other routes ---------------------------------------------------------------------------
def test_tokenize_and_detokenize(root, tokenizer):
    result = root.post("/tokenize", body={"model": MODEL, "prompt": PROMPT}, cast_to=object)
    assert result["tokens"] == tokenizer.encode(PROMPT) and result["count"] == len(result["tokens"])
    assert result["max_model_len"] == 1024
    chat = root.post("/tokenize", body={"messages": MESSAGES, "return_token_strs": True}, cast_to=object)
    assert chat["tokens"] == chat_ids(tokenizer, MESSAGES)
    assert chat["token_strs"] == tokenizer.convert_ids_to_tokens(chat["tokens"])
    assert root.post("/detokenize", body={"tokens": result["tokens"]}, cast_to=object)["prompt"] == PROMPT
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        root.post("/detokenize", body={"tokens": [10**7]}, cast_to=object)


def test_metrics_count_requests_tokens_latency_and_engine_state(server, oai, root):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape():
        text = root.get("/metrics", cast_to=httpx.Response).text
        return {s.name + str(sorted(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def value(samples, name, **labels):
        return samples.get(name + str(sorted(labels.items())), 0.0)

    before = scrape()
    oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    list(oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, stream=True,
                                extra_body={"ignore_eos": True}))
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=-1)
    after = scrape()
    endpoint = "/v1/completions"
    assert value(after, "skyrl_http_requests_total", endpoint=endpoint, status="200") - \
        value(before, "skyrl_http_requests_total", endpoint=endpoint, status="200") == 2
    assert value(after, "skyrl_http_requests_total", endpoint=endpoint, status="400") - \
        value(before, "skyrl_http_requests_total", endpoint=endpoint, status="400") == 1
    assert value(after, "skyrl_generation_tokens_total", endpoint=endpoint) - \
        value(before, "skyrl_generation_tokens_total", endpoint=endpoint) == 12
    assert value(after, "skyrl_http_request_duration_seconds_count", endpoint=endpoint) - \
        value(before, "skyrl_http_request_duration_seconds_count", endpoint=endpoint) == 3
    assert value(after, "skyrl_time_to_first_token_seconds_count", endpoint=endpoint) - \
        value(before, "skyrl_time_to_first_token_seconds_count", endpoint=endpoint) == 1
    for engine_id in server.client.engine_ids:
        assert value(after, "skyrl_engine_healthy", engine=engine_id) == 1.0
        assert f"skyrl_weight_version[('engine', '{engine_id}')]" in after
        assert f"skyrl_engine_sequences_in_flight[('engine', '{engine_id}')]" in after


def test_chat_template_gets_the_tools(aio, local_engines, model_dir):
    from skyrl_backends.client import InferenceEngineClient
    from skyrl_backends.http import BackgroundServer, create_app
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = (  # a template that renders tools, as Qwen's and Llama's do
        "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}"
        "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m.get('tool_calls') %}call {{ m['tool_calls'][0]['function']['name'] }}{% endif %}"
        "{{ m['content'] or '' }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% endif %}")
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object", "properties": {}}}}]
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    app = create_app(InferenceEngineClient(local_engines[:1]), tokenizer, model_name=MODEL)
    with BackgroundServer(app, loop=aio) as running:
        oai = openai.OpenAI(base_url=running.url + "/v1", api_key="x", max_retries=0, timeout=120)
        response = oai.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=2,
                                               extra_body={"return_token_ids": True})
        expected = chat_ids(tokenizer, messages, tools=tools)
        assert response.prompt_token_ids == expected
        assert "get_weather" in tokenizer.decode(response.prompt_token_ids)
        without = oai.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice="none",
                                              max_tokens=2, extra_body={"return_token_ids": True})
        assert len(without.prompt_token_ids) < len(expected)
        with pytest.raises(openai.BadRequestError, match="tool_choice"):
            oai.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice="required")
