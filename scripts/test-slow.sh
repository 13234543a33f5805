#!/usr/bin/env bash
# The slow scenarios, run by CI after scripts/test.sh (which sets up what they need):
#  - the C threads example under valgrind memcheck (~4 minutes): no invalid reads or writes, no
#    definite leaks, across libchat, ONNX Runtime and the C program;
#  - the request parser and chat template property test at 1,000,000 inputs (~3 minutes; the
#    fast suite runs 20,000).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v valgrind >/dev/null || { echo "test-slow.sh: valgrind is needed (Debian package valgrind)" >&2; exit 1; }
cargo test --release --locked --test c_abi -- --ignored --nocapture
CHATD_FUZZ_ITERATIONS=1000000 cargo test --release --locked --test fuzz_parser -- --nocapture
