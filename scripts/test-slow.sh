#!/usr/bin/env bash
# The slow scenarios, run by CI after scripts/test.sh (which sets up what they need):
#  - the C threads example under valgrind memcheck (~4 minutes): no invalid reads or writes, no
#    definite leaks, across libchat, ONNX Runtime and the C program;
#  - the request parser and chat template property test at 1,000,000 inputs (~3 minutes; the
#    fast suite runs 20,000);
#  - the stress command: 64 clients (streaming, non-streaming, disconnecting, slow readers) for
#    256 requests against a fresh daemon with tight memory caps (~30-60 s).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v valgrind >/dev/null || { echo "test-slow.sh: valgrind is needed (Debian package valgrind)" >&2; exit 1; }
cargo test --release --locked --test c_abi -- --ignored --nocapture
CHATD_FUZZ_ITERATIONS=1000000 cargo test --release --locked --test fuzz_parser -- --nocapture
scripts/stress.sh --requests 256 --rss-slack-mb 128 --chatd-arg=--kv-cache-mb=256 --chatd-arg=--prefix-cache-mb=64
