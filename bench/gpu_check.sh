#!/usr/bin/env bash
# Every GPU check and benchmark, for a machine with one CUDA GPU and PyTorch, in two stages of at most about
# 6 minutes each (every step has its own timeout):
#   train: 1. python -m bench.gpu_train: resnet50 at 224 px, fp32 vs bf16 channels_last vs torch.compile, on
#             GPU-resident data and on JPEGs (decoded by DataLoader workers, or by the GPU with --gpu-decode);
#          2. the end-to-end command: python -m distributed.launch --gpus 1 --amp on those JPEGs (Ray, NCCL);
#          3. the GPU tests of training (pytest -m gpu).
#   serve: 4. python -m bench.gpu_serve --quick: resnet50 on ONNX Runtime's CUDA provider against torch eager at
#             batch 1-64, and the server on the GPU with and without micro-batching;
#          5. the serving GPU test (tests/test_serve_device.py -m gpu).
#   stash: only keeps the kit parts this copy of the repository holds (see below), for a later stage.
# A machine that cannot reach a package index takes what its image lacks from the offline kits of
# `python -m bench.gpu_kit build` (.gpukit/train: Ray; .gpukit/serve: onnxruntime-gpu and the server's packages),
# whose parts may arrive over several copies of the repository: each stage first keeps the parts it finds under
# $GPUKIT_PARTS (default /tmp/torchferry-gpukit), then unpacks a kit once all its parts are there and puts it first
# on PYTHONPATH. Without a kit the stage uses what the interpreter has.
# Usage: bench/gpu_check.sh train|serve|stash [OUTDIR]   (PYTHON picks the interpreter; default python3)
set -uo pipefail
cd "$(dirname "$0")/.."  # the repository root: the benchmarks run as modules of the package bench
stage=${1:?usage: bench/gpu_check.sh train|serve|stash [OUTDIR]}
out=${2:-/tmp/torchferry-gpu}
py=${PYTHON:-python3}
parts=${GPUKIT_PARTS:-/tmp/torchferry-gpukit}
data=/tmp/torchferry-jpeg
mkdir -p "$out"
export PYTHONUNBUFFERED=1

stash() {  # keep every kit part this copy holds, and each kit's kit.json
    for kit in .gpukit/*/; do
        [ -f "$kit/kit.json" ] || continue
        name=$(basename "$kit")
        mkdir -p "$parts/$name"
        cp "$kit/kit.json" "$kit"/part-* "$parts/$name/" 2>/dev/null
    done
    ls -l "$parts"/*/ 2>/dev/null
}

use_kit() {  # unpack kit $1 once (all its parts must be there) and put it first on PYTHONPATH
    local site="$parts/site-$1"
    if [ ! -d "$site" ] && [ -f "$parts/$1/kit.json" ]; then
        "$py" -m bench.gpu_kit unpack "$parts/$1" --to "$site"
    fi
    if [ -d "$site" ]; then
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
    fi
}

stash
case "$stage" in
stash) exit 0 ;;
train)
    use_kit train
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/nvidia-smi.txt"
    "$py" -c 'import torch, torchvision, ray; print("torch", torch.__version__, "torchvision", torchvision.__version__, "ray", ray.__version__)'
    "$py" -m bench.gpu_train --make-data "$data" --count 3072
    timeout 160 "$py" -m bench.gpu_train --real-data "$data" --steps 20 --reps 2 --out "$out/gpu-train.json" 2>&1 \
        | tee "$out/gpu-train.log"
    timeout 80 "$py" -m distributed.launch --gpus 1 --amp --model resnet50 --data "$data" --image-size 224 \
        --epochs 2 --batch-size 128 --num-workers 12 --check-images header --gpu-decode \
        --output-dir /tmp/torchferry-runs --name r50-amp 2>&1 | tee "$out/launch.log"
    cp /tmp/torchferry-runs/r50-amp/metrics.csv "$out/launch-metrics.csv" 2>/dev/null
    timeout 120 "$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_loop.py 2>&1 \
        | tee "$out/gpu-tests.log"
    ;;
serve)
    use_kit serve
    "$py" -c 'import onnxruntime as ort; print("onnxruntime", ort.__version__, ort.get_available_providers())'
    timeout 200 "$py" -m bench.gpu_serve --quick --out "$out/gpu-serve.json" 2>&1 | tee "$out/gpu-serve.log"
    timeout 100 "$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_serve_device.py 2>&1 \
        | tee "$out/gpu-serve-tests.log"
    ;;
*) echo "bench/gpu_check.sh: the stage is train, serve or stash, not '$stage'" >&2; exit 2 ;;
esac
