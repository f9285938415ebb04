"""The baseline torchferry is measured against: a plain PyTorch training loop, as one writes it by hand.

    python -m bench.plain_train --data digits --model smallcnn --epochs 3 --out times.json
    torchrun --standalone --nproc-per-node 2 -m bench.plain_train ...      # DDP over gloo (or nccl on GPUs)

The loop of torchvision's classification reference (train_one_epoch / evaluate, DistributedSampler,
DistributedDataParallel, SGD with momentum, loss.item() logged every step), with no Ray, no checkpoints
and no progress reporting. It reads the same files through the same dataset and transform objects as
torchferry (`distributed.data`, `distributed.presets`) so that the work per image is identical and only
the loops differ. Rank 0 writes per-epoch timings to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from torchferry.distributed.config import TrainConfig, resolve_defaults
from torchferry.distributed.data import build_datasets, discover
from torchferry.distributed.models import build_model
from torchferry.distributed.presets import build_eval_transform, build_train_transform, preprocess_spec
from torchferry.distributed.timeline import mark, process_started

START = time.perf_counter()


def train_one_epoch(model, criterion, optimizer, loader, device, memory_format: torch.memory_format,
                    first: bool = False) -> tuple[int, float]:
    model.train()
    images_seen, start = 0, time.perf_counter()
    for image, target in loader:
        image = image.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        target = target.to(device, non_blocking=True)
        output = model(image)
        loss = criterion(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()  # the reference logs it every step
        images_seen += image.shape[0]
        if first:  # bench.startup's timeline
            mark("first_step")
            first = False
    return images_seen, time.perf_counter() - start


@torch.inference_mode()
def evaluate(model, loader, device, memory_format: torch.memory_format) -> float:
    model.eval()
    correct = total = 0
    for image, target in loader:
        output = model(image.to(device).contiguous(memory_format=memory_format))
        correct += (output.argmax(1) == target.to(device)).sum().item()
        total += target.shape[0]
    t = torch.tensor([correct, total], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return float(t[0] / max(t[1], 1))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="digits")
    p.add_argument("--model", default="smallcnn")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--channels", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader processes per training process")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--out", required=True)
    return p


def load_data(args: argparse.Namespace, world: int, distributed: bool, device: torch.device) -> tuple[Any, ...]:
    """torchferry's datasets and transforms for --data, in the reference's loaders: (train sampler, train loader,
    validation loader, number of classes, channels, memory format: torchferry's default for the run, so both
    loops do the same work)."""
    cfg = resolve_defaults(TrainConfig(data=args.data, model=args.model, image_size=args.image_size,
                                       channels=args.channels, batch_size=args.batch_size * world,
                                       check_images="none", name="plain", gpus=int(device.type == "cuda")))
    split = discover(cfg)
    train_ds, val_ds = build_datasets(split, int(cfg.channels), build_train_transform(cfg),
                                      build_eval_transform(preprocess_spec(cfg)))
    train_sampler = DistributedSampler(train_ds, seed=0) if distributed else torch.utils.data.RandomSampler(train_ds)
    val_sampler = DistributedSampler(val_ds, shuffle=False) if distributed else None
    common = {"num_workers": args.num_workers, "pin_memory": device.type == "cuda",
              "persistent_workers": args.num_workers > 0}
    train_loader = DataLoader(train_ds, batch_size=args.batch_size, sampler=train_sampler, **common)
    val_loader = DataLoader(val_ds, batch_size=args.batch_size, sampler=val_sampler, **common)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    return train_sampler, train_loader, val_loader, len(split.classes), int(cfg.channels), memory_format


def main() -> int:
    args = get_args_parser().parse_args()
    mark("worker_entry", rank=int(os.environ.get("RANK", "0")), process_started=process_started())
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    mark("pg_ready")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    train_sampler, train_loader, val_loader, classes, channels, memory_format = load_data(args, world, distributed,
                                                                                         device)
    mark("loaders_built")

    torch.manual_seed(0)
    model = build_model(args.model, classes, channels=channels).to(device, memory_format=memory_format)
    if distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    mark("model_built")

    epochs = []
    first_step_at = time.perf_counter() - START
    for epoch in range(args.epochs):
        epoch_start = time.perf_counter()
        if distributed:
            train_sampler.set_epoch(epoch)
        images, seconds = train_one_epoch(model, criterion, optimizer, train_loader, device, memory_format,
                                          first=epoch == 0)
        acc = evaluate(model, val_loader, device, memory_format)
        scheduler.step()
        totals = torch.tensor([images, seconds], dtype=torch.float64)
        if distributed:
            dist.all_reduce(totals)
        epochs.append({"epoch": epoch, "images": int(totals[0]), "train_seconds": float(totals[1]) / world,
                       "images_per_s": float(totals[0]) / (float(totals[1]) / world), "val_acc": acc,
                       "seconds": time.perf_counter() - epoch_start})
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs}  {epochs[-1]['images_per_s']:.0f} img/s  val_acc {acc:.4f}",
                  flush=True)
    mark("last_epoch_end")
    if rank == 0:
        Path(args.out).write_text(json.dumps({"world": world, "first_step_at_s": first_step_at,
                                              "epochs": epochs}, indent=2) + "\n")
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
