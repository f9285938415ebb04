#!/usr/bin/env bash
# Every GPU check and benchmark in one go, for a machine with one CUDA GPU:
#   1. python -m bench.gpu_train: resnet50 at 224 px, fp32 vs bf16 channels_last vs torch.compile, on GPU-resident
#      data and on JPEGs decoded by DataLoader workers;
#   2. the end-to-end command: python -m distributed.launch --gpus 1 --amp on those JPEGs (Ray, NCCL);
#   3. the GPU tests (pytest -m gpu).
# Usage: bench/gpu_check.sh [OUTDIR]   (PYTHON picks the interpreter; default python3; run from anywhere)
set -uo pipefail
cd "$(dirname "$0")/.."  # the repository root: the benchmarks run as modules of the package bench
out=${1:-/tmp/torchferry-gpu}
py=${PYTHON:-python3}
data=/tmp/torchferry-jpeg
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/nvidia-smi.txt"
"$py" -c 'import torch, torchvision, ray; print("torch", torch.__version__, "torchvision", torchvision.__version__, "ray", ray.__version__)'
"$py" -m bench.gpu_train --make-data "$data" --count 3072
timeout 330 "$py" -m bench.gpu_train --real-data "$data" --out "$out/gpu-train.json" 2>&1 | tee "$out/gpu-train.log"
timeout 200 "$py" -m distributed.launch --gpus 1 --amp --model resnet50 --data "$data" --image-size 224 \
    --epochs 3 --batch-size 128 --num-workers 12 --check-images header --output-dir /tmp/torchferry-runs \
    --name r50-amp 2>&1 | tee "$out/launch.log"
cp /tmp/torchferry-runs/r50-amp/metrics.csv "$out/launch-metrics.csv" 2>/dev/null
timeout 300 "$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_loop.py 2>&1 | tee "$out/gpu-tests.log"
