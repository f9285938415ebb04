"""The per-worker training loop that Ray Train runs on every worker (one process per GPU or CPU worker).

Flat functions in the manner of torchvision's reference scripts: `build_loaders`, `build_optimizer`,
`build_scheduler`, `train_one_epoch`, `evaluate`; `train_func` ties them together. Loss and accuracy
are sums all-reduced over every worker, so the figures describe the whole data set, not rank 0's shard.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from torchferry.distributed import checkpoint as ckpt
from torchferry.distributed.config import TrainConfig
from torchferry.distributed.data import build_datasets, discover
from torchferry.distributed.discovery import DataSplit
from torchferry.distributed.models import build_model, find_head, keep_frozen_norms_in_eval, set_backbone_trainable
from torchferry.distributed.presets import DeviceNormalize, build_eval_transform, build_train_transform, preprocess_spec
from torchferry.distributed.timeline import mark, process_started

_logger = logging.getLogger(__name__)

AUX_LOSS_WEIGHT = 0.4  # torchvision's reference recipe for inception_v3's auxiliary head


def is_main_process() -> bool:
    """Rank 0 of the process group, or the only process when there is none."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class ShardSampler(Sampler[int]):
    """Every `world`-th index from `rank`, without the padding DistributedSampler adds: each sample once overall."""

    def __init__(self, length: int, rank: int, world: int):
        self.indices = list(range(rank, length, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class PhaseStats:
    """Sums over every worker for one phase of an epoch."""

    loss: float
    accuracy: float
    images: int
    seconds: float


def amp_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device has it, fp16 on older GPUs (with a GradScaler)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _autocast(device: torch.device, enabled: bool, dtype: torch.dtype) -> Any:
    return torch.autocast(device.type, dtype=dtype) if enabled else nullcontext()


def _zeros(device: torch.device) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float64, device=device)


def _all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _loss_and_logits(output: Any, target: torch.Tensor, criterion: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """inception/googlenet return (logits, aux...) in training mode; the aux heads add a weighted loss."""
    if isinstance(output, torch.Tensor):
        return criterion(output, target), output
    logits, *aux = output
    loss = criterion(logits, target)
    for a in aux:
        if a is not None:
            loss = loss + AUX_LOSS_WEIGHT * criterion(a, target)
    return loss, logits


def _to_device(images: torch.Tensor, target: torch.Tensor, device: torch.device, channels_last: bool,
               normalize: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        if normalize is None:
            raise TypeError("uint8 images reached the model without a normalisation step")
        images = normalize(images)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, target.to(device, non_blocking=True)


def train_one_epoch(model: nn.Module, loader: DataLoader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    device: torch.device, *, amp: bool = False, scaler: torch.amp.GradScaler | None = None,
                    channels_last: bool = False, progress: Any = None,
                    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None) -> PhaseStats:
    """One pass over this worker's shard; returns loss/accuracy summed over all workers."""
    model.train()
    keep_frozen_norms_in_eval(model)  # --freeze-backbone: frozen BatchNorm keeps its running statistics
    dtype = amp_dtype(device)
    # Sums stay on the device: a `.item()` per step would make the CPU wait for the GPU every step.
    loss_sum, correct = _zeros(device), _zeros(device)
    count = 0
    start = time.perf_counter()
    for images, target in loader:
        images, target = _to_device(images, target, device, channels_last, normalize)
        with _autocast(device, amp, dtype):
            loss, logits = _loss_and_logits(model(images), target, criterion)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        n = target.shape[0]
        loss_sum += loss.detach().double() * n
        correct += (logits.detach().argmax(1) == target).sum()
        count += n
        if progress is not None:
            progress.update(1)
    local = torch.stack([loss_sum, correct]).tolist()  # the epoch's one wait for the device
    seconds = time.perf_counter() - start
    loss_sum, correct, count, seconds = _all_reduce_sums([*local, count, seconds], device)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return PhaseStats(loss_sum / max(count, 1), correct / max(count, 1), int(count), seconds / world)


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, criterion: nn.Module, device: torch.device, *,
             amp: bool = False, channels_last: bool = False) -> PhaseStats:
    """Loss and accuracy over every worker's validation shard, summed with all-reduce."""
    model.eval()
    dtype = amp_dtype(device)
    loss_sum, correct = _zeros(device), _zeros(device)
    count = 0
    start = time.perf_counter()
    for images, target in loader:
        images, target = _to_device(images, target, device, channels_last)
        with _autocast(device, amp, dtype):
            logits = model(images)
            loss = criterion(logits.float(), target)
        n = target.shape[0]
        loss_sum += loss.double() * n
        correct += (logits.argmax(1) == target).sum()
        count += n
    local = torch.stack([loss_sum, correct]).tolist()
    seconds = time.perf_counter() - start
    loss_sum, correct, count = _all_reduce_sums([*local, count], device)
    return PhaseStats(loss_sum / max(count, 1), correct / max(count, 1), int(count), seconds)


def build_loaders(split: DataSplit, cfg: TrainConfig, rank: int, world: int,
                  use_cuda: bool) -> tuple[DataLoader, DataLoader]:
    """Sharded training loader (seeded DistributedSampler) and unpadded validation shard, via Ray."""
    # On a GPU the training images travel as uint8 and are normalised there (DeviceNormalize).
    train_ds, val_ds = build_datasets(split, int(cfg.channels or 3), build_train_transform(cfg, normalize=not use_cuda),
                                      build_eval_transform(preprocess_spec(cfg)))
    per_worker = cfg.batch_size // world
    common: dict[str, Any] = {"num_workers": cfg.num_workers, "pin_memory": use_cuda,
                              "persistent_workers": cfg.num_workers > 0}
    train_sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    train_loader = DataLoader(train_ds, batch_size=per_worker, sampler=train_sampler, generator=generator, **common)
    val_loader = DataLoader(val_ds, batch_size=per_worker, sampler=ShardSampler(len(val_ds), rank, world), **common)
    # The samplers are ours (seeded, unpadded validation); Ray places the batches on the worker's device.
    return (ray.train.torch.prepare_data_loader(train_loader, add_dist_sampler=False),
            ray.train.torch.prepare_data_loader(val_loader, add_dist_sampler=False))


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


class EventSink:
    """Rank 0's messages to the driver (epoch rows, progress) through a Ray queue; never blocks training."""

    def __init__(self, queue: Any, progress: bool = False):
        self.queue, self.progress = queue, progress
        self.epoch = self.total = self.done = 0
        self.every = 1
        self.first_step_pending = True

    def send(self, kind: str, **payload: Any) -> None:
        if self.queue is None or not is_main_process():
            return
        try:
            self.queue.put_nowait({"kind": kind, **payload})
        except Exception:  # noqa: BLE001 - a full or gone queue must not stop training
            _logger.debug("dropped %s event for the driver", kind)

    def start_epoch(self, epoch: int, total: int) -> EventSink:
        self.epoch, self.total, self.done = epoch, total, 0
        self.every = max(1, total // 20)
        if self.progress:
            self.send("progress", epoch=epoch, done=0, total=total)
        return self

    def update(self, n: int = 1) -> None:
        if self.first_step_pending:  # for the start-up timeline
            self.first_step_pending = False
            mark("first_step")
        self.done += n
        if self.progress and (self.done % self.every == 0 or self.done == self.total):
            self.send("progress", epoch=self.epoch, done=self.done, total=self.total)


def _setup_worker_logging(verbose: bool) -> None:
    logger = logging.getLogger("torchferry.distributed")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def format_epoch(row: dict[str, Any], epochs: int) -> str:
    """The per-epoch console line."""
    return (f"epoch {row['epoch'] + 1:>3}/{epochs}  train_loss {row['train_loss']:.4f}  train_acc {row['train_acc']:.4f}"
            f"  val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:.4f}  lr {row['lr']:.3g}"
            f"  {row['images_per_s']:.0f} img/s  {row['seconds']:.1f}s")


def record_placement(cfg: TrainConfig, rank: int, world: int, events: EventSink) -> None:
    """Which node each worker runs on: gathered on rank 0 into runs/<name>/cluster.json and told to the driver."""
    me = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
          "pid": os.getpid()}
    everyone: list[Any] = [None] * world
    if dist.is_available() and dist.is_initialized():
        dist.all_gather_object(everyone, me)
    else:
        everyone = [me]
    if rank == 0:
        import json

        ckpt.atomic_write_bytes(os.path.join(cfg.run_dir, "cluster.json"),
                                (json.dumps({"workers": everyone}, indent=2) + "\n").encode())
        nodes = sorted({w["node_id"] for w in everyone})
        events.send("info", message=f"{world} worker(s) on {len(nodes)} node(s): " + ", ".join(
            f"rank {w['rank']}@{w['ip']}/{w['node_id'][:8]}" for w in everyone))


def _stage_epochs(cfg: TrainConfig, frozen: bool) -> int:
    """Epochs the current stage's schedule spans: head-only until unfreezing, then the rest."""
    if cfg.freeze_backbone and cfg.unfreeze_at_epoch is not None:
        return cfg.unfreeze_at_epoch if frozen else cfg.epochs - cfg.unfreeze_at_epoch
    return cfg.epochs


def checkpoint_dirs(run_storage: str) -> list[str]:
    """The run's `checkpoint_*` folders on local or shared storage (empty for a remote URI or no folder)."""
    if "://" in run_storage or not os.path.isdir(run_storage):
        return []
    return sorted(os.path.join(run_storage, d) for d in os.listdir(run_storage)
                  if d.startswith("checkpoint_") and os.path.isdir(os.path.join(run_storage, d)))


def newest_usable(candidates: list[str], warn: Callable[[str], None]) -> tuple[str, dict[str, Any]] | None:
    """The checkpoint of the highest epoch among `candidates` (folders) that loads and matches its sidecar.

    Every candidate is checked with `load_checkpoint`; a damaged one is passed over with a warning. Among
    equal epochs the earlier candidate wins. Only the winner stays in memory.
    """
    best: tuple[str, dict[str, Any]] | None = None
    for directory in candidates:
        try:
            loaded = ckpt.load_checkpoint(os.path.join(directory, ckpt.CHECKPOINT_FILE))
        except ckpt.CheckpointError as exc:
            warn(f"checkpoint {directory} is unusable ({exc}); passing over it")
            continue
        if best is None or int(loaded["epoch"]) > int(best[1]["epoch"]):
            best = (directory, loaded)
    return best


def restore_latest(events: EventSink, cfg: TrainConfig) -> dict[str, Any] | None:
    """The newest usable checkpoint of this run (after a worker failure, or with --resume), checked.

    Ray's record of the run's checkpoints can lag the folders on disk: a run stopped (Ctrl-C) right after a
    checkpoint was written keeps that checkpoint, but Ray may still name an older one as the latest. So the
    candidates are Ray's checkpoint and every `checkpoint_*` folder of the run on local or shared storage;
    each is verified (sidecar, weights-only) and the highest epoch wins, whatever Ray's record says. A
    damaged checkpoint is passed over with a warning; the driver is told either way.
    """
    checkpoint = ray.train.get_checkpoint()
    run_storage = os.path.join(cfg.storage_path, str(cfg.name))
    on_disk = checkpoint_dirs(run_storage)
    if checkpoint is None and not (cfg.resume and on_disk):
        return None

    def warn(message: str) -> None:
        _logger.warning(message)
        events.send("info", message=message)

    with (checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext(None)) as recorded:
        skip = os.path.abspath(checkpoint.path) if checkpoint is not None else None
        candidates = ([recorded] if recorded else []) + [d for d in on_disk if os.path.abspath(d) != skip]
        found = newest_usable(candidates, warn)
    if found is None:
        raise ckpt.CheckpointError("no usable checkpoint to resume from: every kept checkpoint is damaged")
    directory, restored = found
    if directory == recorded and skip is not None:
        directory = skip  # name the storage folder, not Ray's temporary local copy of it
    message = f"resuming after epoch {int(restored['epoch']) + 1} from {directory}"
    _logger.info(message)
    events.send("info", message=message)
    return restored


def init_from_checkpoint(model: nn.Module, path: str, head: list[str], classes: list[str]) -> None:
    """--init-from: start from another torchferry checkpoint's weights; a new head when the classes differ."""
    source = ckpt.load_checkpoint(path)
    state = dict(source["state_dict"])
    if list(source["classes"]) != list(classes):
        state = {k: v for k, v in state.items() if not any(k.startswith(h + ".") for h in head)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    foreign = [k for k in missing if not any(k.startswith(h + ".") for h in head)]
    if foreign or unexpected:
        raise ckpt.CheckpointError(f"--init-from {path}: its {source['arch']} weights do not fit this model "
                                   f"(missing {foreign[:3]}, unexpected {unexpected[:3]})")
    _logger.info("initialised from %s%s", path, "" if not missing else " with a new head for these classes")


class _Stage:
    """Model, optimizer and schedule of the current training stage (frozen backbone, then all)."""

    def __init__(self, bare: nn.Module, head: list[str], cfg: TrainConfig, frozen: bool, epochs_left: int):
        set_backbone_trainable(bare, head, not frozen)
        self.frozen = frozen
        self.model = ray.train.torch.prepare_model(bare)
        if cfg.compile:
            self.model = torch.compile(self.model)
        lr = cfg.lr if frozen or cfg.unfreeze_at_epoch is None else cfg.finetune_lr
        assert lr is not None
        self.optimizer = build_optimizer(bare.parameters(), cfg, lr)
        self.scheduler = build_scheduler(self.optimizer, cfg, epochs_left)


def train_func(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry: train, evaluate, checkpoint and report every epoch."""
    cfg = TrainConfig.from_dict(loop_config["cfg"])
    _setup_worker_logging(cfg.verbose)
    events = EventSink(loop_config.get("events"), progress=cfg.progress == "on")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    mark("worker_entry", rank=rank, process_started=process_started())
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    else:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)

    record_placement(cfg, rank, world, events)
    split = discover(TrainConfig.from_dict({**loop_config["cfg"], "check_images": "none"}))
    bad = {p for p, _ in loop_config.get("bad_images", [])}
    split.train = [s for s in split.train if s[0] not in bad]
    split.val = [s for s in split.val if s[0] not in bad]
    train_loader, val_loader = build_loaders(split, cfg, rank, world, device.type == "cuda")
    mark("loaders_built", rank=rank)

    num_classes = len(split.classes)
    bare = build_model(cfg.model, num_classes, cfg.pretrained, int(cfg.channels or 3))
    head = find_head(bare, num_classes)
    restored = restore_latest(events, cfg)
    if restored is None and cfg.init_from:
        init_from_checkpoint(bare, cfg.init_from, head, split.classes)
    elif restored is not None:
        bare.load_state_dict(restored["state_dict"])
    if cfg.channels_last:
        bare = bare.to(memory_format=torch.channels_last)
    frozen = bool(restored["backbone_frozen"]) if restored is not None else cfg.freeze_backbone
    stage = _Stage(bare, head, cfg, frozen, _stage_epochs(cfg, frozen))
    use_amp = cfg.amp
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype(device) == torch.float16)
    history: list[dict[str, Any]] = []
    best_acc = -math.inf
    start_epoch = 0
    if restored is not None:
        stage.optimizer.load_state_dict(restored["optimizer"])
        stage.scheduler.load_state_dict(restored["scheduler"])
        scaler.load_state_dict(restored["scaler"])
        history = [dict(r) for r in restored.get("history", []) if r["epoch"] <= restored["epoch"]]
        best_acc = float(restored.get("best_val_acc", -math.inf))
        start_epoch = int(restored["epoch"]) + 1
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    eval_criterion = nn.CrossEntropyLoss()
    mark("model_built", rank=rank)
    normalize = DeviceNormalize(list(cfg.mean or []), list(cfg.std or [])) if device.type == "cuda" else None
    writer = None
    if is_main_process():
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(cfg.run_dir, exist_ok=True)
        writer = SummaryWriter(os.path.join(cfg.run_dir, "tb"), purge_step=start_epoch + 1 if start_epoch else None)
        message = (f"training {cfg.model} on {num_classes} classes: {world} worker(s) × batch "
                   f"{cfg.batch_size // world} = global batch {(cfg.batch_size // world) * world}, device {device.type}")
        _logger.info(message)
        events.send("info", message=message)

    for epoch in range(start_epoch, cfg.epochs):
        # The random streams depend on (seed, rank, epoch) only, so a resumed run draws what an
        # uninterrupted one would have drawn.
        torch.manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + rank)
        if frozen and cfg.unfreeze_at_epoch is not None and epoch == cfg.unfreeze_at_epoch:
            frozen = False
            stage = _Stage(ckpt.unwrap(stage.model), head, cfg, False, cfg.epochs - epoch)
            _logger.info("epoch %d: backbone unfrozen, training everything at lr %g", epoch + 1, cfg.finetune_lr)
        epoch_start = time.perf_counter()
        sampler = getattr(train_loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        lr = stage.optimizer.param_groups[0]["lr"]
        train = train_one_epoch(stage.model, train_loader, criterion, stage.optimizer, device, amp=use_amp,
                                scaler=scaler, channels_last=bool(cfg.channels_last),
                                progress=events.start_epoch(epoch, len(train_loader)), normalize=normalize)
        val = evaluate(stage.model, val_loader, eval_criterion, device, amp=use_amp,
                       channels_last=bool(cfg.channels_last))
        if isinstance(stage.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            stage.scheduler.step(val.loss)
        else:
            stage.scheduler.step()
        row = {"epoch": epoch, "train_loss": train.loss, "train_acc": train.accuracy, "val_loss": val.loss,
               "val_acc": val.accuracy, "lr": float(lr), "images_per_s": train.images / max(train.seconds, 1e-9),
               "seconds": time.perf_counter() - epoch_start}
        history.append(row)
        best_acc = max(best_acc, val.accuracy)
        _report(row, history, best_acc, stage, scaler, split, cfg, writer)
        events.send("epoch", row=row)
    mark("last_epoch_end", rank=rank)
    if writer is not None:
        writer.close()


def _report(row: dict[str, Any], history: list[dict[str, Any]], best_acc: float, stage: _Stage,
            scaler: torch.amp.GradScaler, split: DataSplit, cfg: TrainConfig, writer: Any) -> None:
    """Rank 0 writes the epoch's checkpoint, metrics.csv and TensorBoard scalars; every rank reports."""
    if not is_main_process():
        ray.train.report(dict(row))
        return
    _logger.info(format_epoch(row, cfg.epochs))
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s"):
        writer.add_scalar(key, row[key], row["epoch"] + 1)
    writer.flush()
    ckpt.write_metrics_csv(os.path.join(cfg.run_dir, "metrics.csv"), history)
    checkpoint = make_checkpoint(stage, scaler, split, cfg, row, history, best_acc)
    tmp = tempfile.mkdtemp(prefix="torchferry-ckpt-")
    try:
        ckpt.save_checkpoint(checkpoint, os.path.join(tmp, ckpt.CHECKPOINT_FILE), sidecar=True)
        ray.train.report(dict(row), checkpoint=ray.train.Checkpoint.from_directory(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_checkpoint(stage: _Stage, scaler: torch.amp.GradScaler, split: DataSplit, cfg: TrainConfig,
                    row: dict[str, Any], history: list[dict[str, Any]], best_acc: float) -> dict[str, Any]:
    """This epoch's checkpoint (docs/design.md), with the state --resume continues from."""
    return ckpt.build_checkpoint(stage.model, cfg, split.classes, epoch=row["epoch"], metrics=row, resume={
        "history": [dict(r) for r in history], "best_val_acc": float(best_acc), "backbone_frozen": bool(stage.frozen),
        "optimizer": stage.optimizer.state_dict(), "scheduler": stage.scheduler.state_dict(),
        "scaler": scaler.state_dict()})
