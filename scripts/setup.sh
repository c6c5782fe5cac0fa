#!/usr/bin/env bash
# Creates (or reuses) .venv and installs the project. On a machine without CUDA the CPU torch
# build is pinned first, because an unpinned torch resolves to a multi-GB CUDA build.
# Usage: bash scripts/setup.sh [dev]   ("dev" adds the test tools)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
stamp="$VENV/.installed-$(cat requirements.txt requirements-dev.txt 2>/dev/null | sha256sum | cut -c1-16)-${1:-run}"
if [ -f "$stamp" ]; then exit 0; fi
"$PY" -m pip install --quiet --upgrade pip
if ! "$PY" -c 'import torch' 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install --quiet torch
  else
    "$PY" -m pip install --quiet torch==2.13.0
  fi
fi
"$PY" -m pip install --quiet -r requirements.txt
if [ "${1:-}" = dev ]; then "$PY" -m pip install --quiet -r requirements-dev.txt; fi
touch "$stamp"
