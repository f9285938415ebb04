"""Finishing a run: best.pth from the checkpoints Ray kept, metrics.csv and the pictures; and when training
failed, which worker failed and where the newest checkpoint is.

Ray loads only when a run finishes (`--help` imports this module).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, NamedTuple

from torchferry.distributed import TorchferryError
from torchferry.distributed.config import TrainConfig
from torchferry.distributed.timeline import mark

_logger = logging.getLogger(__name__)


class TrainingFailed(Exception):
    """Training started but did not finish; the message says what happened and where checkpoints are."""


def describe_failure(exc: BaseException) -> str:
    """Which worker failed and how, in one line (Ray's WorkerGroupError maps ranks to their errors).

    When a worker process died, the others fail next in a collective that lost its peer; the dead ranks
    are what the user needs to know, so they are named and the rest summarised.
    """
    failures = getattr(exc, "worker_failures", None) or {}
    if not failures:
        return _first_line(exc)
    died = sorted(rank for rank, error in failures.items()
                  if "process has died" in str(error) or "actor is dead" in str(error).lower())
    if died:
        others = sorted(set(failures) - set(died))
        return (", ".join(f"worker rank {r}" for r in died) + ": its process died (killed, out of memory or "
                "crashed)" + (f"; rank(s) {', '.join(map(str, others))} then failed with it" if others else ""))
    return "; ".join(f"worker rank {rank}: {_first_line(error)}" for rank, error in sorted(failures.items()))


def refused_input(exc: BaseException) -> TorchferryError | None:
    """The workers' own refusal of bad input (a checkpoint --resume would continue from, say) when that is why
    every failed worker failed, so that the command ends as for bad input (exit 2); None otherwise."""
    failures = getattr(exc, "worker_failures", None) or {}
    causes = [getattr(error, "_base_exc", error) for error in failures.values()]  # Ray keeps the worker's error
    if causes and all(isinstance(cause, TorchferryError) for cause in causes):
        return causes[0]
    return None


def latest_checkpoint_note(cfg: TrainConfig) -> str:
    """Where the newest checkpoint of the run is, and how to continue from it."""
    from torchferry.distributed.preflight import resume_command
    from torchferry.distributed.resume import checkpoint_dirs

    run_storage = os.path.join(cfg.storage_path, str(cfg.name))
    written = checkpoint_dirs(run_storage)
    if not written:
        return f"no checkpoint was written (storage: {run_storage})"
    return (f"the last checkpoint is {written[-1]}; continue with {resume_command(cfg)} "
            f"(--max-failures N retries automatically)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else type(exc).__name__


RESUME_ONLY_KEYS = ("optimizer", "scheduler", "scaler")


class UsableCheckpoint(NamedTuple):
    """A checkpoint of the run that loaded and matched its sidecar, and its task's best-metric value."""

    score: float
    epoch: int
    contents: dict[str, Any]


def finish(cfg: TrainConfig, result: Any, split: Any = None, pictures: list[threading.Thread] | None = None,
           ) -> dict[str, Any]:
    """Write the best usable checkpoint by the task's metric (val_acc, val_rmse), less its resume state, to
    runs/<name>/best.pth (atomic, sha256 sidecar); rewrite metrics.csv; draw the pictures when `split` is given.

    Ray's kept checkpoints are checked as they are read (sidecar, weights-only): a damaged one is passed
    over with a warning, so best.pth is always a checkpoint that loads. With a `pictures` list the pictures are
    drawn by a thread appended to it, which the caller joins (the launcher shuts Ray down meanwhile).
    """
    from torchferry.distributed import checkpoint as ckpt
    from torchferry.distributed.tasks import get_task

    task = get_task(cfg.task)
    usable = usable_checkpoints(cfg, result)
    if not usable:
        raise TrainingFailed(f"training finished without a usable checkpoint; {latest_checkpoint_note(cfg)}")
    sign = 1.0 if task.best_mode == "max" else -1.0
    best = max(usable, key=lambda u: (sign * u.score, -u.epoch)).contents  # the earliest epoch among equals
    latest = max(usable, key=lambda u: u.epoch).contents
    best_path = os.path.join(cfg.run_dir, "best.pth")
    # best.pth is for inference and fine-tuning: the optimizer, schedule and scaler state (as large as the
    # weights again with momentum) stays in the per-epoch checkpoints that --resume reads.
    ckpt.save_checkpoint({k: v for k, v in best.items() if k not in RESUME_ONLY_KEYS}, best_path, sidecar=True)
    ckpt.load_checkpoint(best_path)
    # Rank 0 wrote metrics.csv as it went; on several nodes it wrote it on its own node, so write it here too.
    history = latest.get("history", [])
    ckpt.write_metrics_csv(os.path.join(cfg.run_dir, "metrics.csv"), history, task.metric_columns)
    mark("best_written")
    if split is not None:
        if pictures is None:
            _pictures(task, cfg, best, history, split)
        else:
            pictures.append(threading.Thread(target=_pictures, args=(task, cfg, best, history, split),
                                             name="torchferry-pictures"))
            pictures[-1].start()
    value = best["metrics"][task.best_metric]
    return {"best": best_path, "epoch": best["epoch"], "metric": task.best_metric, task.best_metric: value,
            "value": value}


def usable_checkpoints(cfg: TrainConfig, result: Any) -> list[UsableCheckpoint]:
    """Every checkpoint of the run that loads: those Ray's `result` kept, and the run's other checkpoint
    folders on local or shared storage (Ray's record can lag the folders: a run stopped right after a
    checkpoint was written, then resumed)."""
    from torchferry.distributed import checkpoint as ckpt
    from torchferry.distributed.resume import checkpoint_dirs
    from torchferry.distributed.tasks import get_task

    metric = get_task(cfg.task).best_metric
    kept = [c for c, _ in (result.best_checkpoints or [])]
    if not kept and result.checkpoint is not None:
        kept = [result.checkpoint]
    loaded = []
    for checkpoint in kept:
        with checkpoint.as_directory() as d:
            loaded.append(_load_or_warn(os.path.join(d, ckpt.CHECKPOINT_FILE)))
    recorded = {os.path.abspath(c.path) for c in kept}
    for d in checkpoint_dirs(os.path.join(cfg.storage_path, str(cfg.name))):
        if os.path.abspath(d) not in recorded:
            loaded.append(_load_or_warn(os.path.join(d, ckpt.CHECKPOINT_FILE)))
    return [UsableCheckpoint(c["metrics"][metric], c["epoch"], c) for c in loaded
            if c is not None and metric in c["metrics"]]


def _load_or_warn(path: str) -> dict[str, Any] | None:
    """The checkpoint at `path`, or None with a warning when it is damaged."""
    from torchferry.distributed import checkpoint as ckpt

    try:
        return ckpt.load_checkpoint(path)
    except ckpt.CheckpointError as exc:
        _logger.warning("passing over a damaged checkpoint: %s", exc)
        return None


def _pictures(task: Any, cfg: TrainConfig, best: dict[str, Any], history: list[dict[str, Any]], split: Any) -> None:
    """The task's pictures (curves.png and val_predictions.png); a failure here is reported but never fails a
    finished run."""
    try:
        task.pictures(cfg, best, history, split)
    except Exception as exc:  # noqa: BLE001 - pictures are a convenience; the checkpoint is what matters
        _logger.warning("could not draw curves.png / val_predictions.png: %s", exc)
    mark("pictures_done")
