"""distributed/finish.py without Ray: best.pth and metrics.csv from the checkpoint folders a run left, and the
one line a failed run ends with."""

from __future__ import annotations

import csv
import types
from pathlib import Path

import pytest

from torchferry.distributed import checkpoint as ckpt
from torchferry.distributed.config import TrainConfig
from torchferry.distributed.finish import TrainingFailed, describe_failure, finish, latest_checkpoint_note

NO_RAY_RECORD = types.SimpleNamespace(best_checkpoints=[], checkpoint=None)  # Ray's record lags the folders


def _row(epoch: int, val_acc: float) -> dict[str, float]:
    return {"epoch": epoch, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.0, "val_acc": val_acc, "lr": 0.1,
            "images_per_s": 10.0, "seconds": 1.0}


def _epoch_checkpoints(storage: Path, base: dict, accuracies: list[float]) -> None:
    """checkpoint_00000N/checkpoint.pth per epoch, as the workers write them (with resume state and history)."""
    rows = [_row(e, acc) for e, acc in enumerate(accuracies)]
    for epoch, acc in enumerate(accuracies):
        c = {**base, "epoch": epoch, "metrics": {**base["metrics"], "val_acc": acc}, "history": rows[:epoch + 1],
             "optimizer": {"state": {}, "param_groups": []}}
        path = storage / f"checkpoint_{epoch:06d}" / ckpt.CHECKPOINT_FILE
        path.parent.mkdir(parents=True)
        ckpt.save_checkpoint(c, str(path), sidecar=True)


def test_best_is_the_most_accurate_usable_checkpoint_earliest_among_equals(small_checkpoint: dict, tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    base = ckpt.load_checkpoint(str(small_checkpoint["checkpoint"]))
    cfg = TrainConfig(output_dir=str(tmp_path / "runs"), name="r")
    storage = tmp_path / "runs" / "r"
    _epoch_checkpoints(storage, base, [0.5, 0.9, 0.9, 0.95])
    damaged = storage / "checkpoint_000003" / ckpt.CHECKPOINT_FILE  # the most accurate one, cut short
    damaged.write_bytes(damaged.read_bytes()[:100])
    summary = finish(cfg, NO_RAY_RECORD)
    assert (summary["epoch"], summary["val_acc"]) == (1, 0.9) and summary["best"] == str(storage / "best.pth")
    best = ckpt.load_checkpoint(summary["best"])  # and its sidecar
    assert best["epoch"] == 1 and not {"optimizer", "scheduler", "scaler"} & set(best)
    assert "passing over a damaged checkpoint" in caplog.text
    with open(storage / "metrics.csv", newline="") as f:  # the newest usable checkpoint's history
        assert [float(r["val_acc"]) for r in csv.DictReader(f)] == [0.5, 0.9, 0.9]
    assert "the last checkpoint is " + str(storage / "checkpoint_000003") in latest_checkpoint_note(cfg)
    assert "--resume --name r" in latest_checkpoint_note(cfg)


def test_a_run_without_a_usable_checkpoint_fails_saying_so(tmp_path: Path) -> None:
    cfg = TrainConfig(output_dir=str(tmp_path / "runs"), name="r")
    with pytest.raises(TrainingFailed, match="without a usable checkpoint; no checkpoint was written"):
        finish(cfg, NO_RAY_RECORD)
    assert not (tmp_path / "runs" / "r" / "best.pth").exists()


def test_a_dead_worker_is_named_and_the_others_summarised() -> None:
    exc = RuntimeError("training failed")
    exc.worker_failures = {1: RuntimeError("The actor is dead because its worker process has died."),  # type: ignore[attr-defined]
                           0: RuntimeError("Connection closed by peer\ngloo: peer 1 gone")}
    assert describe_failure(exc) == ("worker rank 1: its process died (killed, out of memory or crashed); "
                                     "rank(s) 0 then failed with it")
    assert describe_failure(RuntimeError("first\nlast line")) == "last line"


def test_the_pictures_can_be_drawn_by_a_thread_the_caller_joins(small_checkpoint: dict, tmp_path: Path) -> None:
    """The launcher draws the pictures while Ray shuts down: finish starts them in a thread it hands back."""
    from torchferry.distributed.data import discover

    base = ckpt.load_checkpoint(str(small_checkpoint["checkpoint"]))
    cfg = TrainConfig(output_dir=str(tmp_path / "runs"), name="r", data=str(small_checkpoint["data"]))
    _epoch_checkpoints(tmp_path / "runs" / "r", base, [0.5, 0.9])
    pictures: list = []
    summary = finish(cfg, NO_RAY_RECORD, discover(cfg), pictures=pictures)
    assert summary["epoch"] == 1 and len(pictures) == 1
    pictures[0].join(timeout=120)
    assert not pictures[0].is_alive()
    for name in ("curves.png", "val_predictions.png"):
        assert (tmp_path / "runs" / "r" / name).read_bytes().startswith(b"\x89PNG"), name
