"""The per-worker training loop that Ray Train runs on every worker (one process per GPU or CPU worker).

Flat functions in the manner of torchvision's reference scripts: `build_loaders`, `build_optimizer`,
`build_scheduler`, and one epoch's `train_one_epoch` and `evaluate` (epoch.py); `train_func` ties them
together, restoring the run where it stopped (resume.py) and telling the driver as it goes (events.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from torchferry.distributed import checkpoint as ckpt
from torchferry.distributed.config import TrainConfig
from torchferry.distributed.epoch import amp_dtype, evaluate, is_main_process, train_one_epoch
from torchferry.distributed.events import EventSink, format_epoch, record_placement, setup_worker_logging
from torchferry.distributed.gpu_input import DeviceAugment, DeviceDecodingLoader, collate_encoded, encoded_train_dataset
from torchferry.distributed.models import find_head, set_backbone_trainable
from torchferry.distributed.resume import Resumed, init_from_checkpoint, restore_latest, resume_state
from torchferry.distributed.tasks import Task, get_task
from torchferry.distributed.timeline import mark, process_started

_logger = logging.getLogger(__name__)


class ShardSampler(Sampler[int]):
    """Every `world`-th index from `rank`, without the padding DistributedSampler adds: each sample once overall."""

    def __init__(self, length: int, rank: int, world: int):
        self.indices = list(range(rank, length, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_loaders(split: Any, cfg: TrainConfig, rank: int, world: int,
                  use_cuda: bool) -> tuple[DataLoader, DataLoader]:
    """Sharded training loader (seeded DistributedSampler) and unpadded validation shard of the task's
    datasets, via Ray."""
    train_ds, val_ds = get_task(cfg.task).datasets(split, cfg, use_cuda)
    gpu_decode = bool(cfg.gpu_decode and use_cuda and cfg.task == "image")  # images only: a table has no JPEGs
    if gpu_decode:  # the training JPEGs travel as bytes; the GPU decodes and augments them (gpu_input.py)
        train_ds = encoded_train_dataset(split, int(cfg.channels or 3), train_ds)
    per_worker = cfg.batch_size // world
    common: dict[str, Any] = {"num_workers": cfg.num_workers, "pin_memory": use_cuda,
                              "persistent_workers": cfg.num_workers > 0}
    train_sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    train_loader = DataLoader(train_ds, batch_size=per_worker, sampler=train_sampler, generator=generator,
                              collate_fn=collate_encoded if gpu_decode else None, **common)
    val_loader = DataLoader(val_ds, batch_size=per_worker, sampler=ShardSampler(len(val_ds), rank, world), **common)
    # The samplers are ours (seeded, unpadded validation); Ray places the batches on the worker's device.
    val_loader = ray.train.torch.prepare_data_loader(val_loader, add_dist_sampler=False)
    if gpu_decode:
        return DeviceDecodingLoader(train_loader, DeviceAugment(cfg, ray.train.torch.get_device())), val_loader
    return ray.train.torch.prepare_data_loader(train_loader, add_dist_sampler=False), val_loader


def build_optimizer(params: Any, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """sgd (momentum, nesterov off), adam or adamw over the given parameters."""
    params = [p for p in params if p.requires_grad]
    if cfg.opt == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.opt == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, epochs: int) -> Any:
    """The per-epoch schedule, after `--lr-warmup-epochs` of linear warm-up (not with plateau)."""
    sched = torch.optim.lr_scheduler
    warmup = min(cfg.lr_warmup_epochs, max(epochs - 1, 0))
    if cfg.lr_scheduler == "plateau":
        return sched.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.lr_gamma, patience=cfg.plateau_patience)
    if cfg.lr_scheduler == "cosine":
        main: Any = sched.CosineAnnealingLR(optimizer, T_max=max(epochs - warmup, 1), eta_min=cfg.lr_min)
    elif cfg.lr_scheduler == "step":
        main = sched.StepLR(optimizer, step_size=cfg.lr_step_size, gamma=cfg.lr_gamma)
    elif cfg.lr_scheduler == "multistep":
        main = sched.MultiStepLR(optimizer, milestones=[m - warmup for m in cfg.lr_milestones], gamma=cfg.lr_gamma)
    else:
        main = sched.LambdaLR(optimizer, lambda _: 1.0)
    if warmup <= 0:
        return main
    warm = sched.LinearLR(optimizer, start_factor=cfg.lr_warmup_decay, total_iters=warmup)
    return sched.SequentialLR(optimizer, [warm, main], milestones=[warmup])


def stage_epochs(cfg: TrainConfig, frozen: bool) -> int:
    """Epochs the current stage's schedule spans: head-only until unfreezing, then the rest."""
    if cfg.freeze_backbone and cfg.unfreeze_at_epoch is not None:
        return cfg.unfreeze_at_epoch if frozen else cfg.epochs - cfg.unfreeze_at_epoch
    return cfg.epochs


