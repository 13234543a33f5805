#!/usr/bin/env bash
# Sets up and starts chatd on 127.0.0.1:8080: ONNX Runtime from PyPI, a release build, and a
# model folder: --model DIR or $CHATD_MODEL if given, else ../shared/models/smollm2-135m-instruct.
# Other arguments go to chatd (see `target/release/chatd --help`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
args=("$@")
has_model=no
for a in "${args[@]}"; do
  case "$a" in --model|--model=*) has_model=yes ;; esac
done
if [ "$has_model" = no ] && [ -z "${CHATD_MODEL:-}" ]; then
  default="$root/../shared/models/smollm2-135m-instruct"
  if [ ! -d "$default" ]; then
    cat >&2 <<MSG
serve.sh: no model folder. Pass --model DIR or set CHATD_MODEL to a folder with model.onnx,
config.json, tokenizer.json and tokenizer_config.json (Hugging Face Optimum ONNX layout), e.g.:
  pip install huggingface_hub
  huggingface-cli download HuggingFaceTB/SmolLM2-135M-Instruct --include 'onnx/model.onnx' '*.json' --local-dir smollm2
  scripts/serve.sh --model smollm2
MSG
    exit 1
  fi
  args=(--model "$default" "${args[@]}")
fi
scripts/setup-onnxruntime.sh
cargo build --release --locked
exec target/release/chatd "${args[@]}"
