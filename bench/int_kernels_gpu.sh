#!/usr/bin/env bash
# CUDA run of the integer kernels on a GPU machine: optionally the tile-table sweep first (TUNE=1: written to
# OUT_DIR/tuned.json and copied over hqdm/kernels/tuned.json in this tree, so what follows uses it), the kernel
# tests compiled (gpu-marked ones included), the matrix instructions compiled, and the side-by-side layer table.
# hqdm imports without diffusers, so the repo on PYTHONPATH is enough.
# Usage (repo root):  [TUNE=1] [M=8192] bash bench/int_kernels_gpu.sh OUT_DIR
set -uo pipefail
out=${1:-/tmp/hqdm-int}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
t0=$(date +%s)
if [ "${TUNE:-0}" = 1 ]; then
  timeout "${TUNE_S:-300}" python3 bench/int_layer_bench.py --tune "$out/tuned.json" --no-bench > "$out/tune.log" 2>&1
  tail -3 "$out/tune.log"
  [ -s "$out/tuned.json" ] && cp "$out/tuned.json" hqdm/kernels/tuned.json
fi
t1=$(date +%s)
timeout "${TEST_S:-170}" python3 -m pytest -p no:cacheprovider -o addopts="" -q -rs -n 6 tests/test_kernels_int.py > "$out/pytest.log" 2>&1
grep -E "passed|failed|error" "$out/pytest.log" | tail -3
t2=$(date +%s)
python3 bench/int_layer_bench.py --check --m "${M:-8192}" 2>&1 | tee "$out/bench.log"
t3=$(date +%s)
echo "seconds: tune $((t1 - t0)), tests $((t2 - t1)), check+bench $((t3 - t2))"
