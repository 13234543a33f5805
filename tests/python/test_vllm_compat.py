"""What vLLM's OpenAI server accepts beyond OpenAI's API, as vLLM documents it, against chatd.

Each test names the vLLM behaviour it follows. Requests go through the official openai client
(`extra_body`, as vLLM's own docs show) or as raw JSON where the status code is the point.
"""

import json

import jinja2.sandbox
import openai
import pytest
import tokenizers

from conftest import MODEL as MODEL_DIR
from conftest import post_json

MODEL = "smollm2-135m-instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(chatd):
    return openai.OpenAI(base_url=chatd + "/v1", api_key="unused", max_retries=0)


def greedy_chat(client, **extra):
    return client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=24, extra_body=extra or None
    )


def a_stop_string_inside(text):
    """A piece of `text` well after its start, and where it first occurs."""
    words = [w for w in text.split(" ") if len(w) >= 3]
    assert len(words) >= 3, f"the answer is too short to pick a stop string from: {text!r}"
    stop = " " + words[2]
    return stop, text.index(stop)


def test_stop_strings_are_cut_unless_include_stop_str_in_output(client):
    # vLLM SamplingParams.include_stop_str_in_output: the stop string stays in the output.
    plain = greedy_chat(client).choices[0].message.content
    stop, at = a_stop_string_inside(plain)
    cut = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=24, stop=[stop])
    kept = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=24, stop=[stop],
        extra_body={"include_stop_str_in_output": True},
    )
    assert cut.choices[0].message.content == plain[:at]
    assert kept.choices[0].message.content == plain[:at] + stop
    assert cut.choices[0].finish_reason == kept.choices[0].finish_reason == "stop"


def test_stop_reason_names_the_stop_string_and_is_null_at_the_end_token(client):
    # vLLM CompletionResponseChoice.stop_reason: the stop string or stop token id that ended the
    # choice; None when it ended for another reason, the model's end-of-sequence token included.
    whole = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=200)
    assert whole.choices[0].finish_reason == "stop"
    assert whole.choices[0].model_extra["stop_reason"] is None
    stop, _ = a_stop_string_inside(whole.choices[0].message.content)
    stopped = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=200, stop=[stop])
    assert stopped.choices[0].model_extra["stop_reason"] == stop
    # Cut short of the whole answer, however long the greedy answer is on this machine's kernels.
    short = max(1, whole.usage.completion_tokens - 2)
    cut = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=short)
    assert cut.choices[0].finish_reason == "length"
    assert cut.choices[0].model_extra["stop_reason"] is None


def render_as_transformers(messages, add_generation_prompt):
    """The SmolLM2 chat template rendered by jinja2 with transformers' settings."""
    config = json.loads((MODEL_DIR / "tokenizer_config.json").read_text())
    template = config.get("chat_template") or (MODEL_DIR / "chat_template.jinja").read_text()
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


def test_continue_final_message_continues_the_assistant_text(client):
    # vLLM ChatCompletionRequest.continue_final_message (with add_generation_prompt false):
    # the prompt ends right after the last assistant message's text, as transformers'
    # apply_chat_template(continue_final_message=True) cuts it.
    start = "The capital of France is"
    messages = FRANCE + [{"role": "assistant", "content": start}]
    rendered = render_as_transformers(messages, add_generation_prompt=False)
    prompt = rendered[: rendered.rindex(start) + len(start)]
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=16,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    completion = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=16)
    assert chat.usage.prompt_tokens == completion.usage.prompt_tokens
    assert chat.choices[0].message.content == completion.choices[0].text
    # Without the flag the turn is closed and a new assistant turn starts: another prompt.
    closed = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=1)
    assert closed.usage.prompt_tokens > chat.usage.prompt_tokens


def test_continue_final_message_refuses_what_vllm_refuses(chatd):
    # vLLM: "continue_final_message and add_generation_prompt cannot both be true"; the last
    # message must be the assistant's.
    both = {"messages": FRANCE + [{"role": "assistant", "content": "The"}], "continue_final_message": True,
            "add_generation_prompt": True}
    status, body = post_json(chatd, "/v1/chat/completions", both)
    assert status == 400 and body["error"]["param"] == "continue_final_message"
    status, body = post_json(chatd, "/v1/chat/completions", {"messages": FRANCE, "continue_final_message": True})
    assert status == 400 and body["error"]["param"] == "continue_final_message"


def test_echo_puts_the_prompt_before_each_completion(client):
    # OpenAI's and vLLM's /v1/completions `echo`: the prompt is echoed back with the completion.
    prompt = "The capital of France is"
    plain = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8)
    echoed = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8, echo=True, n=2)
    assert [c.text for c in echoed.choices] == [prompt + plain.choices[0].text] * 2
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8, echo=True,
                                           stream=True)
        if c.choices
    )
    assert streamed == prompt + plain.choices[0].text
    # Token ids echo as their text (decoded by the tokenizers package itself).
    ids = tokenizers.Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json")).encode(prompt).ids
    plain = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=8)
    echoed = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=8, echo=True)
    assert echoed.choices[0].text == prompt + plain.choices[0].text


