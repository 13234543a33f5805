#!/usr/bin/env bash
# Runs one of the Python benchmarks (scripts/NAME.py) as the bench-*.sh commands do: sets up ONNX
# Runtime and the Python environment, builds the release binaries, then starts it from the
# repository root with the remaining arguments. Usage: scripts/bench-python.sh NAME [ARGS...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
name="$1"
shift
scripts/setup-onnxruntime.sh
scripts/python-env.sh
cargo build --release --locked
exec .venv/bin/python "scripts/$name.py" "$@"
