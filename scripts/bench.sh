#!/usr/bin/env bash
# Single-stream benchmark of chatd against a plain onnxruntime Python loop; see scripts/bench.py.
# Usage: scripts/bench.sh [--new-tokens N] [--repeats R] [--model DIR] [--chatd BIN] [--json]
# Run it on a quiet machine: both runners are measured back to back, alternating.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup-onnxruntime.sh
scripts/python-env.sh
cargo build --release --locked
exec .venv/bin/python scripts/bench.py "$@"
