#!/usr/bin/env bash
# Creates .venv with the pinned Python packages the tests and benchmarks use (idempotent).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
req="$root/scripts/requirements-test.txt"
stamp="$root/.venv/.requirements"
if [ -x "$root/.venv/bin/python" ] && cmp -s "$req" "$stamp" 2>/dev/null; then
  exit 0
fi
python3 -m venv "$root/.venv"
"$root/.venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
cp "$req" "$stamp"
