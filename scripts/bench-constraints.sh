#!/usr/bin/env bash
# Decode speed and time to first token with a JSON-schema constraint against the same request
# unconstrained, in one run; see scripts/bench_constraints.py. Run it on a quiet machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup-onnxruntime.sh
scripts/python-env.sh
cargo build --release --locked
exec .venv/bin/python scripts/bench_constraints.py "$@"
