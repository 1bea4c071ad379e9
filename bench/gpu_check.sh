#!/usr/bin/env bash
# CUDA check of the whole path on a GPU machine that lacks diffusers / jsonargparse / datasets (their wheels in
# .whl): the whole test suite with CUDA visible (gpu-marked tests included), the measured CUDA-vs-CPU layer errors,
# a W4A4 digits QAT fit on the GPU in float32 and a short one in bf16-mixed, export on CUDA, and integer sampling
# on CUDA vs CPU. Prints a summary table last.
# Usage (repo root, .whl carried):  bash bench/gpu_check.sh OUT_DIR
set -uo pipefail
out=${1:-/tmp/hqdm-gpu}
mkdir -p "$out"
source bench/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, lightning, diffusers; print('torch', torch.__version__, 'lightning', lightning.__version__, \
'diffusers', diffusers.__version__)"

t0=$(date +%s)
if [ "${SUITE:-all}" = all ]; then  # SUITE=gpu runs the gpu-marked tests only
  OMP_NUM_THREADS=4 python3 -m pytest -p no:cacheprovider -o addopts="" -q -rs tests > "$out/pytest.log" 2>&1
else
  echo "gpu-marked tests only" > "$out/pytest.log"
fi
tail -4 "$out/pytest.log"
python3 -m pytest -p no:cacheprovider -o addopts="" -q -m gpu tests 2>&1 | tail -1 | tee "$out/pytest_gpu.log"
t1=$(date +%s)

python3 - <<'PY'
# The errors test_layers.py bounds (REL_L2), printed: HadaNorm W8A8 layers, CUDA vs the float32 CPU layer.
import sys, torch
sys.path.insert(0, "tests")
from test_layers import device_dtype_errors
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
for kind in ("linear", "conv"):
    for dtype in (torch.float32, torch.bfloat16):
        fwd, bwd = device_dtype_errors(kind, "cuda", dtype)
        print(f"layer {kind} cuda {dtype}: rel L2 forward {fwd:.2e} backward {bwd:.2e}")
PY

t2=$(date +%s)
hqdm fit --config configs/digits_dit_w4a4.yaml --trainer.accelerator gpu --trainer.devices 1 \
    --trainer.logger.init_args.save_dir "$out/runs" > "$out/fit.log" 2>&1; fit_rc=$?
t3=$(date +%s)
tail -2 "$out/fit.log"
hqdm fit --config configs/digits_dit_w4a4.yaml --trainer.accelerator gpu --trainer.devices 1 \
    --trainer.precision bf16-mixed --trainer.max_steps 100 --trainer.logger.init_args.name bf16 \
    --trainer.logger.init_args.save_dir "$out/runs" > "$out/fit_bf16.log" 2>&1; bf16_rc=$?
t4=$(date +%s)
tail -2 "$out/fit_bf16.log"
ckpt="$out/runs/digits_dit_w4a4/version_0/checkpoints/last.ckpt"
hqdm export --ckpt_path "$ckpt" --out_dir /tmp/exp --device cuda > "$out/export.log" 2>&1; exp_rc=$?
tail -8 "$out/export.log"
for dev in cuda cpu; do
  hqdm sample --model /tmp/exp --out "$out/int_$dev.png" --device $dev --progress false > "$out/sample_$dev.log" 2>&1
  echo "sample $dev rc=$?"
done
python3 - "$out" <<'PY'
import csv, glob, sys
import numpy as np
from PIL import Image
out = sys.argv[1]
a, b = (np.asarray(Image.open(f"{out}/int_{d}.png"), dtype=np.float64) for d in ("cuda", "cpu"))
mse = ((a - b) ** 2).mean()
print(f"integer samples CUDA vs CPU (PNG grids): PSNR {10 * np.log10(255 ** 2 / mse) if mse else float('inf'):.2f} dB")
for name in ("digits_dit_w4a4", "bf16"):
    for f in glob.glob(f"{out}/runs/{name}/version_0/metrics.csv"):
        rows = [r for r in csv.DictReader(open(f)) if r.get("val/sqnr_db")]
        print(name, "val/sqnr_db by step:", [(r["step"], round(float(r["val/sqnr_db"]), 2)) for r in rows],
              "final sample PSNR", round(float(rows[-1]["val/sample_psnr_db"]), 2))
PY
echo "| stage | seconds | result |"
echo "|---|---|---|"
echo "| test suite with CUDA visible | $((t1 - t0)) | $(tail -1 "$out/pytest.log") (gpu only: $(cat "$out/pytest_gpu.log")) |"
echo "| fit digits_dit_w4a4, 400 steps, float32 | $((t3 - t2)) | rc $fit_rc |"
echo "| fit digits_dit_w4a4, 100 steps, bf16-mixed | $((t4 - t3)) | rc $bf16_rc |"
echo "| export on CUDA | - | rc $exp_rc |"
