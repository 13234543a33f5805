#!/usr/bin/env bash
# Single-stream decode with and without prompt-lookup speculation (--speculative-tokens), in one
# run; see scripts/bench_speculation.py. Run it on a quiet machine.
exec "$(dirname "${BASH_SOURCE[0]}")/bench-python.sh" bench_speculation "$@"
