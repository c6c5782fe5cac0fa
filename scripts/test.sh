#!/usr/bin/env bash
# Runs the test suite in .venv (created or reused; CPU torch pinned where there is no CUDA).
# Usage: bash scripts/test.sh [fast] [pytest args]
#   fast: only tests not marked slow (no script subprocesses or servers). Without ../shared the tests
#   that need its real data and models skip with the reason; everything else builds its tiny tokenizer,
#   models and data in code.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${1:-}" = fast ]; then
  shift
  set -- -m "not slow" "$@"
fi
# the slowest tests, so that the suite's time budget is visible in every CI log
exec .venv/bin/python -m pytest --durations=25 "$@"
