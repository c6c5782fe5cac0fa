#!/usr/bin/env bash
# What benchmarks/gpu.py needs on a GPU machine that has PyTorch but not our requirements, and no internet.
#
#   bash benchmarks/gpu_setup.sh prepare        # here, with PyPI: wheels + tokenizer + records into $CARRY
#   bash benchmarks/gpu_setup.sh stamp          # here, just before the device call: the commit being measured
#   bash benchmarks/gpu_setup.sh install        # there: the wheels into /tmp/site (no index, no deps)
#   bash benchmarks/gpu_setup.sh run REPORT_DIR # there: install, the GPU tests, gpu.py; results into REPORT_DIR
#
# `run` takes at most RUN_S seconds (480: a rerun also fits in a device loan of 15 minutes): installing and the
# GPU tests come first, and gpu.py's --budget_s is what they leave.
#
# $CARRY (benchmarks/.cache/gpu-carry, git-ignored) travels with the working tree. The wheels are the
# versions our tests pass with (.venv), for CPython 3.12 on x86-64 manylinux; bitsandbytes is cut down to
# its CUDA 13 and CPU libraries (its full wheel holds every CUDA version: 43 of the 64 MiB a transfer
# may carry). The GPU image already has torch, triton, accelerate, tokenizers, safetensors, numpy,
# pandas, pyarrow and the rest of our dependencies (see /work/.library/device/KINDS.md).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY="${CARRY:-$ROOT/benchmarks/.cache/gpu-carry}"
SHARED_SRC="${ALPACA_COT_SHARED:-$(dirname "$ROOT")/shared}"
PYTHON="${PYTHON:-python3}"
SITE="${SITE:-/tmp/site}"
WHEELS=(transformers==5.24.0 peft==0.21.2 bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
        fire==0.7.1 termcolor==3.3.0 liger-kernel==0.8.5 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5
        annotated-types==0.8.0 typing-inspection==0.4.5)
DEEPSPEED=deepspeed==0.19.8  # an sdist only: built here into a pure-Python wheel (its ops compile on first use)
IMPORTS="transformers peft bitsandbytes datasets fire liger_kernel deepspeed"
RUN_S="${RUN_S:-480}"
# The tests that need the GPU (the CPU ones run everywhere): Liger against the default, flash-attn against padded
# batches (skipped without flash-attn), the chunked loss's memory, and the GPU-path logic beside them.
GPU_TESTS=(tests/test_liger.py::test_liger_trains_like_the_default_on_gpu tests/test_gpu_paths.py)

prepare() {
  local pip="$ROOT/.venv/bin/python -m pip" wheels="$CARRY/wheels"
  rm -rf "$CARRY.partial" && mkdir -p "$CARRY.partial/wheels" "$CARRY.partial/shared/models" \
    "$CARRY.partial/shared/bench"
  $pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$CARRY.partial/wheels" "${WHEELS[@]}"
  DS_BUILD_OPS=0 $pip wheel -q --no-deps --no-build-isolation -w "$CARRY.partial/wheels" "$DEEPSPEED"
  "$ROOT/.venv/bin/python" - "$CARRY.partial/wheels"/bitsandbytes-*.whl <<'EOF'
import os, sys, zipfile
path = sys.argv[1]
keep = lambda name: not name.startswith("bitsandbytes/libbitsandbytes_") or "cuda13" in name or "_cpu" in name
with zipfile.ZipFile(path) as src, zipfile.ZipFile(path + ".slim", "w", zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
        if not keep(info.filename):
            continue
        data = src.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):  # list only the files the wheel still holds
            data = b"".join(line + b"\n" for line in data.splitlines() if keep(line.split(b",")[0].decode()))
        dst.writestr(info, data)
os.replace(path + ".slim", path)
EOF
  cp -r "$SHARED_SRC/models/qwen3-tokenizer" "$CARRY.partial/shared/models/"
  cp "$SHARED_SRC/bench/bench_2k.json" "$CARRY.partial/shared/bench/"
  rm -rf "$CARRY" && mv "$CARRY.partial" "$CARRY"
  echo "prepared $CARRY ($(du -sh "$CARRY" | cut -f1)): carry benchmarks/.cache/gpu-carry"
}

stamp() {
  git -C "$ROOT" describe --always --dirty > "$CARRY/commit"
  echo "stamped $(cat "$CARRY/commit") into $CARRY/commit"
}

install() {
  [ -d "$CARRY/wheels" ] || { echo "gpu_setup.sh: $CARRY/wheels is absent: run 'gpu_setup.sh prepare' where PyPI is" \
    "reachable and carry benchmarks/.cache/gpu-carry" >&2; exit 2; }
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$CARRY"/wheels/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  "$PYTHON" - $IMPORTS <<'EOF'
import importlib, sys
for name in sys.argv[1:]:
    module = importlib.import_module(name)
    print(f"{name} {getattr(module, '__version__', '?')} from {module.__file__}")
EOF
}

run() {
  local report="${1:?gpu_setup.sh run REPORT_DIR}" started=$SECONDS
  mkdir -p "$report"
  install 2>&1 | tee "$report/setup.txt"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" ALPACA_COT_SHARED="$CARRY/shared" HF_HUB_OFFLINE=1
  export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  # the copy of the working tree on the device has no .git: gpu.py names the commit stamped here
  ALPACA_COT_COMMIT="$(cat "$CARRY/commit" 2>/dev/null || echo unknown)"
  export ALPACA_COT_COMMIT
  cd "$ROOT"
  # The GPU tests first (under a minute): they report even if the comparison runs into the call's limit.
  timeout 75 "$PYTHON" -m pytest -q -p no:cacheprovider -m "not slow" "${GPU_TESTS[@]}" 2>&1 | tail -n 30 \
    > "$report/tests.txt" || true
  cat "$report/tests.txt"
  local budget=$(( RUN_S - (SECONDS - started) - 15 ))  # 15 s for writing the tables after the last row
  echo "set-up and tests took $(( SECONDS - started )) s; gpu.py --budget_s $budget"
  "$PYTHON" benchmarks/gpu.py --budget_s "$budget" --report_dir "$report" || echo "gpu.py exited with $?"
}

case "${1:-}" in
  prepare) prepare && stamp ;;
  stamp) stamp ;;
  install) install ;;
  run) shift; run "$@" ;;
  *) echo "usage: bash benchmarks/gpu_setup.sh prepare | stamp | install | run REPORT_DIR" >&2; exit 2 ;;
esac
