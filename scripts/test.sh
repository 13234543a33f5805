#!/usr/bin/env bash
# Sets up everything the tests need and runs the whole suite: Rust unit and integration tests
# (the real chatd binary on the real model over HTTP; libchat from C and C++ programs built with
# the system compilers) and the Python tests (the official openai package, chatbench --check,
# the libchat binding installed with pip). Slow scenarios: scripts/test-slow.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
[ -d ../shared/models/smollm2-135m-instruct ] || { echo "test.sh: ../shared/models is needed beside the checkout" >&2; exit 1; }
scripts/setup-onnxruntime.sh
scripts/python-env.sh
# Tiny models of other families with their reference answers (tests/python/test_fixtures.py);
# built once into a cache outside the repo, reused while their recipe is unchanged.
CHATD_FIXTURES="$(scripts/make-fixtures.sh)"
export CHATD_FIXTURES
cargo build --release --locked
cargo test --release --locked
# Installed as a user would (pip install ./bindings/python), fresh each run.
.venv/bin/python -m pip install --quiet --force-reinstall --no-deps ./bindings/python
.venv/bin/python -m pytest -q tests/python
