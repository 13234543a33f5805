#!/usr/bin/env python3
"""How much a long prompt slows a running stream: inter-token latency alone and while a
~600-token prompt is fed beside it (the pacing of --stream-slowdown, whose default aims at 2x).

    scripts/bench-fairness.sh [--repeats 3] [--stream-slowdown 2.0] [--model DIR]

Starts chatd on the genai model (prefix cache off), opens a long greedy stream, measures the
median gap between its tokens alone, then sends the long prompt (max_tokens 1) and measures
the mean gap while it is read. Reports both and their ratio for each repeat. A speed figure,
so not a test: tests/fairness.rs checks, on the engine's counters, that the prompt is fed
between the stream's steps at all. Run it on a quiet machine.
"""

import argparse
import json
import statistics
import threading
import time
import urllib.request
from pathlib import Path

from benchlib import start_chatd

ROOT = Path(__file__).resolve().parents[1]
FILLER = "The harbour master counted the boats that came in with the evening tide, one by one. "


def gaps(times):
    return [b - a for a, b in zip(times, times[1:])]


def one_run(base):
    body = {"messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
            "max_tokens": 4000, "ignore_eos": True, "temperature": 0, "stream": True}
    request = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    arrivals, marks, done = [], {}, threading.Event()

    def long_prompt():
        prompt = {"messages": [{"role": "user", "content": FILLER * 34}], "max_tokens": 1}
        marks["sent"] = len(arrivals)
        urllib.request.urlopen(urllib.request.Request(base + "/v1/chat/completions", json.dumps(prompt).encode(),
                                                      {"Content-Type": "application/json"}), timeout=300).read()
        marks["answered"] = len(arrivals)
        done.set()

    with urllib.request.urlopen(request, timeout=300) as r:
        for line in r:
            if not line.startswith(b"data: ") or b'"content"' not in line:
                continue
            arrivals.append(time.perf_counter())
            if len(arrivals) == 60:
                threading.Thread(target=long_prompt, daemon=True).start()
            if done.is_set() and len(arrivals) > marks["answered"] + 5:
                break
    alone = statistics.median(gaps(arrivals[10:60]))
    mixed = statistics.mean(gaps(arrivals[marks["sent"]:marks["answered"] + 1]))
    return alone, mixed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT.parent / "shared/models/smollm2-135m-instruct-genai"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stream-slowdown", default="2.0")
    args = parser.parse_args()
    daemon, base = start_chatd(str(ROOT / "target/release/chatd"), args.model,
                               ["--prefix-cache-mb", "0", "--stream-slowdown", args.stream_slowdown],
                               "/tmp/chatd-bench-fairness.log")
    try:
        print(f"{'run':>4} {'alone ms':>9} {'with prompt ms':>15} {'ratio':>6}")
        ratios = []
        for i in range(args.repeats):
            alone, mixed = one_run(base)
            ratios.append(mixed / alone)
            print(f"{i + 1:>4} {alone * 1e3:>9.1f} {mixed * 1e3:>15.1f} {mixed / alone:>6.2f}")
        print(f"median ratio {statistics.median(ratios):.2f} (--stream-slowdown {args.stream_slowdown})")
    finally:
        daemon.terminate()
        daemon.wait()


if __name__ == "__main__":
    main()
