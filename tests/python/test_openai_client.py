"""The official openai package works against chatd unchanged."""

import openai
import pytest

MODEL = "smollm2-135m-instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(chatd):
    return openai.OpenAI(base_url=chatd + "/v1", api_key="unused", max_retries=0)


def test_chat_completion(client):
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0)
    assert r.object == "chat.completion"
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == 37
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_completion_stream_matches_plain(client):
    plain = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_stream_without_usage(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=5, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)


def test_parameters_and_n(client):
    r = client.chat.completions.create(
        model=MODEL, messages=FRANCE, n=2, max_tokens=8, temperature=0.9, top_p=0.95, seed=11,
        presence_penalty=0.5, frequency_penalty=0.5, logprobs=True, top_logprobs=2, stop=["\n\n"],
    )
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert c.logprobs.content and len(c.logprobs.content[0].top_logprobs) == 2


def test_completions_and_models(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert r.object == "text_completion"
    assert "Paris" in r.choices[0].text
    assert [m.id for m in client.models.list()] == [MODEL]


def test_errors_become_openai_exceptions(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=FRANCE)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=7)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=100000)
    assert e.value.code == "context_length_exceeded"
