#!/usr/bin/env bash
# How much a long prompt slows a running stream (inter-token latency alone and while the prompt
# is fed); see scripts/bench_fairness.py. Run it on a quiet machine.
exec "$(dirname "${BASH_SOURCE[0]}")/bench-python.sh" bench_fairness "$@"