def test_echo_with_logprobs_is_refused_by_name(chatd):
    # vLLM answers echo + logprobs with the prompt's logprobs; chatd does not compute them.
    status, body = post_json(chatd, "/v1/completions", {"prompt": "Hi", "echo": True, "logprobs": 1})
    assert status == 400 and body["error"]["param"] == "echo"


def test_chat_template_kwargs_are_taken(chatd):
    # vLLM ChatCompletionRequest.chat_template_kwargs: extra template variables (an object).
    status, _ = post_json(chatd, "/v1/chat/completions",
                          {"messages": FRANCE, "max_tokens": 1, "chat_template_kwargs": {"enable_thinking": False}})
    assert status == 200
    status, body = post_json(chatd, "/v1/chat/completions",
                             {"messages": FRANCE, "max_tokens": 1, "chat_template_kwargs": "no"})
    assert status == 400 and body["error"]["param"] == "chat_template_kwargs"


@pytest.mark.parametrize(
    "field, value",
    [
        ("prompt_logprobs", 1),  # vLLM: logprobs of the prompt tokens, not computed here
        ("skip_special_tokens", False),  # vLLM: special tokens in the text; chatd always skips them
        ("return_token_ids", True),  # vLLM: token ids in the choices
        ("stop_regex", "a+"),  # llama.cpp / SGLang: stop at a regex match, not implemented
        ("chat_template", "{{ messages }}"),  # vLLM: a template from the request, not taken
        ("no_such_field", 1),
    ],
)
def test_fields_chatd_does_not_honour_are_refused_by_name(chatd, field, value):
    # OpenAI: "Unrecognized request argument supplied"; never silently ignored.
    status, body = post_json(chatd, "/v1/chat/completions", {"messages": FRANCE, "max_tokens": 1, field: value})
    assert status == 400, body
    assert body["error"]["param"] == field
    assert field in body["error"]["message"]


@pytest.mark.parametrize(
    "field, value",
    [("skip_special_tokens", True), ("return_token_ids", False), ("user", "u-1"), ("parallel_tool_calls", False),
     ("store", False), ("no_such_field", None)],
)
def test_fields_at_what_chatd_does_anyway_are_taken(chatd, field, value):
    status, body = post_json(chatd, "/v1/chat/completions", {"messages": FRANCE, "max_tokens": 1, field: value})
    assert status == 200, body


def test_stream_options_fields_are_checked_too(chatd):
    # vLLM stream_options.continuous_usage_stats: usage in every chunk, not implemented.
    body = {"messages": FRANCE, "max_tokens": 1, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    status, answer = post_json(chatd, "/v1/chat/completions", body)
    assert status == 400 and answer["error"]["param"] == "stream_options.continuous_usage_stats"


YES_NO = ["yes", "no", "maybe"]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.mark.parametrize("body", [
    {"structured_outputs": {"choice": YES_NO}},  # vLLM StructuredOutputsParams.choice
    {"guided_choice": YES_NO},  # vLLM before structured_outputs
    {"structured_outputs": {"regex": "(yes|no|maybe)"}},
    {"structured_outputs": {"grammar": 'root ::= "yes" | "no" | "maybe"'}},  # vLLM takes GBNF-style EBNF
])
def test_vllm_structured_output_choices(client, body):
    for subject in ["cats", "the sea", "trains"]:
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Do you like {subject}?"}], temperature=0.7,
            max_tokens=8, extra_body=body)
        assert r.choices[0].finish_reason == "stop"
        assert r.choices[0].message.content in YES_NO


@pytest.mark.parametrize("body", [
    {"structured_outputs": {"json": PERSON}},
    {"structured_outputs": {"json": json.dumps(PERSON)}},  # vLLM also takes the schema as JSON text
    {"guided_json": PERSON},
])
def test_vllm_structured_output_json(client, body):
    import jsonschema

    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Invent a person."}],
                                       temperature=0, max_tokens=48, extra_body=body)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


@pytest.mark.parametrize("body, param", [
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs.choice"),
    ({"structured_outputs": {"choice": ["b"]}, "regex": "a"}, "structured_outputs.choice"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
])
def test_vllm_structured_outputs_refusals_name_the_field(chatd, body, param):
    # One constraint per request, as chatd's own fields; kinds chatd lacks are named.
    status, answer = post_json(chatd, "/v1/chat/completions", {"messages": FRANCE, "max_tokens": 1, **body})
    assert status == 400, answer
    assert answer["error"]["param"] == param, answer


def test_max_tokens_and_max_completion_tokens_together(chatd):
    # OpenAI renamed max_tokens; clients that send both get the limit while the two agree.
    status, body = post_json(chatd, "/v1/chat/completions",
                             {"messages": FRANCE, "max_tokens": 2, "max_completion_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] <= 2
    status, body = post_json(chatd, "/v1/chat/completions",
                             {"messages": FRANCE, "max_tokens": 2, "max_completion_tokens": 3})
    assert status == 400 and body["error"]["param"] == "max_tokens"


@pytest.mark.parametrize("prompt", [["One,", "Two,"], [[504, 3575], [504]]])
def test_batch_prompts_are_refused_by_name(chatd, prompt):
    # OpenAI and vLLM answer a list of prompts with one choice each; chatd takes one prompt per
    # request (a string, a list of one string, or token ids) and says so instead of answering one.
    status, body = post_json(chatd, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
    assert status == 400 and body["error"]["param"] == "prompt", body
