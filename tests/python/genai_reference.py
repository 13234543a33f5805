"""Greedy reference outputs from onnxruntime-genai 0.18.0 for models in the genai layout.

`greedy(model_dir, messages, max_new_tokens)` renders the model's chat template, encodes it with the
onnxruntime-genai tokenizer, decodes greedily until eos or the token limit, and returns
{"text", "token_ids", "margins", "prompt_tokens"}: `token_ids` are the new tokens only, without the prompt and
without the eos token; `margins` how far each step's choice led the runner-up's logit, the step that chose eos
included. Run as a script it prints
the results for a few prompts as JSON:

    .venv/bin/python tests/python/genai_reference.py [MODEL_DIR]
"""

import functools
import json
import pathlib
import sys
import time

import numpy as np
import onnxruntime_genai as og

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_MODEL = ROOT.parent / "shared" / "models" / "smollm2-135m-instruct-genai"
THREADS = 2

# SmolLM2's tokenizer_config.json chat_template, written out; used to check what onnxruntime-genai renders.
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def render_chatml(messages, add_generation_prompt=True):
    """SmolLM2's ChatML template: a default system turn when the first message is not a system message."""
    out = []
    for i, m in enumerate(messages):
        if i == 0 and messages[0]["role"] != "system":
            out.append(f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n")
        out.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


@functools.lru_cache(maxsize=None)
def load(model_dir):
    """(model, tokenizer, eos ids) for a genai-layout folder, on the CPU with THREADS intra-op threads."""
    config = og.Config(str(model_dir))
    config.clear_providers()  # CPU
    config.overlay(
        json.dumps(
            {
                "model": {
                    "decoder": {
                        "session_options": {"intra_op_num_threads": THREADS, "inter_op_num_threads": 1}
                    }
                }
            }
        )
    )
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    eos = {int(t) for t in tokenizer.eos_token_ids}
    return model, tokenizer, frozenset(eos)


def prompt_text(model_dir, messages):
    """The rendered prompt, from onnxruntime-genai's apply_chat_template (checked against the ChatML rendering
    for SmolLM-style models, so a template engine difference shows up as an error rather than as a bad reference)."""
    _, tokenizer, _ = load(str(model_dir))
    text = tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
    if "<|im_start|>" in text:
        expected = render_chatml(messages)
        if text != expected:
            raise AssertionError(f"apply_chat_template rendered {text!r}, the template says {expected!r}")
    return text


def greedy(model_dir, messages, max_new_tokens):
    model, tokenizer, eos = load(str(model_dir))
    prompt = tokenizer.encode(prompt_text(model_dir, messages))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + max_new_tokens)
    generator = og.Generator(model, params)
    t0 = time.perf_counter()
    generator.append_tokens(prompt)
    t_prefill = None
    new = []
    finish = "length"
    margins = []
    while not generator.is_done():
        logits = np.array(generator.get_logits())[0, -1]
        generator.generate_next_token()
        if t_prefill is None:
            t_prefill = time.perf_counter() - t0
        token = int(generator.get_next_tokens()[0])
        runner_up, best = np.partition(logits, -2)[-2:]
        margins.append(float(best - runner_up))
        if token in eos:
            finish = "stop"
            break
        new.append(token)
        if len(new) >= max_new_tokens:
            break
    elapsed = time.perf_counter() - t0
    return {
        "text": tokenizer.decode(new) if new else "",
        "token_ids": new,
        "margins": margins,
        "prompt_tokens": int(len(prompt)),
        "finish_reason": finish,
        "seconds": round(elapsed, 3),
        "prefill_seconds": round(t_prefill or 0.0, 3),
    }


# Prompts shared with test_genai_parity.py.
PROMPTS = {
    "question": [{"role": "user", "content": "What is the capital of France?"}],
    "instruction": [{"role": "user", "content": "Write one sentence about the sea."}],
    "long": [
        {
            "role": "user",
            "content": (
                "I am planning a small vegetable garden behind my house. The soil is mostly clay, the spot gets "
                "about six hours of direct sun in the summer, and it rains a lot in the spring but very little in "
                "August. I would like to grow tomatoes, beans, lettuce and some herbs such as basil and parsley. "
                "I have never gardened before and I can spend about two hours a week on it. Which vegetables "
                "should I start with, how should I prepare the soil, and how often should I water the plants?"
            ),
        }
    ],
    "multi_turn": [
        {"role": "system", "content": "You are a concise assistant that answers in one or two sentences."},
        {"role": "user", "content": "What is the largest planet in the solar system?"},
        {"role": "assistant", "content": "Jupiter is the largest planet in the solar system."},
        {"role": "user", "content": "How many moons does it have?"},
    ],
    "non_ascii": [
        {"role": "user", "content": "Traduis en anglais : « Où est la bibliothèque ? » Réponds en une phrase. 日本語も少し。"}
    ],
}


def main():
    model_dir = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_MODEL
    t0 = time.perf_counter()
    load(str(model_dir))
    results = {"onnxruntime_genai": og.__version__, "load_seconds": round(time.perf_counter() - t0, 3)}
    for name, messages in PROMPTS.items():
        results[name] = greedy(model_dir, messages, 48)
    print(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
