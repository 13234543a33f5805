#!/usr/bin/env bash
# Runs the whole suite (scripts/test.sh) while other processes keep every core busy, as on a
# machine that is doing other work: the tests wait on chatd's own counters, never on the clock,
# so they must pass here too. Not run by CI (it doubles the suite's time); run it before
# changing a test that waits for something.
#
#   scripts/test-under-load.sh [--hogs N]     N busy processes (default: one per core)
#
# The hogs are `stress-ng --cpu N` when Debian's stress-ng is installed, else shell busy loops,
# at the same priority as the tests (nice 0).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
hogs="$(nproc)"
if [ "${1:-}" = "--hogs" ]; then
  hogs="$2"
fi
pids=()
stop_hogs() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
}
trap stop_hogs EXIT
if command -v stress-ng >/dev/null; then
  stress-ng --cpu "$hogs" --quiet &
  pids+=($!)
else
  for _ in $(seq "$hogs"); do
    nice -n 0 bash -c 'while :; do :; done' &
    pids+=($!)
  done
fi
echo "test-under-load: $hogs busy processes beside the suite" >&2
started=$(date +%s)
scripts/test.sh
echo "test-under-load: passed in $(( $(date +%s) - started )) s with $hogs busy processes" >&2
