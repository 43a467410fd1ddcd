#!/usr/bin/env bash
# The GPU measurements of issues 3 and 5, as one prepared script (about 5 minutes on an H100,
# most of it the callback's two CUB-sized fits). It needs python3 with torch and timm (and
# lightning, torchmetrics, matplotlib, scipy, pillow for the callback part); vitlens runs from
# src/ without installing. Results go to $OUT (default ./gpu_check_out):
#   gpu.txt         nvidia-smi and versions
#   precision.txt   every method and precision against float64 on the GPU (real TF32)
#   throughput.txt  ViT-B/16, 224 px, batch 64: ms/image, peak memory, host syncs, per precision
#   callback.txt    ExplanationCallback overhead on a CUB-sized ViT-B/16 bf16 epoch
# With the device tool:  run(command="bash benchmarks/gpu_check.sh", timeout_s=540)
set -uo pipefail
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1
PY=${PYTHON:-python3}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
  date -u; } 2>&1 | tee "$OUT/gpu.txt"

# 1. exactness where TF32 is real: ViT-B/16 and ViT-S/16, random weights, 16 images
for m in vit_base_patch16_224 vit_small_patch16_224; do
  timeout 90 $PY benchmarks/precision_check.py --model "$m" --device cuda --batch-size 16
  timeout 90 $PY benchmarks/precision_check.py --model "$m" --device cuda --batch-size 16 --global-tf32
done 2>&1 | tee "$OUT/precision.txt"

# 2. speed, memory and host syncs: the targets (bf16 <= 2.5 ms, float32 <= 6 ms,
#    <= 12 GiB, grad_rollout <= 0.6 ms per image)
for p in bf16 float32 tf32; do
  timeout 120 $PY benchmarks/relevance_throughput.py --model vit_base_patch16_224 --img-size 224 \
    --batch-sizes 64 --device cuda --precision "$p" --repeats 10 --warmup 3 --check-sync \
    --methods transformer_attribution grad_rollout rollout attn_gradcam lrp_rollout
done 2>&1 | tee "$OUT/throughput.txt"
timeout 60 $PY benchmarks/relevance_throughput.py --model vit_base_patch16_224 --batch-sizes 1 8 \
  --device cuda --precision bf16 --repeats 10 --warmup 3 --methods transformer_attribution \
  2>&1 | tee -a "$OUT/throughput.txt"

# 3. the callback's share of a CUB-sized ViT-B/16 bf16 epoch (target <= 3%)
timeout 240 $PY benchmarks/callback_overhead.py --model vit_base_patch16_224 --device cuda \
  --out "$OUT/callback_run" 2>&1 | tee "$OUT/callback.txt"
rm -rf "$OUT/callback_run"
