"""The client libraries on-box apps use, unchanged, against chatd: LangChain's ChatOpenAI (invoke,
stream, with_structured_output in json_schema and function-calling modes, bind_tools) and
LiteLLM. Each sends what it sends by default; nothing here is adapted to chatd."""

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import

import litellm  # noqa: E402
import pytest  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langchain_openai import ChatOpenAI  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

MODEL = "smollm2-135m-instruct"
QUESTION = "What is the capital of France?"


def chat_model(base, **settings):
    return ChatOpenAI(base_url=base + "/v1", api_key="unused", model=MODEL, temperature=0, max_retries=0, **settings)


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)


@tool
def get_weather(city: str) -> str:
    """Current weather in a city."""
    return "sunny"


def test_langchain_invoke_and_stream_agree(chatd):
    model = chat_model(chatd, max_tokens=16)
    whole = model.invoke(QUESTION)
    assert whole.content and whole.response_metadata["finish_reason"] in ("stop", "length")
    assert "".join(chunk.content for chunk in model.stream(QUESTION)) == whole.content


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output(chatd, method):
    person = chat_model(chatd, max_tokens=64).with_structured_output(Person, method=method).invoke("Invent a person.")
    assert isinstance(person, Person)


def test_langchain_bind_tools(chatd):
    model = chat_model(chatd, max_tokens=48).bind_tools([get_weather], tool_choice="get_weather")
    message = model.invoke("What is the weather in Paris?")
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"], dict)


def test_litellm_completion_and_stream(chatd):
    settings = {"model": "openai/" + MODEL, "api_base": chatd + "/v1", "api_key": "unused", "temperature": 0,
                "max_tokens": 16, "messages": [{"role": "user", "content": QUESTION}]}
    whole = litellm.completion(**settings)
    text = whole.choices[0].message.content
    assert text
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in litellm.completion(stream=True, **settings))
    assert streamed == text


OPENAI_NODE = "openai@7.60.0"


def test_openai_node(chatd):
    """openai-node, installed from npm into target/ (once) and run by the system's node."""
    import json
    import pathlib
    import shutil
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[2]
    here = root / "target" / "openai-node"
    if not (here / "node_modules" / "openai").exists():
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(here), OPENAI_NODE],
                       check=True, timeout=600)
    script = here / "client.mjs"
    shutil.copy(pathlib.Path(__file__).with_name("openai_node_client.mjs"), script)
    out = subprocess.run(["node", str(script), chatd], check=True, capture_output=True, text=True, timeout=600)
    result = json.loads(out.stdout)
    assert result["whole"] and result["streamed"] == result["whole"], result
    assert result["finish"] in ("stop", "length")
