#!/usr/bin/env bash
# Every GPU check and benchmark in one go, for a machine with one CUDA GPU:
#   1. python -m bench.gpu_train: resnet50 at 224 px, fp32 vs bf16 channels_last vs torch.compile, on GPU-resident
#      data and on JPEGs decoded by DataLoader workers;
#   2. the end-to-end command: python -m distributed.launch --gpus 1 --amp on those JPEGs (Ray, NCCL);
#   3. the GPU tests (pytest -m gpu);
#   4. python -m bench.gpu_serve: resnet50 on ONNX Runtime's CUDA provider against torch eager at batch 1-64, and the
#      server on the GPU with and without micro-batching, on the serve-gpu image's onnxruntime-gpu and NVIDIA libraries
#      (pyproject's [serve-gpu] pins, installed into a folder put first on PYTHONPATH: the training environment's
#      onnxruntime is the CPU one), and the serving GPU test (tests/test_serve_device.py -m gpu) on them.
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
ortgpu=/tmp/torchferry-ort-gpu
mapfile -t gpu_pins < <("$py" -c 'import tomllib; print(*(d for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["serve-gpu"] if d.startswith(("onnxruntime-gpu", "nvidia-"))), sep="\n")')
"$py" -m pip install --quiet --no-deps --target "$ortgpu" "${gpu_pins[@]}"
PYTHONPATH="$ortgpu${PYTHONPATH:+:$PYTHONPATH}" timeout 900 "$py" -m bench.gpu_serve --out "$out/gpu-serve.json" \
    2>&1 | tee "$out/gpu-serve.log"
PYTHONPATH="$ortgpu${PYTHONPATH:+:$PYTHONPATH}" timeout 300 "$py" -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_serve_device.py 2>&1 | tee "$out/gpu-serve-tests.log"
