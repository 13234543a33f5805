#!/usr/bin/env python3
"""What a quantized KV cache (--kv-cache-dtype int8 / int4) costs in accuracy, against float32.

    scripts/bench-kv-dtype.sh [--model DIR] [--max-tokens 128] [--prompts 24]

chatd is started once per cache type on the same genai folder (prefix cache off, so every
prompt is computed afresh) and answers the same chat prompts greedily (temperature 0) with
`logprobs`. Against the float32 answers it reports, per type:

  - agree: prompts whose whole answer (up to --max-tokens tokens) is token for token the same;
  - common prefix: mean tokens before the first difference;
  - |dlogprob|: the mean and largest difference in the chosen token's log-probability over the
    common prefixes (the same context in both runs, so the difference is the cache's alone);
  - KV bytes per token, from genai_config.json's shape, and the time the answers took.
"""

import argparse
import json
import time
import urllib.request
from pathlib import Path

from benchlib import start_chatd

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a refrigerator works to a ten-year-old.",
    "List five tips for staying focused while studying.",
    "What is the difference between a list and a tuple in Python?",
    "Write a haiku about the sea at night.",
    "Summarise the causes of the French Revolution in a paragraph.",
    "How do I make a simple tomato sauce?",
    "Give me three ideas for a birthday party for a seven-year-old.",
    "Translate 'good morning, how are you?' into Spanish and German.",
    "Write a SQL query that returns the ten most recent orders.",
    "Why do cats purr?",
    "Describe the water cycle step by step.",
    "What should I pack for a weekend hiking trip?",
    "Write a polite email asking a colleague to review my report.",
    "Explain recursion with an example in JavaScript.",
    "What are the health benefits of regular walking?",
    "Compare electric cars and petrol cars in a few sentences.",
    "Write a limerick about a forgetful wizard.",
    "How does a bill become a law in the United States?",
    "Suggest a name for a bakery and explain why.",
    "What is photosynthesis?",
    "Give a step-by-step plan to learn to play the guitar.",
    "Write a bash command that counts the lines of every .rs file in a folder.",
    "Tell me an interesting fact about octopuses.",
]


def answer(base, prompt, max_tokens):
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "logprobs": True}
    request = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as r:
        content = json.load(r)["choices"][0]["logprobs"]["content"]
    return [(t["token"], t["logprob"]) for t in content]


def kv_bytes_per_token(model, dtype):
    decoder = json.loads((Path(model) / "genai_config.json").read_text())["model"]["decoder"]
    heads = decoder.get("num_key_value_heads", decoder["num_attention_heads"])
    head = decoder.get("head_size") or decoder["hidden_size"] // decoder["num_attention_heads"]
    per_value = {"float32": 4, "int8": 1, "int4": 0.5}[dtype]
    return int(decoder["num_hidden_layers"] * 2 * heads * head * per_value)


def run(chatd, model, dtype, prompts, max_tokens, log_dir, extra=()):
    daemon, base = start_chatd(chatd, model, ["--kv-cache-dtype", dtype, "--prefix-cache-mb", "0", *extra],
                               log_dir / f"chatd-kv-{dtype}.log")
    try:
        started = time.monotonic()
        answers = [answer(base, p, max_tokens) for p in prompts]
        return answers, time.monotonic() - started
    finally:
        daemon.terminate()
        daemon.wait()


def compare(reference, answers):
    agree, prefixes, deltas = 0, [], []
    for ref, got in zip(reference, answers):
        common = 0
        while common < min(len(ref), len(got)) and ref[common][0] == got[common][0]:
            deltas.append(abs(ref[common][1] - got[common][1]))
            common += 1
        agree += common == len(ref) == len(got)
        prefixes.append(common)
    return agree, sum(prefixes) / len(prefixes), sum(deltas) / max(len(deltas), 1), max(deltas, default=0.0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--chatd", default=str(ROOT / "target/release/chatd"))
    parser.add_argument("--model", default=str(ROOT.parent / "shared/models/smollm2-135m-instruct-genai"))
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--log-dir", default=str(ROOT / "target"))
    args = parser.parse_args()
    prompts = PROMPTS[: args.prompts]
    log_dir = Path(args.log_dir)
    results = {d: run(args.chatd, args.model, d, prompts, args.max_tokens, log_dir) for d in ("float32", "int8", "int4")}
    reference = results["float32"][0]
    print(f"{Path(args.model).name}: {len(prompts)} chat prompts, greedy, up to {args.max_tokens} tokens")
    print("| KV cache | bytes/token | agree | common prefix (tokens) | mean / max abs dlogprob | time (s) |")
    print("|---|---|---|---|---|---|")
    for dtype, (answers, seconds) in results.items():
        agree, prefix, mean, worst = compare(reference, answers)
        print(f"| {dtype} | {kv_bytes_per_token(args.model, dtype)} | {agree}/{len(prompts)} | {prefix:.1f} | "
              f"{mean:.4f} / {worst:.4f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
