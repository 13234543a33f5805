#!/usr/bin/env python3
"""How much of each answer a chat's next turn resends as the tokens chatd generated.

A chat client resends the conversation as text every turn, and chatd tokenizes it again. Where
the model generated a token sequence the tokenizer would not produce for that text (say
"-percent" as one token, where the text encodes as "-" "percent"), the resent prompt leaves
chatd's cache at that token, and the rest of the answer is computed again as prompt. Random-
weight models (scripts/perf-models.sh) do this far more often than trained ones, so this explains
the `prompt tokens computed over the chat` row of scripts/bench-peers.sh.

Plays chatbench's conversation (the same prompts as bench-peers' 1-client chat with --seed 102)
against a running chatd, non-streamed, greedy, `ignore_eos` (as bench-peers; `--no-ignore-eos`
for a trained model), with `logprobs` for the generated
pieces, and per turn compares them with chatd's `/tokenize` of the next turn's messages (with
pieces). Prints, per turn, the prompt and cached tokens chatd reported, how many of the
previous answer's tokens the resent conversation kept as generated, and the prefix cache's bytes
(`/health`) after the turn.

  python3 scripts/resent_turns.py --url http://127.0.0.1:8080 --model genai-int4
"""
import argparse
import json
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT.parent / "shared" / "tools"))
import chatbench  # noqa: E402  (../shared/tools: the conversation bench-peers plays)


def post(url, body):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as reply:
        return json.load(reply)


def prefix_cache_mib(args):
    with urllib.request.urlopen(f"{args.url}/health", timeout=60) as reply:
        return json.load(reply)["memory"]["prefix_cache_bytes"] / 2**20


def pieces(args, messages):
    """chatd's tokens of `messages` as the next chat request would send them, as text pieces."""
    reply = post(f"{args.url}/tokenize", {"model": args.model, "messages": messages, "with_pieces": True})
    return [t["piece"] for t in reply["tokens"]]


def kept_as_generated(resent, start, generated):
    """How many of `generated` the resent prompt holds unchanged from position `start` on."""
    n = 0
    while n < len(generated) and start + n < len(resent) and resent[start + n] == generated[n]:
        n += 1
    return n


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="chatd's base URL")
    p.add_argument("--model", required=True, help="the served model name")
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=200, help="turn 1's prompt, in words")
    p.add_argument("--turn-prompt-tokens", type=int, default=40, help="later turns' messages, in words")
    p.add_argument("--seed", type=int, default=102, help="chatbench's prompt seed (bench-peers' 1-client chat: 102)")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="answer max-tokens tokens every turn, as bench-peers does (--no-ignore-eos for a trained model)")
    args = p.parse_args()

    messages = [{"role": "user", "content": chatbench.build_prompt(args.prompt_tokens, args.seed, 0, False)}]
    previous = None  # (prompt pieces, generated pieces) of the turn before
    print("| turn | prompt tokens | cached | previous answer's tokens resent as generated | prefix cache MiB after |")
    print("|---|---|---|---|---|")
    totals = [0, 0]
    for turn in range(1, args.turns + 1):
        prompt = pieces(args, messages)
        kept = ""
        if previous is not None:
            n = kept_as_generated(prompt, len(previous[0]), previous[1])
            kept = f"{n} of {len(previous[1])}"
            totals[0] += n
            totals[1] += len(previous[1])
        reply = post(f"{args.url}/v1/chat/completions", {
            "model": args.model, "messages": messages, "max_tokens": args.max_tokens, "temperature": 0,
            "ignore_eos": args.ignore_eos, "logprobs": True, "seed": args.seed})
        choice = reply["choices"][0]
        usage = reply["usage"]
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        print(f"| {turn} | {usage['prompt_tokens']} | {cached} | {kept} | {prefix_cache_mib(args):.1f} |")
        previous = (prompt, [t["token"] for t in choice["logprobs"]["content"]])
        messages.append({"role": "assistant", "content": choice["message"]["content"]})
        messages.append({"role": "user",
                         "content": chatbench.build_prompt(args.turn_prompt_tokens, args.seed, 0, False, turn=turn + 1)})
    print(f"\nanswers resent as generated: {totals[0]} of {totals[1]} tokens")


if __name__ == "__main__":
    main()
