"""GPU training throughput of torchferry's per-worker loop: fp32 vs bf16 channels_last vs torch.compile.

    python -m bench.gpu_train [--model resnet50] [--image-size 224] [--batch-size 128] [--steps 30]
                                [--real-data DIR] [--loader-workers 12] [--out PATH]
    python -m bench.gpu_train --make-data DIR [--count 3072]      # JPEGs to measure the input pipeline on

Each mode runs `distributed.epoch.train_one_epoch` (the function every Ray Train worker runs) on one GPU:
`--warmup` steps first (cuDNN autotuning, compilation), then `--steps` timed steps, `--reps` times; the
median is reported. Synthetic data is one batch resident on the GPU (the model's own speed); with
`--real-data`, JPEGs are decoded and augmented by DataLoader workers with torchferry's train transform,
pinned and copied without blocking (what a run pays end to end), and with --gpu-decode's pipeline (the workers
read bytes, the GPU decodes them with nvJPEG and augments them). The FLOPs of one training step are
counted with torch's FlopCounterMode, so the table can say which fraction of the GPU's dense bf16 peak
the model reaches. Results go to bench/results/<date>-<gpu>-gpu-train.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.common import machine_info, result_header, result_path, write_result
from torchferry.distributed.epoch import train_one_epoch
from torchferry.distributed.models import build_model

MODES = {  # name: (amp, channels_last, compile)
    "fp32": (False, False, False),
    "bf16-cl": (True, True, False),
    "bf16-cl-compile": (True, True, True),
}
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, in FLOP/s.
DENSE_BF16_PEAK = {"H100 80GB HBM3": 989.4e12, "H100 SXM": 989.4e12, "H100 PCIe": 756.5e12, "H100 NVL": 835.5e12,
                   "H200": 989.4e12, "A100": 312e12, "L40S": 362.05e12, "A10": 125e12, "L4": 121e12}


def spec_peak(name: str) -> float | None:
    for key, value in DENSE_BF16_PEAK.items():
        if key in name:
            return value
    return None


def matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    """What this GPU reaches on a large bf16 matrix product: the practical ceiling."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_flops_per_image(arch: str, size: int, device: str) -> float:
    """Forward + backward FLOPs of one image, counted by torch (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(arch, 1000).to(device)
    x = torch.randn(2, 3, size, size, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 2


def _step_parts(arch: str, mode: str, device: str) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    amp, channels_last, compiled = MODES[mode]
    torch.manual_seed(0)
    model = build_model(arch, 1000).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    if compiled:
        model = torch.compile(model)
    return model, optimizer, {"amp": amp, "channels_last": channels_last}


def _timed(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Any, kw: dict[str, Any]) -> tuple[float, int]:
    criterion = nn.CrossEntropyLoss()
    device = next(model.parameters()).device
    _sync()
    t = time.perf_counter()
    stats = train_one_epoch(model, batches, criterion, optimizer, device, **kw)
    _sync()
    return time.perf_counter() - t, stats.images


def bench_synthetic(arch: str, size: int, batch: int, steps: int, warmup: int, reps: int,
                    modes: list[str], device: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    rows, models = [], {}
    for mode in modes:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model, optimizer, kw = _step_parts(arch, mode, device)
        _timed(model, optimizer, [(x, y)] * warmup, kw)
        warm_s = time.perf_counter() - t0
        rates = []
        for _ in range(reps):
            seconds, images = _timed(model, optimizer, [(x, y)] * steps, kw)
            rates.append(images / seconds)
        rows.append({"data": "synthetic, GPU-resident", "mode": mode, "img_s": statistics.median(rates),
                     "img_s_reps": rates, "startup_s": warm_s,
                     "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None})
        print(f"{arch} {size}px b{batch} {mode:<16} {statistics.median(rates):8.0f} img/s  "
              f"(start-up incl. warm-up {warm_s:.1f} s)", flush=True)
        models[mode] = (model, optimizer, kw)
    return rows, models


def real_loader(root: str, size: int, batch: int, workers: int, kind: str, device: str) -> tuple[Any, Any]:
    """torchferry's training pipeline on JPEGs. `kind`: "float" (the workers decode, augment and normalise), "uint8"
    (they stop at uint8, the GPU normalises) or "gpu-decode" (they read the files' bytes; the GPU decodes them with
    nvJPEG, augments and normalises: --gpu-decode, distributed/gpu_input.py)."""
    from torch.utils.data import DataLoader

    from torchferry.distributed.config import TrainConfig, resolve_defaults
    from torchferry.distributed.data import build_datasets, discover
    from torchferry.distributed.presets import DeviceNormalize, build_train_transform

    cfg = resolve_defaults(TrainConfig(data=root, image_size=size, check_images="none"))
    split = discover(cfg)
    normalize = DeviceNormalize(list(cfg.mean or []), list(cfg.std or [])) if kind != "float" else None
    common: dict[str, Any] = {"batch_size": batch, "shuffle": True, "drop_last": True, "num_workers": workers,
                              "persistent_workers": True, "prefetch_factor": 4}
    if kind == "gpu-decode":
        from torchferry.distributed.gpu_input import (
            DeviceAugment,
            DeviceDecodingLoader,
            EncodedImageDataset,
            collate_encoded,
        )

        loader = DataLoader(EncodedImageDataset(split.train, 3), collate_fn=collate_encoded, **common)
        return DeviceDecodingLoader(loader, DeviceAugment(cfg, device)), normalize
    train_ds, _ = build_datasets(split, 3, build_train_transform(cfg, normalize=kind == "float"), None)
    return DataLoader(train_ds, pin_memory=True, **common), normalize


REAL_KINDS = {"float": "float32, normalised by the workers", "uint8": "uint8, normalised on the GPU",
              "gpu-decode": "bytes, decoded (nvJPEG), augmented and normalised on the GPU (--gpu-decode)"}


def bench_real(root: str, size: int, batch: int, steps: int, warmup: int, workers: int,
               models: dict[str, Any], device: str) -> list[dict[str, Any]]:
    rows = []
    for kind, what in REAL_KINDS.items():
        loader, normalize = real_loader(root, size, batch, workers, kind, device)
        label = f"JPEG, {workers} loader workers, {what}"

        def batches(n: int, loader: Any = loader) -> Any:
            return _cycle(loader, n)

        # The input pipeline alone: decode + augment in `workers` processes (or on the GPU), copied to the GPU.
        for _ in batches(warmup):
            pass
        _sync()
        t = time.perf_counter()
        n = 0
        for images, _target in batches(steps):
            x = images.to(device, non_blocking=True)
            if normalize is not None:
                normalize(x)
            n += images.shape[0]
        _sync()
        rate = n / (time.perf_counter() - t)
        rows.append({"data": label, "mode": "loader only", "img_s": rate})
        print(f"{label}: loader only {rate:8.0f} img/s", flush=True)
        for mode, (model, optimizer, kw) in models.items():
            if mode == "fp32" and kind != "float":
                continue
            _timed(model, optimizer, batches(warmup), {**kw, "normalize": normalize})
            seconds, images = _timed(model, optimizer, batches(steps), {**kw, "normalize": normalize})
            rows.append({"data": label, "mode": mode, "img_s": images / seconds})
            print(f"{label}: {mode:<16} {images / seconds:8.0f} img/s", flush=True)
        del loader
    return rows


def _cycle(loader: Any, n: int) -> Any:
    done = 0
    while True:
        for item in loader:
            if done == n:
                return
            done += 1
            yield item


def _write_jpeg(args: tuple[str, int, int]) -> None:
    from PIL import Image

    path, seed, side = args
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((side, side), Image.BICUBIC)
    noisy = np.asarray(small, dtype=np.int16) + rng.integers(-20, 21, (side, side, 3), dtype=np.int16)
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_data(root: str, count: int, classes: int = 10, side: int = 320) -> None:
    """An ImageFolder (train/ and val/) of photo-sized JPEGs: smooth colour fields with grain."""
    jobs = []
    for i in range(count):
        part = "val" if (i // classes) % 10 == 0 else "train"
        folder = os.path.join(root, part, f"c{i % classes}")
        os.makedirs(folder, exist_ok=True)
        jobs.append((os.path.join(folder, f"{i:05d}.jpg"), i, side))
    with Pool() as pool:
        pool.map(_write_jpeg, jobs, chunksize=64)
    print(f"wrote {count} JPEGs ({side}x{side}) under {root}")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128, help="per GPU (default: 128)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per repetition (default: 30)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (default: 10)")
    p.add_argument("--reps", type=int, default=3, help="repetitions; the median is reported (default: 3)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated of {', '.join(MODES)}")
    p.add_argument("--real-data", default=None, help="an ImageFolder of JPEGs to measure the input pipeline on")
    p.add_argument("--loader-workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    p.add_argument("--make-data", default=None, metavar="DIR", help="write JPEGs for --real-data, then exit")
    p.add_argument("--count", type=int, default=3072, help="--make-data: how many images (default: 3072)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a quick smoke run of this script")
    p.add_argument("--out", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.make_data:
        make_data(args.make_data, args.count)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; this benchmark measures the GPU path (--device cpu: a smoke run)",
              file=sys.stderr)
        return 2
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        print(f"error: unknown mode(s) {unknown}; choose from {list(MODES)}", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    cuda = args.device == "cuda"
    name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    peak = spec_peak(name) if cuda else None
    matmul = matmul_tflops() if cuda else None
    flops = train_flops_per_image(args.model, args.image_size, args.device)
    print(f"{name}: bf16 matmul {matmul or float('nan'):.0f} TFLOP/s (data-sheet dense bf16 peak "
          f"{peak / 1e12 if peak else float('nan'):.0f}); {args.model} {args.image_size}px: "
          f"{flops / 1e9:.1f} GFLOP per image per training step", flush=True)
    rows, models = bench_synthetic(args.model, args.image_size, args.batch_size, args.steps, args.warmup,
                                   args.reps, modes, args.device)
    if args.real_data:
        rows += bench_real(args.real_data, args.image_size, args.batch_size, args.steps, args.warmup,
                           args.loader_workers, models, args.device)
    for row in rows:
        if row["mode"] in MODES:
            row["tflop_s"] = row["img_s"] * flops / 1e12
            row["fraction_of_dense_bf16_peak"] = row["img_s"] * flops / peak if peak else None
            row["fraction_of_measured_matmul"] = row["img_s"] * flops / (matmul * 1e12) if matmul else None
    result = {**result_header("gpu-train"),
              "machine": machine_info("torch", gpu=name, cuda=torch.version.cuda,
                                      cudnn=torch.backends.cudnn.version() if cuda else None),
              "model": args.model, "image_size": args.image_size, "batch_size": args.batch_size,
              "steps": args.steps, "warmup": args.warmup, "reps": args.reps,
              "train_gflop_per_image": flops / 1e9, "dense_bf16_peak_tflop_s": peak / 1e12 if peak else None,
              "measured_bf16_matmul_tflop_s": matmul,
              "method": "distributed.epoch.train_one_epoch on one GPU, SGD momentum; images/s over the timed "
                        "steps after warm-up, median of reps; FLOPs from torch.utils.flop_counter (fwd+bwd)",
              "rows": rows}
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    write_result(result, Path(args.out) if args.out else result_path("gpu-train", host=slug))
    return 0


if __name__ == "__main__":
    sys.exit(main())
