#!/usr/bin/env bash
# Peak and after-idle resident size of chatd and llama-server on one fixed workload (the 8-client
# chatbench mix, a 10-turn chat, 200 short requests with n 1-4), default settings; see
# scripts/bench_memory.py. Builds llama-server once (scripts/build-llama-server.sh) unless
# --skip-llama. Run it on a quiet machine. With --soak-minutes M (and --skip-llama), issue 13's
# scenario instead: two clients of short, n > 1 and long requests for M minutes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
llama=()
pass=()
for a in "$@"; do
  case "$a" in
    --skip-llama) llama=(skip) ;;
    *) pass+=("$a") ;;
  esac
done
scripts/setup-onnxruntime.sh
scripts/python-env.sh
cargo build --release --locked
if [ ${#llama[@]} -eq 0 ]; then
  llama=(--llama-server "$(scripts/build-llama-server.sh)" --gguf "$(scripts/build-llama-server.sh --gguf)")
else
  llama=()
fi
exec .venv/bin/python scripts/bench_memory.py --python "$root/.venv/bin/python" "${llama[@]}" "${pass[@]}"