class _Stage:
    """Model, optimizer and schedule of the current training stage (frozen backbone, then all)."""

    def __init__(self, bare: nn.Module, head: list[str], cfg: TrainConfig, frozen: bool, epochs_left: int):
        set_backbone_trainable(bare, head, not frozen)
        self.head, self.frozen = head, frozen
        self.model = ray.train.torch.prepare_model(bare)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.optimizer, self.scheduler = build_stage_schedule(bare, cfg, frozen, epochs_left)


def build_stage_schedule(bare: nn.Module, cfg: TrainConfig, frozen: bool,
                         epochs_left: int) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer over `bare`'s trainable parameters and its schedule, for a stage of `epochs_left` epochs
    (frozen: the head alone at --lr; unfrozen after a frozen stage: everything at --finetune-lr)."""
    lr = cfg.lr if frozen or cfg.unfreeze_at_epoch is None else cfg.finetune_lr
    assert lr is not None
    optimizer = build_optimizer(bare.parameters(), cfg, lr)
    return optimizer, build_scheduler(optimizer, cfg, epochs_left)


def train_func(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry: train, evaluate, checkpoint and report every epoch."""
    cfg = TrainConfig.from_dict(loop_config["cfg"])
    setup_worker_logging(cfg.verbose)
    events = EventSink(loop_config.get("events"), progress=cfg.progress == "on")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    mark("worker_entry", rank=rank, process_started=process_started())
    device = _set_up_device(cfg)
    record_placement(cfg, rank, world, events)
    task = get_task(cfg.task)
    split = loop_config["split"]  # the driver's, as it checked it: no worker looks at the data again
    train_loader, val_loader = build_loaders(split, cfg, rank, world, device.type == "cuda")
    mark("loaders_built", rank=rank)
    stage, scaler, past = _first_stage(task, cfg, split, events, device)
    work = _EpochWork(task, cfg, split, device, train_loader, val_loader, scaler, events)
    mark("model_built", rank=rank)
    writer = _open_writer(cfg, past, world, device, events) if is_main_process() else None
    history, best = past.history, past.best
    for epoch in range(past.start_epoch, cfg.epochs):
        # The random streams depend on (seed, rank, epoch) only, so a resumed run draws what an
        # uninterrupted one would have drawn.
        torch.manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + rank)
        if stage.frozen and cfg.unfreeze_at_epoch is not None and epoch == cfg.unfreeze_at_epoch:
            stage = _Stage(ckpt.unwrap(stage.model), stage.head, cfg, False, cfg.epochs - epoch)
            _logger.info("epoch %d: backbone unfrozen, training everything at lr %g", epoch + 1, cfg.finetune_lr)
        row = run_epoch(work, stage, epoch)
        history.append(row)
        best = better(task, best, row[task.best_metric])
        _report(work, row, history, best, stage, split, writer)
        events.send("epoch", row=row)
    mark("last_epoch_end", rank=rank)
    if writer is not None:
        writer.close()


def _set_up_device(cfg: TrainConfig) -> torch.device:
    """This worker's device (Ray's choice), its threads, and the seed of the initial weights."""
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    else:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    return device


def better(task: Task, best: float, value: float) -> float:
    """The better of two values of the task's best metric (the higher accuracy, the lower error)."""
    return max(best, value) if task.best_mode == "max" else min(best, value)


def _first_stage(task: Task, cfg: TrainConfig, split: Any, events: EventSink,
                 device: torch.device) -> tuple[_Stage, torch.amp.GradScaler, Resumed]:
    """The model with its starting weights (the run's newest checkpoint, --init-from, or fresh), the stage it
    trains in, the AMP scaler, and what a restored run had done already."""
    bare = task.build_model(cfg, split)
    head = find_head(bare, len(getattr(split, "classes", ())))
    found = restore_latest(events, cfg)
    restored = found.checkpoint if found is not None else None
    if restored is None and cfg.init_from:
        init_from_checkpoint(bare, cfg.init_from, head, lambda source: task.outputs_match(source, split))
    elif restored is not None:
        bare.load_state_dict(restored["state_dict"])
    if cfg.channels_last:
        bare = bare.to(memory_format=torch.channels_last)
    frozen = bool(restored["backbone_frozen"]) if restored is not None else cfg.freeze_backbone
    stage = _Stage(bare, head, cfg, frozen, stage_epochs(cfg, frozen))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and amp_dtype(device) == torch.float16)
    where = os.path.join(found.directory, ckpt.CHECKPOINT_FILE) if found is not None else ""
    return stage, scaler, resume_state(task, restored, stage.optimizer, stage.scheduler, scaler, where)


