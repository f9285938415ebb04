"""GPU inference: ONNX Runtime's CUDA provider against torch eager on the same GPU, and the server on that GPU under
load with and without micro-batching.

    python -m bench.gpu_serve [--quick] [--model resnet50] [--batches 1,2,4,8,16,32,64] [--clients 1,4,16,64]
                              [--out PATH]

Runs only where both can use a CUDA GPU: torch.cuda.is_available() and an onnxruntime with CUDAExecutionProvider
(onnxruntime-gpu: the serve-gpu pin; `bench/gpu_check.sh serve` puts it first on the path from the serve kit of
`python -m bench.gpu_kit build` where the machine cannot install it). Anywhere else
it says which is missing and exits 0 without writing anything: no figure is made up.

1. Latency and throughput at each batch size, random-weight `--model` at 224 px exported by torchferry's exporter:
   torch eager (fp32, inference_mode; cuDNN's TF32 convolutions are torch's default) against the server's own
   Predictor on TORCHFERRY_DEVICE=cuda (ONNX Runtime's CUDA provider, TF32 on by its default). Both take a float32
   batch from host memory and return logits to it, as a request does; median over repetitions after warm-up,
   torch synchronised before the clock stops (ORT's run returns host arrays, so it is).
2. gunicorn (torchferry/serve/gunicorn.conf.py, one worker, TORCHFERRY_DEVICE=cuda) with micro-batching off
   (TORCHFERRY_BATCH_WINDOW_MS=0) and on (the GPU default, 2 ms), 1/4/16/64 clients posting 320×240 JPEGs:
   req/s and p50/p99, after a warm-up that meets every micro-batch size once (cuDNN tunes each shape).

Results go to bench/results/<date>-<gpu>-gpu-serve.json, the GPU named in the file and in its name.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import free_port, machine_info, median_seconds, result_header, result_path, write_result

THREADS = 64  # app threads of the one gunicorn worker: enough for 64 clients to reach the micro-batcher at once


def missing_gpu() -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    import onnxruntime as ort
    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (f"this onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu, "
                "pyproject's [serve-gpu] pin, or the serve kit of python -m bench.gpu_kit build)")
    return None


def export(arch: str, folder: Path) -> str:
    """A random-weight `arch` at 224 px exported and verified by torchferry's exporter (bench.load's model)."""
    from bench.load import make_model

    return make_model(arch, folder)


def latency_rows(model_path: str, arch: str, batches: list[int], quick: bool) -> list[dict[str, Any]]:
    """torch eager and ORT CUDA at each batch size: median ms, img/s, their ratio and the largest logit difference."""
    import torch

    from torchferry.distributed.checkpoint import load_checkpoint, model_from_checkpoint
    from torchferry.serve.predictor import Predictor

    checkpoint = load_checkpoint(str(Path(model_path).with_suffix(".pth")))  # the weights the ONNX file holds
    model = model_from_checkpoint(checkpoint, factory=None).cuda().eval()
    predictor = Predictor(model_path, device="cuda")
    shape = predictor.info.input_shape[1:]  # [C, H, W] as exported
    rows = []
    for batch in batches:
        x = np.random.default_rng(batch).standard_normal((batch, *shape), dtype=np.float32)
        reps = (10 if quick else 30) if batch >= 16 else (30 if quick else 100)

        def eager(x: np.ndarray = x) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(x).cuda()).cpu().numpy()  # .cpu() waits for the GPU

        t_torch = 1000 * median_seconds(eager, reps, 10)
        t_ort = 1000 * median_seconds(lambda x=x: predictor.run(x), reps, 10)
        diff = float(np.abs(eager() - predictor.run(x)).max())
        rows.append({"model": arch, "batch": batch, "reps": reps, "torch_ms": t_torch, "ort_cuda_ms": t_ort,
                     "torch_img_s": 1000 * batch / t_torch, "ort_cuda_img_s": 1000 * batch / t_ort,
                     "ort_over_torch": t_torch / t_ort, "max_abs_diff": diff})
        print(f"{arch} batch {batch:>2}: torch eager {t_torch:8.2f} ms ({1000 * batch / t_torch:8.0f} img/s)  "
              f"ORT CUDA {t_ort:8.2f} ms ({1000 * batch / t_ort:8.0f} img/s)  ORT/eager {t_torch / t_ort:5.2f}x  "
              f"max |diff| {diff:.1e}", flush=True)
    return rows


def server_rows(model_path: str, images: list[bytes], clients: list[int], seconds: float,
                log_dir: Path) -> list[dict[str, Any]]:
    """The GPU server at each client count, micro-batching off (0 ms) and on (the GPU default)."""
    from bench.load import drive, http_caller, start_gunicorn, stop_gunicorn

    rows = []
    for label, window in (("off", 0.0), ("on (GPU default)", None)):
        port = free_port()
        env = {"TORCHFERRY_DEVICE": "cuda", "TORCHFERRY_WORKERS": "1", "TORCHFERRY_THREADS": str(THREADS)}
        proc = start_gunicorn(model_path, port, log_dir / f"server-{window}.log", window_ms=window, extra_env=env)
        try:
            call = http_caller(f"http://127.0.0.1:{port}")
            drive(call, images, max(clients), 3 * seconds)  # every micro-batch size met once: cuDNN tunes each
            for n in clients:
                r = drive(call, images, n, seconds)
                rows.append({"micro_batching": label, "batch_window_ms": window, **r})
                print(f"server, micro-batching {label:<16} clients {n:>2}: {r['req_s']:8.1f} req/s  "
                      f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  errors {r['errors']}", flush=True)
        finally:
            stop_gunicorn(proc)
    return rows


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions and seconds per point")
    p.add_argument("--model", default="resnet50", help="architecture (default: resnet50)")
    p.add_argument("--batches", default="1,2,4,8,16,32,64", help="batch sizes (default: 1,2,4,8,16,32,64)")
    p.add_argument("--clients", default="1,4,16,64", help="concurrent clients (default: 1,4,16,64)")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/<date>-<gpu>-gpu-serve.json)")
    args = p.parse_args(argv)
    problem = missing_gpu()
    if problem is not None:
        print(f"bench.gpu_serve: skipped, {problem}; nothing measured, nothing written")
        return 0
    import onnxruntime as ort
    import torch

    from bench.load import make_images

    seconds = 5.0 if args.quick else 15.0
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_path = export(args.model, tmp)
        latency = latency_rows(model_path, args.model, [int(b) for b in args.batches.split(",")], args.quick)
        server = server_rows(model_path, make_images(tmp / "images"), [int(c) for c in args.clients.split(",")],
                             seconds, tmp)
    gpu = gpu_name()
    result = {**result_header("gpu-serve"),
              "machine": machine_info("torch", "onnxruntime", gpu=gpu, cuda=torch.version.cuda,
                                      ort_providers=ort.get_available_providers()),
              "method": __doc__.split("\n\n", 2)[2].strip(), "model": args.model, "latency": latency,
              "server": server, "seconds_per_point": seconds}
    host = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    write_result(result, Path(args.out) if args.out else result_path("gpu-serve", host=host))
    return 0


if __name__ == "__main__":
    sys.exit(main())
