#!/usr/bin/env python3
"""Cost of constrained decoding, measured in one run against the same request unconstrained.

    scripts/bench-constraints.sh [--repeats 5] [--model DIR]

Starts chatd (genai layout by default, prefix cache off so every prompt is computed), then,
alternating, streams the same prompt:
  - constrained by a JSON schema of 10 properties (a fresh variant of it each time, so the
    compilation is inside the measured time to first token), and
  - unconstrained with `ignore_eos`, for exactly as many tokens as the constrained answer had.
Decode tok/s comes from the token arrival times after the first token; TTFT is from sending the
request to the first token. Reports medians and the ratios (targets: decode >= 0.85x, TTFT delay
<= 50 ms).
"""

import argparse
import statistics
import sys
from pathlib import Path

from benchlib import start_chatd, stream

ROOT = Path(__file__).resolve().parents[1]


def schema(variant):
    """Ten properties; `variant` changes a bound so that each run compiles afresh."""
    return {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120 + variant},
            "city": {"type": "string", "maxLength": 24},
            "country": {"type": "string", "maxLength": 24},
            "job": {"enum": ["teacher", "engineer", "artist", "farmer", "doctor"]},
            "married": {"type": "boolean"},
            "height_cm": {"type": "number", "minimum": 50, "maximum": 250},
            "pets": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
            "email": {"type": "string", "maxLength": 40},
            "motto": {"type": "string", "maxLength": 60},
        },
        "required": ["name", "age", "city", "country", "job", "married", "height_cm", "pets", "email", "motto"],
        "additionalProperties": False,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT.parent / "shared/models/smollm2-135m-instruct-genai"))
    parser.add_argument("--chatd", default=str(ROOT / "target/release/chatd"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    daemon, base = start_chatd(args.chatd, args.model, ["--prefix-cache-mb", "0"],
                               ROOT / "target/bench-constraints.log")
    try:
        prompt = [{"role": "user", "content": "Invent a person and describe them."}]
        rows = {"constrained": [], "unconstrained": []}
        # One warm-up of each, unmeasured.
        stream(base, {"messages": prompt, "max_tokens": 8, "temperature": 0})
        for i in range(args.repeats):
            fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema(1000 + i)}}
            c = stream(base, {"messages": prompt, "max_tokens": 200, "temperature": 0, "response_format": fmt})
            u = stream(base, {"messages": prompt, "max_tokens": c[2], "temperature": 0, "ignore_eos": True})
            rows["constrained"].append(c)
            rows["unconstrained"].append(u)
            print(f"run {i + 1}: constrained ttft {c[0] * 1e3:.1f} ms, {c[1]:.1f} tok/s ({c[2]} tokens); "
                  f"unconstrained ttft {u[0] * 1e3:.1f} ms, {u[1]:.1f} tok/s", file=sys.stderr)
        med = {k: [statistics.median(x[j] for x in v) for j in range(3)] for k, v in rows.items()}
        c, u = med["constrained"], med["unconstrained"]
        print("| metric | constrained (10-property JSON schema) | unconstrained | ratio / delta |")
        print("|---|---|---|---|")
        print(f"| decode tok/s | {c[1]:.1f} | {u[1]:.1f} | {c[1] / u[1]:.2f}x |")
        print(f"| time to first token | {c[0] * 1e3:.1f} ms | {u[0] * 1e3:.1f} ms | {(c[0] - u[0]) * 1e3:+.1f} ms |")
        print(f"| completion tokens | {c[2]:.0f} | {u[2]:.0f} | |")
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)


if __name__ == "__main__":
    main()