def _open_writer(cfg: TrainConfig, past: Resumed, world: int, device: torch.device, events: EventSink) -> Any:
    """Rank 0's TensorBoard writer in runs/<name>/tb, and the line that says what trains where."""
    from torch.utils.tensorboard import SummaryWriter

    os.makedirs(cfg.run_dir, exist_ok=True)
    writer = SummaryWriter(os.path.join(cfg.run_dir, "tb"),
                           purge_step=past.start_epoch + 1 if past.start_epoch else None)
    message = (f"training {cfg.model} ({cfg.task}): {world} worker(s) × batch "
               f"{cfg.batch_size // world} = global batch {(cfg.batch_size // world) * world}, device {device.type}")
    _logger.info(message)
    events.send("info", message=message)
    return writer


@dataclass
class _EpochWork:
    """What every epoch of this worker uses."""

    task: Task
    cfg: TrainConfig
    split: Any
    device: torch.device
    train_loader: DataLoader
    val_loader: DataLoader
    scaler: torch.amp.GradScaler
    events: EventSink

    def __post_init__(self) -> None:
        self.criterion, self.eval_criterion = self.task.criteria(self.cfg, self.split)
        self.normalize = self.task.device_transform(self.cfg, self.device)


def run_epoch(work: _EpochWork, stage: _Stage, epoch: int) -> dict[str, Any]:
    """Train one epoch, evaluate, step the schedule; the epoch's row of metrics.csv."""
    cfg, device = work.cfg, work.device
    epoch_start = time.perf_counter()
    sampler = getattr(work.train_loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    lr = stage.optimizer.param_groups[0]["lr"]
    train = train_one_epoch(stage.model, work.train_loader, work.criterion, stage.optimizer, device, amp=cfg.amp,
                            scaler=work.scaler, channels_last=bool(cfg.channels_last),
                            progress=work.events.start_epoch(epoch, len(work.train_loader)), normalize=work.normalize,
                            sums=work.task.batch_sums)
    val = evaluate(stage.model, work.val_loader, work.eval_criterion, device, amp=cfg.amp,
                   channels_last=bool(cfg.channels_last), sums=work.task.batch_sums)
    if isinstance(stage.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        stage.scheduler.step(val.loss)
    else:
        stage.scheduler.step()
    return {"epoch": epoch, "train_loss": train.loss, **work.task.phase_metrics("train", train), "val_loss": val.loss,
            **work.task.phase_metrics("val", val), "lr": float(lr),
            "images_per_s": train.images / max(train.seconds, 1e-9), "seconds": time.perf_counter() - epoch_start}


def _report(work: _EpochWork, row: dict[str, Any], history: list[dict[str, Any]], best: float, stage: _Stage,
            split: Any, writer: Any) -> None:
    """Rank 0 writes the epoch's checkpoint, metrics.csv and TensorBoard scalars; every rank reports."""
    cfg, task = work.cfg, work.task
    if not is_main_process():
        ray.train.report(dict(row))
        return
    _logger.info(format_epoch(row, cfg.epochs, task.items))
    for key in task.metric_columns:
        if key not in ("epoch", "seconds"):
            writer.add_scalar(key, row[key], row["epoch"] + 1)
    writer.flush()
    ckpt.write_metrics_csv(os.path.join(cfg.run_dir, "metrics.csv"), history, task.metric_columns)
    checkpoint = make_checkpoint(task, stage, work.scaler, split, cfg, row, history, best)
    tmp = tempfile.mkdtemp(prefix="torchferry-ckpt-")
    try:
        ckpt.save_checkpoint(checkpoint, os.path.join(tmp, ckpt.CHECKPOINT_FILE), sidecar=True)
        ray.train.report(dict(row), checkpoint=ray.train.Checkpoint.from_directory(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_checkpoint(task: Task, stage: _Stage, scaler: torch.amp.GradScaler, split: Any, cfg: TrainConfig,
                    row: dict[str, Any], history: list[dict[str, Any]], best: float) -> dict[str, Any]:
    """This epoch's checkpoint (docs/design.md), with the state --resume continues from."""
    return ckpt.build_checkpoint(stage.model, cfg, fields=task.checkpoint_fields(split, cfg), epoch=row["epoch"],
                                 metrics=row, resume={
        "history": [dict(r) for r in history], f"best_{task.best_metric}": float(best),
        "backbone_frozen": bool(stage.frozen),
        "optimizer": stage.optimizer.state_dict(), "scheduler": stage.scheduler.state_dict(),
        "scaler": scaler.state_dict()})
