#!/usr/bin/env bash
# The Python environment of the model exporters (torch, transformers, onnxruntime-genai's model
# builder, llama.cpp's gguf package, mistral-common for Mistral's tekken tokenizer), from PyPI only, in a cache folder OUTSIDE the repo; prints
# its python. Used by scripts/perf-models.sh (benchmark models) and scripts/make-fixtures.sh (test
# fixtures). The first run downloads several GB (PyPI's torch wheel brings CUDA libraries it does
# not use here); later runs reuse it.
#
# Optimum's ONNX exporter (optimum-onnx 0.1.0) needs transformers < 4.58, the onnxruntime-genai
# builder 5.x: Optimum and its transformers go to an overlay folder, ENV/optimum, that goes first
# on PYTHONPATH when Optimum runs (torch and the rest come from the environment).
#
# Environment: CHATD_EXPORTERS_ENV (default ${XDG_CACHE_HOME:-$HOME/.cache}/chatd-exporters).
set -euo pipefail
venv="${CHATD_EXPORTERS_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/chatd-exporters}"
# The versions the benchmarks and fixtures were made with; onnxruntime matches
# scripts/setup-onnxruntime.sh.
packages=(torch==2.15.0 transformers==5.24.0 onnx==1.23.2 onnx-ir==1.1.0 onnxruntime==1.32.0
          onnxruntime-genai==0.18.0 gguf==0.19.0 sentencepiece==0.2.3 mistral-common==1.13.1)
optimum=(optimum==2.1.0 optimum-onnx==0.1.0 transformers==4.57.6 tokenizers==0.22.2 huggingface-hub==0.36.2)
stamp="$venv/.installed"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${packages[*]} ${optimum[*]}" ]; then
  echo "[exporters-env] installing ${packages[*]} into $venv, ${optimum[*]} into $venv/optimum" >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${packages[@]}" >&2
  rm -rf "$venv/optimum"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --target "$venv/optimum" \
    "${optimum[@]}" >&2
  echo "${packages[*]} ${optimum[*]}" >"$stamp"
fi
echo "$venv/bin/python"
