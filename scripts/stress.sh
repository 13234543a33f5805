#!/usr/bin/env bash
# Stress test of a fresh chatd: 64 concurrent clients (streaming, non-streaming, disconnecting,
# slow), with checks on answers, RSS, /metrics and shutdown; see scripts/stress.py.
# Usage: scripts/stress.sh [--requests N] [--rss-slack-mb MB] [--chatd-arg=--FLAG=VALUE ...] [--model DIR]
# CI runs it (scripts/test-slow.sh: 256 requests, tight memory caps) after scripts/test.sh (which sets up .venv and
# ONNX Runtime); the daemon's stderr is kept in target/stress/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ ! -x target/release/chatd ]]; then
    echo "stress.sh: no target/release/chatd; build it first: cargo build --release --locked" >&2
    exit 1
fi
exec .venv/bin/python scripts/stress.py --model ../shared/models/smollm2-135m-instruct-genai "$@"
