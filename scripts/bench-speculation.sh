#!/usr/bin/env bash
# Single-stream decode with and without prompt-lookup speculation (--speculative-tokens), in one
# run; see scripts/bench_speculation.py. Run it on a quiet machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup-onnxruntime.sh
scripts/python-env.sh
cargo build --release --locked
exec .venv/bin/python scripts/bench_speculation.py "$@"
