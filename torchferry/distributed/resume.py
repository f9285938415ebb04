"""Resuming a run: its checkpoint folders, the newest one that loads, and `--init-from`'s starting weights.

After a worker failure (Ray restarts the workers) or with `--resume`, every worker restores the newest
usable checkpoint of the run: each candidate is verified (sidecar, weights-only) and a damaged one is
passed over with a warning, so a run continues from what it can trust.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import ray.train
from torch import nn

from torchferry.distributed import checkpoint as ckpt
from torchferry.distributed.config import TrainConfig
from torchferry.distributed.events import EventSink
from torchferry.distributed.resume_check import resume_state_problem

_logger = logging.getLogger(__name__)


class Resumed(NamedTuple):
    """What a restored run had done: its metrics rows, the best value of its task's best metric and the epoch
    to go on with."""

    history: list[dict[str, Any]]
    best: float
    start_epoch: int


class Restorable(NamedTuple):
    """A checkpoint folder and the checkpoint in it, loaded and checked."""

    directory: str
    checkpoint: dict[str, Any]


def checkpoint_dirs(run_storage: str) -> list[str]:
    """The run's `checkpoint_*` folders on local or shared storage (empty for a remote URI or no folder)."""
    if "://" in run_storage or not os.path.isdir(run_storage):
        return []
    return sorted(os.path.join(run_storage, d) for d in os.listdir(run_storage)
                  if d.startswith("checkpoint_") and os.path.isdir(os.path.join(run_storage, d)))


def newest_usable(candidates: list[str], warn: Callable[[str], None]) -> Restorable | None:
    """The checkpoint of the highest epoch among `candidates` (folders) that loads and matches its sidecar.

    Every candidate is checked with `load_checkpoint`; a damaged one is passed over with a warning. Among
    equal epochs the earlier candidate wins. Only the winner stays in memory.
    """
    best: Restorable | None = None
    for directory in candidates:
        try:
            loaded = ckpt.load_checkpoint(os.path.join(directory, ckpt.CHECKPOINT_FILE))
        except ckpt.CheckpointError as exc:
            warn(f"checkpoint {directory} is unusable ({exc}); passing over it")
            continue
        if best is None or int(loaded["epoch"]) > int(best.checkpoint["epoch"]):
            best = Restorable(directory, loaded)
    return best


def restore_latest(events: EventSink, cfg: TrainConfig) -> Restorable | None:
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
    return Restorable(directory, restored)


def init_from_checkpoint(model: nn.Module, path: str, head: list[str],
                         outputs_match: Callable[[dict[str, Any]], bool]) -> None:
    """--init-from: start from another torchferry checkpoint's weights; a new head when `outputs_match` says
    its outputs (the classes) differ."""
    source = ckpt.load_checkpoint(path)
    state = dict(source["state_dict"])
    if not outputs_match(source):
        state = {k: v for k, v in state.items() if not any(k.startswith(h + ".") for h in head)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    foreign = [k for k in missing if not any(k.startswith(h + ".") for h in head)]
    if foreign or unexpected:
        raise ckpt.CheckpointError(f"--init-from {path}: its {source['arch']} weights do not fit this model "
                                   f"(missing {foreign[:3]}, unexpected {unexpected[:3]})")
    _logger.info("initialised from %s%s", path, "" if not missing else " with a new head for these classes")


def resume_state(task: Any, restored: dict[str, Any] | None, optimizer: Any, scheduler: Any, scaler: Any,
                 where: str = "the checkpoint") -> Resumed:
    """Load a restored checkpoint's optimizer, schedule and scaler state; what the run had done (nothing
    when there is no checkpoint to go on from). `task` says which metric is the best and which way. A state that
    does not fit these objects (`resume_check`) is refused with a CheckpointError naming `where`."""
    worst = -math.inf if task.best_mode == "max" else math.inf
    if restored is None:
        return Resumed([], worst, 0)
    problem = resume_state_problem(restored, optimizer, scheduler)
    if problem:
        raise ckpt.CheckpointError(f"--resume: {where} {problem}")
    optimizer.load_state_dict(restored["optimizer"])
    scheduler.load_state_dict(restored["scheduler"])
    if restored["scaler"]:  # empty: saved with AMP's scaling off; a run that scales starts from a fresh scale
        scaler.load_state_dict(restored["scaler"])
    history = [dict(r) for r in restored.get("history", []) if r["epoch"] <= restored["epoch"]]
    return Resumed(history, float(restored.get(f"best_{task.best_metric}", worst)), int(restored["epoch"]) + 1)


def check_resumable(cfg: TrainConfig, split: Any) -> None:
    """--resume, on the driver before Ray starts: the newest usable checkpoint of the run on local or shared
    storage has resume state that fits this run, as `resume_state` will check on every worker. The model is
    built on the meta device (no weights are made); a run whose checkpoints are on remote storage
    is checked by its workers alone. Raises CheckpointError naming the file."""
    import torch

    from torchferry.distributed.loop import build_stage_schedule, stage_epochs
    from torchferry.distributed.models import find_head, set_backbone_trainable
    from torchferry.distributed.tasks import get_task

    candidates = checkpoint_dirs(os.path.join(cfg.storage_path, str(cfg.name)))
    found = newest_usable(candidates, _logger.debug)  # the workers warn about the damaged ones
    if found is None:
        if candidates:
            raise ckpt.CheckpointError(f"--resume: no usable checkpoint in {os.path.dirname(candidates[0])}: "
                                       "every kept checkpoint is damaged")
        return
    where = os.path.join(found.directory, ckpt.CHECKPOINT_FILE)
    frozen = found.checkpoint.get("backbone_frozen")
    if not isinstance(frozen, bool):
        raise ckpt.CheckpointError(f"--resume: {where} lacks backbone_frozen, a resume state of true or false")
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pretrained weights copied onto meta tensors: a no-op
            bare = get_task(cfg.task).build_model(cfg, split)
    except Exception as exc:  # noqa: BLE001 - a factory of your own that cannot build on meta: the workers check
        _logger.debug("--resume: not checked on the driver (%s)", exc)
        return
    expected = {k: tuple(v.shape) for k, v in bare.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in found.checkpoint["state_dict"].items()}
    if got != expected:
        wrong = sorted(set(got) ^ set(expected)) or sorted(k for k in got if got[k] != expected[k])
        raise ckpt.CheckpointError(f"--resume: {where}'s weights do not fit this run's {cfg.model} "
                                   f"({wrong[0][:60]} differs)")
    set_backbone_trainable(bare, find_head(bare, len(getattr(split, "classes", ()))), not frozen)
    optimizer, scheduler = build_stage_schedule(bare, cfg, frozen, stage_epochs(cfg, frozen))
    problem = resume_state_problem(found.checkpoint, optimizer, scheduler)
    if problem:
        raise ckpt.CheckpointError(f"--resume: {where} {problem}")
