#!/usr/bin/env bash
# Single-stream benchmark of chatd against a plain onnxruntime Python loop; see scripts/bench.py.
# Usage: scripts/bench.sh [--new-tokens N] [--repeats R] [--model DIR] [--chatd BIN] [--json]
# Run it on a quiet machine: both runners are measured back to back, alternating.
exec "$(dirname "${BASH_SOURCE[0]}")/bench-python.sh" bench "$@"
