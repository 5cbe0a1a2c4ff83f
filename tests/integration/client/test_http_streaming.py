"""``stream: true`` on the OpenAI-compatible endpoint, with the official ``openai`` client, over real
engines: chunks arrive as tokens are generated, and the streamed text is the non-streamed text."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

MODEL = "tiny"
PROMPT = "one two three four"


@pytest.fixture(scope="module")
def server(aio, local_engines, tokenizer):
    from skyrl_backends.client import InferenceEngineClient
    from skyrl_backends.http import BackgroundServer, create_app

    client = InferenceEngineClient(local_engines[:2], tokenizer=tokenizer)
    app = create_app(client, tokenizer, model_name=MODEL)
    with BackgroundServer(app, loop=aio) as running:
        running.client = client
        yield running


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def streamed_text(events):
    texts, finish, content_chunks = {}, {}, 0
    for event in events:
        for choice in event.choices:
            piece = choice.text if hasattr(choice, "text") else (choice.delta.content or "")
            if piece:
                content_chunks += 1
            texts[choice.index] = texts.get(choice.index, "") + piece
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    return texts, finish, content_chunks


def test_long_completion_streams_in_many_chunks_with_the_same_text(server, oai):
    whole = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=48, temperature=0)
    texts, finish, content_chunks = streamed_text(
        oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=48, temperature=0, stream=True))
    assert texts[0] == whole.choices[0].text and finish[0] == whole.choices[0].finish_reason
    if server.client.engines[0].capabilities.streaming:
        assert content_chunks > 1, "a 48-token completion must arrive in more than one content chunk"


def test_chat_stream_joins_to_the_same_text_with_usage(server, oai):
    messages = [{"role": "user", "content": PROMPT}]
    whole = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=0, n=2)
    events = list(oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=0, n=2,
                                              stream=True, stream_options={"include_usage": True}))
    texts, finish, _ = streamed_text(events)
    assert [texts[i] for i in range(2)] == [c.message.content for c in whole.choices]
    assert [finish[i] for i in range(2)] == [c.finish_reason for c in whole.choices]
    assert events[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_strings_are_honoured_in_stream_mode(server, oai):
    full = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=32, temperature=0, extra_body={
        "ignore_eos": True}).choices[0].text
    middle = len(full) // 2
    stop = full[middle:middle + 3]
    assert len(stop.strip()) >= 2, f"test self-check: no usable stop string in {full!r}"
    whole = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=32, temperature=0, stop=[stop],
                                   extra_body={"ignore_eos": True})
    texts, finish, _ = streamed_text(oai.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=32, temperature=0, stop=[stop], stream=True,
        extra_body={"ignore_eos": True}))
    assert whole.choices[0].finish_reason == "stop" and finish[0] == "stop"
    assert texts[0] == whole.choices[0].text
    assert stop not in texts[0][:-len(stop)] and len(texts[0]) < len(full)


def test_bad_parameters_in_stream_mode_are_a_clean_400(server, oai):
    with pytest.raises(openai.BadRequestError, match="top_k"):
        list(oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, stream=True,
                                    extra_body={"top_k": -5}))
