#!/usr/bin/env bash
# Installs ONNX Runtime's shared library for chatd from the PyPI `onnxruntime` wheel (CPU build).
# Result: .runtime/lib/libonnxruntime.so.<version> (+ libonnxruntime.so link), which chatd finds by itself.
# Edge boxes that bring their own build (CUDA, TensorRT, a distro package) skip this and pass
# --onnxruntime PATH or ORT_DYLIB_PATH instead.
set -euo pipefail
version="${ORT_VERSION:-1.32.0}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
lib_dir="$root/.runtime/lib"
lib="$lib_dir/libonnxruntime.so.$version"
if [ -f "$lib" ]; then
  echo "onnxruntime $version: $lib" >&2
  exit 0
fi
py="$(command -v python3 || true)"
[ -n "$py" ] || { echo "setup-onnxruntime: python3 with pip is needed to download the onnxruntime wheel" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "downloading onnxruntime==$version from PyPI ..." >&2
"$py" -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "onnxruntime==$version" >&2
wheel="$(ls "$tmp"/onnxruntime-*.whl | head -n 1)"
mkdir -p "$lib_dir"
"$py" - "$wheel" "$lib_dir" "$version" <<'PY'
import sys, zipfile, os
wheel, out, version = sys.argv[1:]
name = f"onnxruntime/capi/libonnxruntime.so.{version}"
with zipfile.ZipFile(wheel) as z:
    data = z.read(name)
tmp = os.path.join(out, f".libonnxruntime.so.{version}.part")
with open(tmp, "wb") as f:
    f.write(data)
os.replace(tmp, os.path.join(out, f"libonnxruntime.so.{version}"))
PY
ln -sf "libonnxruntime.so.$version" "$lib_dir/libonnxruntime.so"
echo "onnxruntime $version: $lib" >&2
