"""One epoch's work on one worker: `train_one_epoch` and `evaluate`, their figures summed over every worker.

The loss and the task's per-batch sums (`sums`: correct answers for a classifier, the default; errors for a
regression) are all-reduced over the process group, so the figures describe the whole data set, not rank 0's
shard; with no process group (a single process) they are this process's own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from torchferry.distributed.models import keep_frozen_norms_in_eval

AUX_LOSS_WEIGHT = 0.4  # torchvision's reference recipe for inception_v3's auxiliary head


def is_main_process() -> bool:
    """Rank 0 of the process group, or the only process when there is none."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


Sums = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def correct_answers(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A classifier's per-batch sum: [how many top-1 answers are right]."""
    return (logits.argmax(1) == target).sum().double().reshape(1)


@dataclass
class PhaseStats:
    """Figures over every worker for one phase of an epoch: the mean loss, the task's sums, the samples."""

    loss: float
    images: int
    seconds: float
    totals: list[float]

    @property
    def accuracy(self) -> float:
        """The first sum per sample: the accuracy, for a classifier's `correct_answers`."""
        return self.totals[0] / max(self.images, 1) if self.totals else 0.0


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
                    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    sums: Sums = correct_answers) -> PhaseStats:
    """One pass over this worker's shard; returns the loss and `sums` summed over all workers."""
    model.train()
    keep_frozen_norms_in_eval(model)  # --freeze-backbone: frozen BatchNorm keeps its running statistics
    dtype = amp_dtype(device)
    # Sums stay on the device: a `.item()` per step would make the CPU wait for the GPU every step.
    loss_sum, totals = _zeros(device), None
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
        totals = _add(totals, sums(logits.detach(), target))
        count += n
        if progress is not None:
            progress.update(1)
    local = _local(loss_sum, totals, sums, device)  # the epoch's one wait for the device
    seconds = time.perf_counter() - start
    loss_sum, *reduced, count, seconds = _all_reduce_sums([*local, count, seconds], device)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return PhaseStats(loss_sum / max(count, 1), int(count), seconds / world, reduced)


def _add(totals: torch.Tensor | None, batch: torch.Tensor) -> torch.Tensor:
    return batch.double() if totals is None else totals + batch.double()


def _local(loss_sum: torch.Tensor, totals: torch.Tensor | None, sums: Sums, device: torch.device) -> list[float]:
    """[loss sum, *task sums] of this worker; a worker with an empty shard has zeros of the same length."""
    if totals is None:  # every rank must all-reduce as many numbers
        totals = torch.zeros(_sums_length(sums), dtype=torch.float64, device=device)
    return torch.cat([loss_sum.reshape(1), totals]).tolist()


def _sums_length(sums: Sums) -> int:
    """How many numbers `sums` gives: a task's `sums_length` for its bound `batch_sums`, else 1."""
    return int(getattr(getattr(sums, "__self__", None), "sums_length", 1))


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, criterion: nn.Module, device: torch.device, *,
             amp: bool = False, channels_last: bool = False, sums: Sums = correct_answers) -> PhaseStats:
    """The loss and `sums` over every worker's validation shard, summed with all-reduce."""
    model.eval()
    dtype = amp_dtype(device)
    loss_sum, totals = _zeros(device), None
    count = 0
    start = time.perf_counter()
    for images, target in loader:
        images, target = _to_device(images, target, device, channels_last)
        with _autocast(device, amp, dtype):
            logits = model(images)
            loss = criterion(logits.float(), target)
        n = target.shape[0]
        loss_sum += loss.double() * n
        totals = _add(totals, sums(logits.float(), target))
        count += n
    local = _local(loss_sum, totals, sums, device)
    seconds = time.perf_counter() - start
    loss_sum, *reduced, count = _all_reduce_sums([*local, count], device)
    return PhaseStats(loss_sum / max(count, 1), int(count), seconds, reduced)
