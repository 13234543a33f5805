#!/usr/bin/env bash
# Decode speed and time to first token with a JSON-schema constraint against the same request
# unconstrained, in one run; see scripts/bench_constraints.py. Run it on a quiet machine.
exec "$(dirname "${BASH_SOURCE[0]}")/bench-python.sh" bench_constraints "$@"
