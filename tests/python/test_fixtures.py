"""chatd on model folders of other families, as onnxruntime-genai's builder and Optimum write them,
against the references recorded when the fixtures were made (scripts/make-fixtures.sh, run by
scripts/test.sh): the prompt's token ids as transformers' apply_chat_template makes them (template
in chat_template.jinja, real vocabulary, `chat_template_kwargs`), a text prompt's ids as the
tokenizer's post-processor makes them (BOS), and the greedy tokens from that prompt of
onnxruntime-genai's Generator (genai layout) or a plain onnxruntime loop (Optimum layout).
"""

import json
import os
import pathlib
import sys

import pytest

from conftest import ROOT, first_parting, post_json, start_chatd, stop

sys.path.insert(0, str(ROOT / "scripts"))
import make_fixtures  # noqa: E402  (the families and cases, declared once there)

FIXTURES = pathlib.Path(
    os.environ.get("CHATD_FIXTURES", pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
                   / "chatd-fixtures")
)


def folders(families):
    return [(family, layout) for family in sorted(families) for layout in make_fixtures.layouts(family)]


def serving(family, layout):
    """(expected, layout, base URL) for chatd serving one family's folder of one layout."""
    expected_path = FIXTURES / family / "expected.json"
    assert expected_path.exists(), f"{expected_path} is missing: make it with scripts/make-fixtures.sh"
    proc, base = start_chatd(FIXTURES / family / layout, f"pytest-fixture-{family}-{layout}.log")
    yield json.loads(expected_path.read_text()), layout, base
    stop(proc)


@pytest.fixture(scope="module", params=folders(make_fixtures.FAMILIES), ids="/".join)
def fixture(request):
    yield from serving(*request.param)


# The families whose template can open the thinking block in the generation prompt.
THINKING = [f for f in make_fixtures.FAMILIES if f in make_fixtures.CASES["thinking"]["families"]]


@pytest.fixture(scope="module", params=folders(THINKING), ids="/".join)
def thinking(request):
    yield from serving(*request.param)


def chat_body(case, max_tokens):
    body = {"messages": case["messages"], "temperature": 0, "max_tokens": max_tokens, "logprobs": True}
    for field in ("chat_template_kwargs", "tools"):
        if field in case:
            body[field] = case[field]
    return body


def answer(base, case, max_tokens):
    """(prompt ids chatd tokenizes, usage, generated token texts, finish reason) for one case."""
    if "prompt" in case:
        status, tokenized = post_json(base, "/tokenize", {"prompt": case["prompt"]})
        assert status == 200, tokenized
        status, r = post_json(
            base, "/v1/completions", {"prompt": case["prompt"], "temperature": 0, "max_tokens": max_tokens, "logprobs": 0}
        )
        assert status == 200, r
        choice = r["choices"][0]
        texts = choice["logprobs"]["tokens"]
    else:
        body = chat_body(case, max_tokens)
        del body["temperature"], body["max_tokens"], body["logprobs"]
        status, tokenized = post_json(base, "/tokenize", body)
        assert status == 200, tokenized
        status, r = post_json(base, "/v1/chat/completions", chat_body(case, max_tokens))
        assert status == 200, r
        choice = r["choices"][0]
        texts = [entry["token"] for entry in choice["logprobs"]["content"]]
    return tokenized["tokens"], r["usage"], texts, choice["finish_reason"]


# Two correct runs of one graph differ in their logits by rounding (chatd feeds a prompt in chunks,
# the references whole), well under this: a parting of the ways where the reference's best token
# led its runner-up by less is a tie, not a bug, and the tokens after it are not compared.
NEAR_TIE = 1e-3


def greedy_problems(texts, finish, usage, greedy):
    """How chatd's greedy tokens differ from the reference's, where that is not a near-tie."""
    want = greedy["texts"]
    parted = first_parting(texts, finish, want, greedy["finish_reason"])
    if parted is not None:
        if greedy["margins"][parted] < NEAR_TIE:
            return []
        return [f"greedy tokens part at {parted} (reference margin {greedy['margins'][parted]:.4f}): {texts} != {want}"]
    problems = []
    if texts != want:
        problems.append(f"greedy tokens {texts} != the reference's {want}")
    if finish != greedy["finish_reason"]:
        problems.append(f"finish_reason {finish!r} != {greedy['finish_reason']!r}")
    # chatd counts the end token it stopped on; the reference leaves it out.
    if usage["completion_tokens"] != len(want) + (finish == "stop"):
        problems.append(f"usage.completion_tokens {usage['completion_tokens']} for {len(want)} tokens")
    return problems


def refusal_problems(base, case):
    """How chatd's answer differs from a 400 with the template's own words, where the family's
    template refuses the case's messages."""
    status, r = post_json(base, "/v1/chat/completions", chat_body(case, 1))
    if status != 400 or case["refused"] not in r.get("error", {}).get("message", ""):
        return [f"{status} {r}, not a 400 saying {case['refused']!r}"]
    return []


def case_problems(base, layout, case, max_tokens):
    """How chatd's answer to one case differs from the reference's."""
    if "refused" in case:
        return refusal_problems(base, case)
    ids, usage, texts, finish = answer(base, case, max_tokens)
    problems = greedy_problems(texts, finish, usage, case["greedy"][layout])
    if ids != case["prompt_ids"]:
        problems.append(f"prompt ids {ids} != transformers' {case['prompt_ids']}")
    if usage["prompt_tokens"] != len(case["prompt_ids"]):
        problems.append(f"usage.prompt_tokens {usage['prompt_tokens']} != {len(case['prompt_ids'])}")
    return problems


