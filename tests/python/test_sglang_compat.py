"""What SGLang's OpenAI server accepts and returns beyond OpenAI's API, as SGLang documents it,
against chatd. Each test names the SGLang behaviour it follows."""

import json

import openai
import pytest

from conftest import MODEL as MODEL_DIR

MODEL = "smollm2-135m-instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(chatd):
    return openai.OpenAI(base_url=chatd + "/v1", api_key="unused", max_retries=0)


def eos_ids():
    eos = json.loads((MODEL_DIR / "generation_config.json").read_text())["eos_token_id"]
    return set(eos if isinstance(eos, list) else [eos])


def test_matched_stop_is_the_end_token_id_or_the_stop_string(client):
    # SGLang choices[].matched_stop: the eos token id when the model ended, the stop string when
    # one matched, null at the length limit.
    whole = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=200)
    assert whole.choices[0].finish_reason == "stop"
    assert whole.choices[0].model_extra["matched_stop"] in eos_ids()
    text = whole.choices[0].message.content
    stop = " " + [w for w in text.split(" ") if len(w) >= 3][1]
    stopped = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=200, stop=stop)
    assert stopped.choices[0].model_extra["matched_stop"] == stop
    cut = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=2)
    assert cut.choices[0].model_extra["matched_stop"] is None


def test_matched_stop_comes_in_the_last_streamed_chunk(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=200,
                                                 stream=True))
    last = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    assert last.choices[0].model_extra["matched_stop"] in eos_ids()


def test_no_stop_trim_keeps_the_stop_string(client):
    # SGLang SamplingParams.no_stop_trim.
    text = client.completions.create(model=MODEL, prompt="One, two, three, four,", temperature=0,
                                     max_tokens=24).choices[0].text
    stop = text.strip()[:2]
    at = text.index(stop)
    kept = client.completions.create(model=MODEL, prompt="One, two, three, four,", temperature=0, max_tokens=24,
                                     stop=stop, extra_body={"no_stop_trim": True})
    assert kept.choices[0].text == text[:at] + stop
    assert kept.choices[0].model_extra["matched_stop"] == stop
