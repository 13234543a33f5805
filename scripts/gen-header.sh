#!/usr/bin/env bash
# Regenerates include/libchat.h from src/ffi with cbindgen (settings in cbindgen.toml).
# The test that runs here is the same one that fails in CI when the committed header is stale.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CHAT_BLESS_HEADER=1 cargo test --release --locked --test c_header
echo "wrote include/libchat.h"
