"""The Python binding (bindings/python) against the real libchat.so and SmolLM2 model.

    .venv/bin/python -m pytest -q tests/python/test_binding.py

Uses LIBCHAT_PATH when set, else target/release/libchat.so (built by `cargo build --release`);
the installed `libchat` package when there is one, else the source in bindings/python.
"""

import importlib.util
import json
import os
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT.parent / "shared" / "models" / "smollm2-135m-instruct-genai"
OPTIMUM_MODEL = ROOT.parent / "shared" / "models" / "smollm2-135m-instruct"

os.environ.setdefault("LIBCHAT_PATH", str(ROOT / "target" / "release" / "libchat.so"))
if importlib.util.find_spec("libchat") is None:
    sys.path.insert(0, str(ROOT / "bindings" / "python"))
import libchat  # noqa: E402  (needs LIBCHAT_PATH and sys.path set above)

QUESTION = "What is the capital of France?"


def ask(question, **fields):
    """A greedy, short chat request, so that answers are quick and reproducible."""
    return {"messages": [{"role": "user", "content": question}], "max_tokens": 32, "temperature": 0, **fields}


def content(response):
    return response["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def engine():
    """One engine for the whole module: loading the model is the slow part."""
    assert MODEL.exists(), f"the test model is needed at {MODEL}"
    with libchat.Engine({"model": str(MODEL), "threads": 2}) as engine:
        yield engine


def test_version():
    assert libchat.version() == "0.1.0"


@pytest.mark.parametrize("status", [14, 15, 99, -1, 2**31 - 1, -(2**31)])
def test_a_status_this_binding_does_not_know_is_named_not_fatal(status):
    # chat_status_str takes an int: values from a newer libchat, or any other, are defined.
    error = libchat.ChatError(status, "from the future")
    assert str(error) == "unknown status: from the future"
    assert error.status_name == f"CHAT_STATUS_{status}"


def test_chat(engine):
    response = engine.chat(ask(QUESTION))
    assert response["object"] == "chat.completion"
    assert "Paris" in content(response)
    assert response["choices"][0]["finish_reason"] in ("stop", "length")
    usage = response["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_stream_pieces_make_the_response(engine):
    stream = engine.stream(ask(QUESTION))
    pieces = list(stream)
    assert len(pieces) > 1 and all(isinstance(piece, str) for piece in pieces)
    assert "".join(pieces) == content(stream.response)
    assert stream.response["usage"]["completion_tokens"] > 0


def test_stopping_a_stream_cancels_it(engine):
    """close() and leaving a `with` block cancel the request (no response) without raising,
    and the engine answers the next request."""
    long_answer = ask("Tell me a long story about a dragon.", max_tokens=200)
    stream = engine.stream(long_answer)
    for _ in stream:
        break
    stream.close()
    stream.close()
    assert stream.response is None

    with engine.stream(long_answer) as stream:
        next(stream)
    assert stream.response is None

    assert "Paris" in content(engine.chat(ask(QUESTION)))


def test_stream_errors_reach_the_consumer(engine):
    stream = engine.stream(ask(QUESTION, max_tokens="ten"))
    with pytest.raises(libchat.ChatError) as error:
        list(stream)
    assert error.value.status_name == "CHAT_INVALID_REQUEST"


@pytest.mark.parametrize(
    "request_, status_name, mentions",
    [
        ("{not json", "CHAT_INVALID_REQUEST", "JSON"),
        (ask(QUESTION, max_tokens="ten"), "CHAT_INVALID_REQUEST", "max_tokens"),
        (ask(QUESTION, model="no-such-model"), "CHAT_MODEL_NOT_FOUND", "no-such-model"),
    ],
)
def test_request_errors(engine, request_, status_name, mentions):
    with pytest.raises(libchat.ChatError) as error:
        engine.chat(request_)
    assert error.value.status_name == status_name
    assert error.value.status == libchat.Status[status_name]
    assert mentions in error.value.message


@pytest.mark.parametrize(
    "config, status_name",
    [
        ({"model": "/nonexistent"}, "CHAT_MODEL_LOAD_FAILED"),
        ({"model": str(MODEL), "no_such_setting": 1}, "CHAT_INVALID_CONFIG"),
        ("{not json", "CHAT_INVALID_CONFIG"),
    ],
)
def test_config_errors(config, status_name):
    with pytest.raises(libchat.ChatError) as error:
        libchat.Engine(config)
    assert error.value.status_name == status_name
    assert error.value.message


def test_closed_engine():
    engine = libchat.Engine({"model": str(MODEL), "threads": 1})
    engine.close()
    engine.close()
    with pytest.raises(ValueError):
        engine.chat(ask(QUESTION))


@pytest.fixture(scope="module")
def optimum_engine():
    """An engine on the Optimum layout, which runs each sequence alone in a round: its answers
    cannot depend on what else runs (the genai layout's batched runs may turn a near-tie on some
    CPUs; tests/batching.rs checks those)."""
    with libchat.Engine({"model": str(OPTIMUM_MODEL), "threads": 2}) as engine:
        yield engine


def test_threads_share_the_engine(optimum_engine):
    """Concurrent requests share the engine's rounds; each must still get its own answer, the
    one it gets alone (greedy decoding)."""
    engine = optimum_engine
    questions = [QUESTION, "Name a primary color.", "What is 2 + 2?", "What do bees make?"]
    alone = [content(engine.chat(ask(q))) for q in questions]
    together = [None] * len(questions)
    errors = []

    def run(i):
        try:
            together[i] = content(engine.chat(ask(questions[i])))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert together == alone


def test_complete(engine):
    response = engine.complete({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
    assert response["object"] == "text_completion"
    assert response["choices"][0]["text"]
    assert response["usage"]["completion_tokens"] > 0


def test_constraints_and_tool_calls_work_through_the_binding(engine):
    """The request JSON is the HTTP API's, constraints included."""
    import re

    response = engine.chat(ask("When were you born? Answer with a year.", regex="(19|20)[0-9]{2}", max_tokens=8))
    assert re.fullmatch("(19|20)[0-9]{2}", content(response)), content(response)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}
    response = engine.chat(ask("Weather in Paris?", tools=[tool], tool_choice="required", max_tokens=48))
    choice = response["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    call = choice["message"]["tool_calls"][0]["function"]
    assert call["name"] == "get_weather" and isinstance(json.loads(call["arguments"])["city"], str)
    with pytest.raises(libchat.ChatError) as refused:
        engine.chat(ask("hi", regex="(unclosed"))
    assert refused.value.status_name == "CHAT_INVALID_REQUEST" and "regex" in refused.value.message
