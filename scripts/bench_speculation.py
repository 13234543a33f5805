#!/usr/bin/env python3
"""What prompt-lookup speculation (--speculative-tokens) does to single-stream decode speed.

    scripts/bench-speculation.sh [--repeats 2] [--speculative-tokens 8] [--model DIR]

Starts chatd twice on the genai model (prefix cache off), plain and with --speculative-tokens N,
and streams each prompt to both, alternating, greedy with `ignore_eos` so both produce exactly
--max-tokens tokens. Prompts: chatbench's "expand these notes" prompts (what bench-peers.sh
sends; answers reuse the prompt's words) and free-form questions. Reports per prompt the median
decode tok/s of both, the ratio, and the share of draft tokens accepted (from /health).
"""

import argparse
import json
import statistics
import sys
import urllib.request
from pathlib import Path

from benchlib import start_chatd, stream

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT.parent / "shared/tools"))
import chatbench  # noqa: E402

FREE_FORM = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Tell me a short story about a robot who learns to paint.",
    "Write a Python function that checks whether a number is prime.",
    "List five fruits and one fact about each.",
]


def drafts(base):
    with urllib.request.urlopen(base + "/health", timeout=5) as r:
        s = json.load(r)["speculative"]
    return s["draft_tokens"], s["accepted_tokens"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT.parent / "shared/models/smollm2-135m-instruct-genai"))
    parser.add_argument("--chatd", default=str(ROOT / "target/release/chatd"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--speculative-tokens", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    prompts = [("notes %d" % i, chatbench.build_prompt(200, 101, i, False)) for i in range(4)]
    prompts += [(p[:40], p) for p in FREE_FORM]
    common = ["--prefix-cache-mb", "0"]
    plain, plain_base = start_chatd(args.chatd, args.model, common, ROOT / "target/bench-speculation-plain.log")
    spec, spec_base = start_chatd(args.chatd, args.model,
                                  common + ["--speculative-tokens", str(args.speculative_tokens)],
                                  ROOT / "target/bench-speculation-spec.log")
    try:
        print(f"| prompt | plain tok/s | --speculative-tokens {args.speculative_tokens} tok/s | ratio "
              "| drafts accepted |")
        print("|---|---|---|---|---|")
        ratios = {"notes": [], "free-form": []}
        for name, prompt in prompts:
            body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
                    "temperature": 0, "ignore_eos": True}
            stream(plain_base, dict(body, max_tokens=4))
            stream(spec_base, dict(body, max_tokens=4))
            a, b = [], []
            before = drafts(spec_base)
            for _ in range(args.repeats):
                a.append(stream(plain_base, body)[1])
                b.append(stream(spec_base, body)[1])
            after = drafts(spec_base)
            drafted, accepted = after[0] - before[0], after[1] - before[1]
            pa, pb = statistics.median(a), statistics.median(b)
            ratios["notes" if name.startswith("notes") else "free-form"].append(pb / pa)
            share = f"{accepted}/{drafted}" if drafted else "no drafts"
            print(f"| {name} | {pa:.1f} | {pb:.1f} | {pb / pa:.2f}x | {share} |", flush=True)
        for kind, r in ratios.items():
            print(f"\n{kind} prompts: median ratio {statistics.median(r):.2f}x (min {min(r):.2f}x, max {max(r):.2f}x)")
    finally:
        for d in (plain, spec):
            d.terminate()
            d.wait(timeout=30)


if __name__ == "__main__":
    main()
