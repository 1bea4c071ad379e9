#!/usr/bin/env bash
# Data-parallel QAT on the GPUs of one machine: the gpu-marked distributed tests (NCCL; the 2-GPU ones skip on one
# GPU), then bench/parallel_bench.py on every device count up to the GPUs visible. Prints the table last.
# Usage (repo root, .whl carried):  [ONLY="ddp hqdm_fsdp"] [BATCH=32] bash bench/parallel_gpu.sh OUT_DIR
set -uo pipefail
out=${1:-/tmp/hqdm-parallel}
mkdir -p "$out"
source bench/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
t0=$(date +%s)
if [ "${TESTS:-1}" = 1 ]; then
  python3 -m pytest -p no:cacheprovider -o addopts="" -q -rs -m gpu tests/test_distributed_gpu.py > "$out/pytest.log" 2>&1
  tail -4 "$out/pytest.log"
fi
t1=$(date +%s)
devices=$(seq -s " " 1 $(( gpus < 2 ? 1 : 2 )))
[ "$gpus" -ge 4 ] && devices="$devices 4"
[ "$gpus" -ge 8 ] && devices="$devices 8"
python3 bench/parallel_bench.py --devices $devices --batch "${BATCH:-32}" ${ONLY:+--only $ONLY} \
    --json "$out/parallel.json" 2>&1 | tee "$out/bench.log"
t2=$(date +%s)
echo "seconds: tests $((t1 - t0)), bench $((t2 - t1)); GPUs: $gpus"