def test_prompts_and_greedy_tokens_equal_the_references(fixture):
    expected, layout, base = fixture
    failures = [
        f"[{expected['family']}/{layout}/{name}] " + "; ".join(problems)
        for name, case in expected["cases"].items()
        if (problems := case_problems(base, layout, case, expected["max_tokens"]))
    ]
    assert not failures, "\n".join(failures)


# How each family's template asks for a call, as a forced call must then be written: Qwen's
# `<tool_call>` and Mistral's `[TOOL_CALLS]` before a list of calls (each one token of its
# vocabulary), Llama 3's bare object with "parameters", and for Phi-3.5 and Gemma, whose templates
# take no tools, chatd's own prompt and format.
CHATDS_OWN = ('{"name":"get_weather","arguments":', "}")
QWENS = ('<tool_call>\n{"name":"get_weather","arguments":', "}\n</tool_call>")
CALL_FORMATS = {
    "qwen2.5": QWENS,
    "qwen3": QWENS,
    "qwq": QWENS,
    "llama-3.2": ('{"name":"get_weather","parameters":', "}"),
    "phi-3.5": CHATDS_OWN,
    "mistral-nemo": ('[TOOL_CALLS][{"name":"get_weather","arguments":', "}]"),
    "gemma-2": CHATDS_OWN,
    "gemma-3": CHATDS_OWN,
}


def test_a_forced_call_is_written_in_the_familys_format(fixture):
    expected, _, base = fixture
    starts, ends = CALL_FORMATS[expected["family"]]
    # A bounded city: the whole call fits max_tokens whatever the model picks.
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}}]
    body = {"messages": [{"role": "user", "content": "Weather in Rome?"}], "tools": tools, "tool_choice": "required",
            "max_tokens": 60, "temperature": 0, "logprobs": True}
    status, r = post_json(base, "/v1/chat/completions", body)
    assert status == 200, r
    choice = r["choices"][0]
    assert choice["finish_reason"] == "tool_calls", r
    call = choice["message"]["tool_calls"][0]["function"]
    assert call["name"] == "get_weather", r
    assert list(json.loads(call["arguments"])) == ["city"], r
    tokens = [t["token"] for t in choice["logprobs"]["content"]]
    text = "".join(tokens)
    assert text.startswith(starts) and text.endswith(ends), text
    marker = next((m for m in ("<tool_call>", "[TOOL_CALLS]") if starts.startswith(m)), None)
    if marker:
        assert tokens[0] == marker, tokens



def chat(base, case, **fields):
    status, r = post_json(base, "/v1/chat/completions", {**chat_body(case, 16), **fields})
    assert status == 200, r
    return r["choices"][0]


def streamed_reasoning(base, case, **fields):
    """(reasoning, content) as OpenAI's own client streams them."""
    from openai import OpenAI

    client = OpenAI(base_url=base + "/v1", api_key="unused")
    reasoning, content = [], []
    stream = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=case["messages"], temperature=0, max_tokens=16, stream=True,
        extra_body={"chat_template_kwargs": case["chat_template_kwargs"], **fields},
    )
    for chunk in stream:
        for choice in chunk.choices:
            reasoning.append((choice.delta.model_extra or {}).get("reasoning_content") or "")
            content.append(choice.delta.content or "")
    return "".join(reasoning), "".join(content)


def test_an_answer_that_starts_inside_the_reasoning_is_all_reasoning(thinking):
    expected, layout, base = thinking
    case = expected["cases"]["thinking"]
    reference = case["greedy"][layout]
    # The random model does not close the block within the tokens recorded (else the split below
    # would be another).
    assert "</think>" not in reference["texts"], reference["texts"]
    split = chat(base, case)
    assert [t["token"] for t in split["logprobs"]["content"]] == reference["texts"]
    message = split["message"]
    assert message["content"] in ("", None), split
    assert message["reasoning_content"] and message["reasoning"] == message["reasoning_content"], split
    assert streamed_reasoning(base, case) == (message["reasoning_content"], ""), message
    whole = chat(base, case, separate_reasoning=False)["message"]
    assert whole.get("reasoning_content") is None, whole
    assert whole["content"].strip() == message["reasoning_content"].strip(), (whole, message)


def test_a_reasoning_budget_forces_the_end_of_thinking(thinking):
    expected, layout, base = thinking
    case = expected["cases"]["thinking"]
    budget = 4
    split = chat(base, case, reasoning_budget=budget)
    tokens = [t["token"] for t in split["logprobs"]["content"]]
    # The budget changes nothing before it runs out.
    assert tokens[:budget] == case["greedy"][layout]["texts"][:budget], tokens
    assert tokens[budget] == "</think>", tokens
    whole = chat(base, case, reasoning_budget=budget, separate_reasoning=False)["message"]["content"]
    before, after = whole.split("</think>", 1)
    message = split["message"]
    assert message["reasoning_content"].strip() == before.strip(), (message, whole)
    assert (message["content"] or "").strip() == after.strip(), (message, whole)
    assert streamed_reasoning(base, case, reasoning_budget=budget) == (
        message["reasoning_content"], message["content"] or ""), message
