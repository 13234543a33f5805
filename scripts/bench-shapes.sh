#!/usr/bin/env bash
# Engine-to-engine speed on realistic shapes (Qwen2.5-0.5B, Llama-3.2-1B; random weights): chatd
# and onnxruntime-genai on the same genai int4 folder, llama.cpp's llama-bench on Q4_0 of the same
# weights, 2 threads each; see scripts/bench_shapes.py. Models come from scripts/perf-models.sh
# (built on the first run, in a cache outside the repo). Run it on a quiet machine.
#
# Usage: scripts/bench-shapes.sh [--shapes qwen2.5-0.5b,llama-3.2-1b] [--repeats N]
#                                [--prompt-tokens N] [--new-tokens N] [--long-prompt-tokens N] [--no-llama]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
CACHE="${CHATD_PERF_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chatd-perf}"
command="scripts/bench-shapes.sh $*"
shapes="qwen2.5-0.5b,llama-3.2-1b"
llama=yes
pass=()
while [ $# -gt 0 ]; do
  case "$1" in
    --shapes) shapes="$2"; pass+=(--shapes "$2"); shift 2 ;;
    --no-llama) llama=no; shift ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) pass+=("$1"); shift ;;
  esac
done
scripts/setup-onnxruntime.sh
cargo build --release --locked
if [ "$llama" = yes ]; then
  scripts/perf-models.sh --shapes "$shapes" >&2
  pass+=(--llama-bench "$(dirname "$(scripts/build-llama-server.sh)")/llama-bench")
else
  scripts/perf-models.sh --shapes "$shapes" --no-gguf >&2
fi
exec "$(scripts/exporters-env.sh)" scripts/bench_shapes.py --models "$CACHE/models" --command "$command" \
  "${pass[@]}"
