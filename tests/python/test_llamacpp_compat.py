"""What llama-server's clients send beyond OpenAI's API, as llama.cpp's server README documents
it, against chatd. Each test names the llama.cpp behaviour it follows."""

import json

import jsonschema
import openai
import pytest

from conftest import post_json

MODEL = "smollm2-135m-instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def client(chatd):
    return openai.OpenAI(base_url=chatd + "/v1", api_key="unused", max_retries=0)


def test_gbnf_in_grammar_is_recognised(client):
    # llama-server's `grammar` is GBNF; chatd tells GBNF from Lark by its `::=` rules.
    grammar = 'root ::= answer "."\nanswer ::= "yes" | "no" | "maybe"'
    for subject in ["cats", "the sea", "trains"]:
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Do you like {subject}?"}], temperature=0.7,
            max_tokens=8, extra_body={"grammar": grammar})
        assert r.choices[0].finish_reason == "stop"
        assert r.choices[0].message.content in ("yes.", "no.", "maybe.")


@pytest.mark.parametrize("body", [
    {"response_format": {"type": "json_object", "schema": PERSON}},  # llama-server: schema beside the type
    {"response_format": {"type": "json_schema", "schema": PERSON}},
    {"json_schema": PERSON},  # llama-server's own field
])
def test_llamacpp_schema_spellings(client, body):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Invent a person."}],
                                       temperature=0, max_tokens=48, extra_body=body)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_two_spellings_at_once_are_refused(chatd):
    body = {"messages": FRANCE, "json_schema": PERSON, "response_format": {"type": "json_object"}}
    status, answer = post_json(chatd, "/v1/chat/completions", body)
    assert status == 400 and "only one constraint" in answer["error"]["message"]


def test_cache_prompt_is_taken(chatd):
    # llama-server's `cache_prompt`: chatd always reuses cached prefixes; the output is the same.
    outputs = []
    for cache_prompt in [True, False]:
        status, answer = post_json(chatd, "/v1/chat/completions",
                                   {"messages": FRANCE, "max_tokens": 8, "temperature": 0, "cache_prompt": cache_prompt})
        assert status == 200
        outputs.append(answer["choices"][0]["message"]["content"])
    assert outputs[0] == outputs[1]
