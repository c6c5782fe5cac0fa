#!/usr/bin/env bash
# Runs the test suite in .venv (created or reused; CPU torch pinned where there is no CUDA).
# Usage: bash scripts/test.sh [fast] [pytest args]   (-n 0: one process, e.g. to debug with --pdb)
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
# One worker per core (the tests run one thread each), each taking whole files so that a module's shared
# fixtures are built once; the slowest tests are listed so that the suite's time budget shows in every CI log.
exec .venv/bin/python -m pytest -n auto --maxprocesses 8 --dist loadfile --durations=25 "$@"
