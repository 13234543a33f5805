#!/usr/bin/env bash
# Installs what `cargo build --release` built, in the usual places under a prefix:
#   PREFIX/bin/chatd                                  the daemon
#   PREFIX/lib/libchat.so.X.Y.Z (+ .so.X, .so links), PREFIX/lib/libchat.a
#   PREFIX/lib/chatd/libonnxruntime.so*              ONNX Runtime (from scripts/setup-onnxruntime.sh),
#                                                     found there by chatd and libchat by themselves
#   PREFIX/include/libchat.h, PREFIX/include/libchat.hpp (C++ wrapper)
#   PREFIX/lib/pkgconfig/libchat.pc
#   PREFIX/lib/systemd/system/chatd.{service,socket}
#   PREFIX/share/chatd/chatd.toml                     the example configuration
#   PREFIX/share/chatd/gpu.conf                       the CUDA/TensorRT drop-in, not enabled: copy it to
#                                                     /etc/systemd/system/chatd.service.d/ to grant GPU access
#
# Usage: scripts/install.sh [--prefix PREFIX]   (default /usr/local; DESTDIR is honoured for packaging)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix=/usr/local
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="$2"; shift 2 ;;
    --prefix=*) prefix="${1#--prefix=}"; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$prefix" in /*) ;; *) prefix="$(pwd)/$prefix" ;; esac
dest="${DESTDIR:-}$prefix"
release="$root/target/release"
for f in chatd libchat.so libchat.a; do
  [ -f "$release/$f" ] || { echo "install.sh: $release/$f is missing; run cargo build --release --locked first" >&2; exit 1; }
done
runtime="$(ls "$root"/.runtime/lib/libonnxruntime.so.* 2>/dev/null | head -n 1 || true)"
[ -n "$runtime" ] || { echo "install.sh: no ONNX Runtime in .runtime/lib; run scripts/setup-onnxruntime.sh first" >&2; exit 1; }

version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n 1)"
major="${version%%.*}"
install -d "$dest/bin" "$dest/lib/pkgconfig" "$dest/lib/chatd" "$dest/include"
install -m 755 "$release/chatd" "$dest/bin/chatd"
install -m 755 "$release/libchat.so" "$dest/lib/libchat.so.$version"
ln -sf "libchat.so.$version" "$dest/lib/libchat.so.$major"
ln -sf "libchat.so.$major" "$dest/lib/libchat.so"
install -m 644 "$release/libchat.a" "$dest/lib/libchat.a"
install -m 644 "$runtime" "$dest/lib/chatd/$(basename "$runtime")"
ln -sf "$(basename "$runtime")" "$dest/lib/chatd/libonnxruntime.so"
install -m 644 "$root/include/libchat.h" "$dest/include/libchat.h"
install -m 644 "$root/bindings/cpp/libchat.hpp" "$dest/include/libchat.hpp"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" "$root/libchat.pc.in" > "$dest/lib/pkgconfig/libchat.pc"
for unit in "$root"/systemd/*.service "$root"/systemd/*.socket; do
  [ -f "$unit" ] || continue
  install -d "$dest/lib/systemd/system"
  sed "s|/usr/local|$prefix|g" "$unit" > "$dest/lib/systemd/system/$(basename "$unit")"
done
install -d "$dest/share/chatd"
install -m 644 "$root/systemd/chatd.toml" "$dest/share/chatd/chatd.toml"
install -m 644 "$root/systemd/chatd.service.d/gpu.conf" "$dest/share/chatd/gpu.conf"
echo "installed chatd $version and libchat under $dest" >&2
