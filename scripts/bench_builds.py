#!/usr/bin/env python3
"""Two chatd builds on one model folder, run after run: whether a change made decode faster.

    python3 scripts/bench_builds.py OLD_BINARY NEW_BINARY --folder DIR [--repeats N]

Both servers start at once (each idle while the other runs) and take turns, one request each per
repeat, after one uncounted warm-up: bench_shapes.Chatd's request (a fresh ~PROMPT-token prompt,
greedy, `ignore_eos`, answered whole). Prints each run's decode tokens/s, the medians, their
ratio, and in how many repeats the new build was the faster: on a noisy box the pairs say more
than the medians. DIR: a model folder, e.g. one of scripts/perf-models.sh's genai-int4 folders.
"""
import argparse
import statistics
import tempfile
from pathlib import Path

import bench_shapes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--folder", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=300)
    args = ap.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="bench-builds-"))
    builds = {"old": args.old, "new": args.new}
    servers = {name: bench_shapes.Chatd(binary, args.folder, logs / f"{name}.log") for name, binary in builds.items()}
    try:
        decode = {name: [] for name in builds}
        for repeat in range(args.repeats + 1):
            for name, server in servers.items():
                tps = server.run(f"{name}{repeat}", args.prompt_tokens, args.new_tokens)["decode_tps"]
                if repeat:
                    decode[name].append(tps)
        for name in builds:
            runs = " ".join(f"{t:.1f}" for t in decode[name])
            print(f"{name} ({builds[name]}): {runs}; median {statistics.median(decode[name]):.1f} tokens/s")
        wins = sum(n > o for o, n in zip(decode["old"], decode["new"]))
        ratio = statistics.median(decode["new"]) / statistics.median(decode["old"])
        print(f"new / old: {ratio:.3f}x; new faster in {wins} of {args.repeats} repeats ({args.folder})")
    finally:
        for server in servers.values():
            server.close()


if __name__ == "__main__":
    main()
