"""Structured output on the real SmolLM2 model: every constrained completion that ends with
"stop" follows its constraint (regex, json_object, json_schema, forced tool calls), over 20
prompts per kind at temperature 0 and 0.7; streaming agrees with non-streaming; bad constraints
get 400; and where the unconstrained model breaks the format, the constrained one does not."""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
from openai import OpenAI

SUBJECTS = [
    "a cat", "the city of Paris", "a red car", "a birthday party", "the ocean", "a computer", "a teacher",
    "an apple", "a mountain", "a football match", "a library", "a dog", "the moon", "a train", "a garden",
    "a coffee shop", "a rainy day", "a robot", "a violin", "a winter morning",
]
TEMPERATURES = [0.0, 0.7]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
        "role": {"enum": ["student", "teacher", "engineer", "artist"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a time zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 30}},
                       "required": ["zone"], "additionalProperties": False},
    },
}
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER_TOOL, TIME_TOOL)}

# Python's re and Rust's regex agree on this subset.
DATE = r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
SENTENCE = r"[A-Z][a-z]+( [a-z]+){2,6}\."


@pytest.fixture(scope="module")
def client(chatd_genai):
    return OpenAI(base_url=chatd_genai + "/v1", api_key="unused", max_retries=0)


def ask(client, prompt, temperature, seed, **extra):
    return client.chat.completions.create(
        model="smollm2-135m-instruct-genai",
        messages=[{"role": "user", "content": prompt}],
        temperature=temperature,
        seed=seed,
        max_tokens=extra.pop("max_tokens", 64),
        extra_body=extra.pop("extra_body", None),
        **extra,
    )


