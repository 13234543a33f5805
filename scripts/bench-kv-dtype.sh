#!/usr/bin/env bash
# Greedy agreement and log-probability difference of --kv-cache-dtype int8 and int4 against
# float32 on the same genai folder; see scripts/bench_kv_dtype.py. Run it on a quiet machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup-onnxruntime.sh
scripts/python-env.sh
cargo build --release --locked
exec .venv/bin/python scripts/bench_kv_dtype.py "$@"