def run_all(jobs):
    """Runs requests concurrently, as the engine batches them."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda job: job(), jobs))


def cases():
    return [(s, t, i) for i, s in enumerate(SUBJECTS) for t in TEMPERATURES]


def check_outcome(choice, valid):
    """A "stop" must be valid; "length" is the only other acceptable ending."""
    assert choice.finish_reason in ("stop", "length", "tool_calls"), choice.finish_reason
    if choice.finish_reason == "length":
        return False
    valid(choice)
    return True


def test_regex_completions_match(client):
    def job(subject, temperature, seed):
        return lambda: ask(client, f"When did you last see {subject}? Answer with a date.", temperature, seed,
                           extra_body={"regex": DATE}, max_tokens=16)

    results = run_all([job(*c) for c in cases()])
    stopped = sum(check_outcome(r.choices[0], lambda c: re.fullmatch(DATE, c.message.content) or pytest.fail(
        f"{c.message.content!r} does not match")) for r in results)
    assert stopped == len(results), "a date fits in 16 tokens: every regex answer must complete"


def test_json_object_completions_parse(client):
    def job(subject, temperature, seed):
        return lambda: ask(client, f"Describe {subject} as JSON.", temperature, seed,
                           response_format={"type": "json_object"}, max_tokens=64)

    def valid(choice):
        assert isinstance(json.loads(choice.message.content), dict), choice.message.content

    results = run_all([job(*c) for c in cases()])
    stopped = sum(check_outcome(r.choices[0], valid) for r in results)
    # Free-form JSON is where a 135M model rambles (nested arrays of one number, endless strings):
    # many answers run out of tokens and say so ("length"); those that end are all valid.
    assert stopped >= 5, f"only {stopped} of {len(results)} finished within max_tokens"


def test_json_schema_completions_validate(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    def job(subject, temperature, seed):
        return lambda: ask(client, f"Invent a person who likes {subject}.", temperature, seed,
                           response_format=fmt, max_tokens=96)

    def valid(choice):
        jsonschema.validate(json.loads(choice.message.content), PERSON)

    results = run_all([job(*c) for c in cases()])
    stopped = sum(check_outcome(r.choices[0], valid) for r in results)
    assert stopped >= len(results) * 3 // 4, f"only {stopped} of {len(results)} finished within max_tokens"


@pytest.mark.parametrize("field, grammar", [
    ("grammar", 'start: answer "."\nanswer: "yes" | "no" | "maybe"'),
    ("ebnf", 'root ::= answer "."\nanswer ::= "yes" | "no" | "maybe"  # GBNF'),
])
def test_grammar_completions_follow_the_grammar(client, field, grammar):
    def job(subject, temperature, seed):
        return lambda: ask(client, f"Do you like {subject}?", temperature, seed, extra_body={field: grammar},
                           max_tokens=8)

    results = run_all([job(*c) for c in cases()[:16]])
    for r in results:
        c = r.choices[0]
        assert c.finish_reason == "stop" and c.message.content in ("yes.", "no.", "maybe."), c


def test_forced_tool_calls_are_valid(client):
    def job(subject, temperature, seed):
        choice = "required" if seed % 2 else {"type": "function", "function": {"name": "get_weather"}}
        return lambda: (choice, ask(client, f"What is the weather like where {subject} is?", temperature, seed,
                                    tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=choice, max_tokens=64))

    results = run_all([job(*c) for c in cases()])
    for choice, r in results:
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", (c.finish_reason, c.message)
        assert c.message.content is None
        [call] = c.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        if isinstance(choice, dict):
            assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), TOOL_SCHEMAS[call.function.name])


def stream_text(client, **request):
    content, tool_calls, finish = "", [], None
    for chunk in client.chat.completions.create(stream=True, **request):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        tool_calls += delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    return content, tool_calls, finish


def test_streaming_agrees_with_non_streaming(client):
    base = {"model": "smollm2-135m-instruct-genai", "temperature": 0, "max_tokens": 64}
    requests = [
        {"messages": [{"role": "user", "content": "Give a date."}], "extra_body": {"regex": DATE}},
        {"messages": [{"role": "user", "content": "Invent a person."}],
         "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}},
        {"messages": [{"role": "user", "content": "Describe a cat as JSON."}],
         "response_format": {"type": "json_object"}},
        {"messages": [{"role": "user", "content": "Say something."}], "extra_body": {"regex": SENTENCE}},
    ]
    for extra in requests:
        whole = client.chat.completions.create(**base, **extra).choices[0]
        content, _, finish = stream_text(client, **base, **extra)
        assert (content, finish) == (whole.message.content, whole.finish_reason)

    tools = {"messages": [{"role": "user", "content": "Weather in Rome?"}], "tools": [WEATHER_TOOL],
             "tool_choice": "required"}
    whole = client.chat.completions.create(**base, **tools).choices[0]
    content, calls, finish = stream_text(client, **base, **tools)
    assert finish == "tool_calls" and content == ""
    assert calls[0].function.name == whole.message.tool_calls[0].function.name
    assert "".join(c.function.arguments or "" for c in calls) == whole.message.tool_calls[0].function.arguments


def test_the_constraint_does_the_work(client):
    """Unconstrained, the small model does not answer in the format; constrained, it does."""
    prompts = [f"Invent a person who likes {s}. Reply with JSON only." for s in SUBJECTS[:10]]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}

    def valid(text):
        try:
            jsonschema.validate(json.loads(text), PERSON)
            return True
        except (ValueError, jsonschema.ValidationError):
            return False

    free = run_all([lambda p=p: ask(client, p, 0.0, 1, max_tokens=96) for p in prompts])
    forced = run_all([lambda p=p: ask(client, p, 0.0, 1, max_tokens=96, response_format=fmt) for p in prompts])
    free_ok = sum(valid(r.choices[0].message.content) for r in free)
    forced_ok = sum(r.choices[0].finish_reason == "stop" and valid(r.choices[0].message.content) for r in forced)
    assert free_ok <= 2, f"the unconstrained model already followed the schema {free_ok} times"
    assert forced_ok >= 8, f"constrained: only {forced_ok} of 10 valid"


def test_an_unfinishable_constraint_ends_with_length(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    r = ask(client, "Invent a person.", 0.0, 1, response_format=fmt, max_tokens=4)
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("body, param, needle", [
    ({"regex": "(unclosed"}, "regex", "unclosed group"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "oneOf": 3}}}},
     "response_format", "invalid `response_format`"),
    ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
    ({"grammar": "start: undefined_rule"}, "grammar", "undefined_rule"),
    ({"ebnf": "answer ::= \"x\""}, "ebnf", "root"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"regex": "a+", "response_format": {"type": "json_object"}}, "response_format", "only one constraint"),
    ({"ebnf": "root ::= \"a\"", "grammar": "start: \"a\""}, "grammar", "`ebnf` and `grammar`"),
    ({"tool_choice": "required"}, "tool_choice", "needs `tools`"),
])
def test_bad_constraints_get_400_and_serving_goes_on(chatd_genai, body, param, needle):
    import urllib.error
    import urllib.request

    payload = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **body}
    request = urllib.request.Request(chatd_genai + "/v1/chat/completions", json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 400
    error = json.load(refused.value)["error"]
    assert error["param"] == param and needle in error["message"], error
    good = dict(payload, max_tokens=4)
    for key in body:
        good.pop(key)
    with urllib.request.urlopen(urllib.request.Request(chatd_genai + "/v1/chat/completions", json.dumps(good).encode(),
                                                       {"Content-Type": "application/json"}), timeout=60) as r:
        assert r.status == 200


# What a pydantic model with a nested model gives as its JSON schema (model_json_schema()).
ORDER_TOOL = {
    "type": "function",
    "function": {
        "name": "place_order",
        "parameters": {
            "$defs": {
                "Item": {"type": "object", "properties": {"sku": {"type": "string", "maxLength": 12},
                                                          "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                         "required": ["sku", "qty"], "title": "Item", "additionalProperties": False},
            },
            "type": "object",
            "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "maxItems": 2},
                           "note": {"type": "string", "maxLength": 24}},
            "required": ["items"],
            "title": "Order",
        },
    },
}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "place_order"}}])
def test_forced_tools_with_refs_are_valid(client, choice):
    # Before the fix every such request was a 400 ("Pointer '/$defs/Item' does not exist").
    calls = 0
    for seed, subject in enumerate(SUBJECTS[:4]):
        r = ask(client, f"Order something about {subject}.", 0.7, seed, tools=[WEATHER_TOOL, ORDER_TOOL],
                tool_choice=choice, max_tokens=96)
        c = r.choices[0]
        if c.finish_reason == "length":
            continue
        assert c.finish_reason == "tool_calls", (c.finish_reason, c.message)
        [call] = c.message.tool_calls
        schema = ORDER_TOOL["function"]["parameters"] if call.function.name == "place_order" else TOOL_SCHEMAS[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), schema)
        calls += call.function.name == "place_order"
    assert calls > 0 or choice == "required"


def test_forced_calls_stream_their_arguments_and_are_cut_off_alike(client):
    """A forced call streams as OpenAI's and vLLM's: the head (id, name) first, then the
    arguments in pieces as they are generated; cut off by max_tokens, the partial call comes
    where a whole one would, with finish_reason "length" and no content, streamed or not."""
    base = {"model": "smollm2-135m-instruct-genai", "temperature": 0,
            "messages": [{"role": "user", "content": "Order two items for a birthday party."}],
            "tools": [ORDER_TOOL], "tool_choice": {"type": "function", "function": {"name": "place_order"}}}
    whole = client.chat.completions.create(**base, max_tokens=96).choices[0]
    assert whole.finish_reason == "tool_calls"
    arguments = whole.message.tool_calls[0].function.arguments
    content, calls, finish = stream_text(client, **base, max_tokens=96)
    assert (content, finish) == ("", "tool_calls")
    assert calls[0].id and calls[0].function.name == "place_order" and calls[0].function.arguments == ""
    pieces = [c.function.arguments for c in calls[1:]]
    assert len(pieces) > 2, pieces  # streamed as generated, not in one piece at the end
    assert "".join(pieces) == arguments

    cut = client.chat.completions.create(**base, max_tokens=12).choices[0]
    assert cut.finish_reason == "length" and cut.message.content is None
    partial = cut.message.tool_calls[0].function.arguments
    assert cut.message.tool_calls[0].function.name == "place_order"
    assert arguments.startswith(partial) and len(partial) < len(arguments)
    content, calls, finish = stream_text(client, **base, max_tokens=12)
    assert (content, finish) == ("", "length")
    assert "".join(c.function.arguments or "" for c in calls) == partial
