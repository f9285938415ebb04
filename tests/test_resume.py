"""--resume and a run folder's checkpoints: a resume state that does not fit the run is refused before Ray starts."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from torchferry.distributed import checkpoint as ckpt
from torchferry.distributed import launch
from torchferry.distributed.config import TrainConfig

SCHEDULES = [("cosine", 1), ("multistep", 0), ("plateau", 0)]


def _epoch_checkpoint(cfg: TrainConfig, split: Any, *, steps: int = 1) -> dict[str, Any]:
    """What a worker's checkpoint of the first epoch holds, resume state and all (made here, without Ray)."""
    from torchferry.distributed.loop import build_optimizer, build_scheduler
    from torchferry.distributed.tasks import get_task

    task = get_task(cfg.task)
    torch.manual_seed(0)
    model = task.build_model(cfg, split)
    optimizer = build_optimizer(model.parameters(), cfg, cfg.lr)
    scheduler = build_scheduler(optimizer, cfg, cfg.epochs)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
        scheduler.step(1.0) if cfg.lr_scheduler == "plateau" else scheduler.step()
    row = {"epoch": 0, "val_acc": 0.5, "val_loss": 1.0, "train_loss": 1.0, "train_acc": 0.5}
    return ckpt.build_checkpoint(model, cfg, fields=task.checkpoint_fields(split, cfg), epoch=0, metrics=row, resume={
        "history": [row], "best_val_acc": 0.5, "backbone_frozen": False, "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict()})


def _run_folder(flat_folder: Path, tmp_path: Path, schedule: str = "cosine", warmup: int = 1) -> tuple[Path, dict]:
    """runs/r as a stopped run leaves it: config.json and one epoch's checkpoint folder."""
    from torchferry.distributed.preflight import prepare

    runs = tmp_path / "runs"
    saved = TrainConfig(data=str(flat_folder), name="r", output_dir=str(runs), image_size=16, epochs=3, gpus=0,
                        workers=2, lr_scheduler=schedule, lr_warmup_epochs=warmup,
                        lr_milestones=[2] if schedule == "multistep" else [])
    (runs / "r").mkdir(parents=True)
    (runs / "r" / "config.json").write_text(json.dumps(saved.to_dict()))
    cfg, split = prepare(TrainConfig(resume=True, name="r", output_dir=str(runs), gpus=0, workers=2))
    checkpoint = _epoch_checkpoint(cfg, split)
    _write(runs, checkpoint)
    return runs, checkpoint


def _write(runs: Path, checkpoint: dict[str, Any]) -> Path:
    path = runs / "r" / "checkpoint_000000" / ckpt.CHECKPOINT_FILE
    path.parent.mkdir(exist_ok=True)
    ckpt.save_checkpoint(checkpoint, str(path), sidecar=True)
    return path


def _no_ray(*_: Any) -> None:
    raise AssertionError("Ray was started for a checkpoint the driver can refuse")


HOSTILE: list[tuple[str, Callable[[dict], Any], str]] = [
    ("a schedule taking the optimizer's place", lambda c: c["scheduler"].update(optimizer={}), "scheduler state"),
    ("a schedule's list a million long", lambda c: c["scheduler"].update(_last_lr=[0.1] * 1_000_000),
     "_last_lr must be a list of 1, got 1000000 long"),
    ("a schedule's counter as text", lambda c: c["scheduler"].update(last_epoch="1"), "last_epoch must be a number"),
    ("a schedule's huge counter", lambda c: c["scheduler"].update(last_epoch=10**400), "last_epoch must be a number"),
    ("a schedule without its schedules", lambda c: c["scheduler"].pop("_schedulers"), "has the keys"),
    ("a momentum buffer of the wrong shape", lambda c: c["optimizer"]["state"][0].update(momentum_buffer=torch.zeros(7)),
     "state.0.momentum_buffer is a torch.float32 tensor of [7]"),
    ("an optimizer naming a parameter it lacks", lambda c: c["optimizer"]["state"].update({10**6: {}}),
     "parameters to their tensors"),
    ("a parameter group too many", lambda c: c["optimizer"]["param_groups"].append(c["optimizer"]["param_groups"][0]),
     "param_groups must be a list of 1, got 2 long"),
    ("a learning rate as text", lambda c: c["optimizer"]["param_groups"][0].update(lr="0.1"), "lr must be a number"),
    ("a scaler of text", lambda c: c.update(scaler={"scale": "big"}), "scaler state"),
    ("no optimizer state", lambda c: c.pop("optimizer"), "lacks the resume state ['optimizer']"),
    ("weights of another model", lambda c: c["state_dict"].update({"fc.weight": torch.zeros(3, 5)}), "do not fit"),
]


@pytest.mark.parametrize("what,change,reason", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_a_resume_state_that_does_not_fit_the_run_is_refused_before_ray_starts(
        what: str, change: Callable[[dict], Any], reason: str, flat_folder: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit 2 and one line naming the checkpoint file and what is wrong; Ray never starts."""
    runs, checkpoint = _run_folder(flat_folder, tmp_path)
    change(checkpoint)
    path = _write(runs, checkpoint)
    monkeypatch.setattr(launch, "start_ray", _no_ray)
    code = launch.main(["--resume", "--name", "r", "--output-dir", str(runs), "--gpus", "0", "--workers", "2"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and str(path) in lines[0] and reason in lines[0], lines


@pytest.mark.parametrize("schedule,warmup", SCHEDULES)
def test_a_run_s_own_resume_state_fits_on_the_driver_and_the_workers(schedule: str, warmup: int, flat_folder: Path,
                                                                     tmp_path: Path) -> None:
    """The checks pass what a run itself wrote, every schedule, and a worker restores it as torch would."""
    from torchferry.distributed.loop import build_stage_schedule, stage_epochs
    from torchferry.distributed.preflight import prepare
    from torchferry.distributed.resume import resume_state
    from torchferry.distributed.tasks import get_task

    runs, checkpoint = _run_folder(flat_folder, tmp_path, schedule, warmup)
    cfg, split = prepare(TrainConfig(resume=True, name="r", output_dir=str(runs), gpus=0, workers=2))
    model = get_task(cfg.task).build_model(cfg, split)
    optimizer, scheduler = build_stage_schedule(model, cfg, False, stage_epochs(cfg, False))
    past = resume_state(get_task(cfg.task), checkpoint, optimizer, scheduler, torch.amp.GradScaler("cpu"))
    assert past.start_epoch == 1 and past.best == 0.5
    assert scheduler.state_dict() == checkpoint["scheduler"]
    assert optimizer.state_dict()["param_groups"] == checkpoint["optimizer"]["param_groups"]
    checkpoint["scheduler"].pop("last_epoch")  # a plain value an older torch may not have saved
    optimizer, scheduler = build_stage_schedule(model, cfg, False, stage_epochs(cfg, False))
    resume_state(get_task(cfg.task), checkpoint, optimizer, scheduler, torch.amp.GradScaler("cpu"))


def test_a_worker_refuses_a_resume_state_that_does_not_fit(flat_folder: Path, tmp_path: Path) -> None:
    """Checkpoints on remote storage are read by the workers alone: they refuse it with the same line."""
    from torchferry.distributed.loop import build_stage_schedule
    from torchferry.distributed.preflight import prepare
    from torchferry.distributed.resume import resume_state
    from torchferry.distributed.tasks import get_task

    runs, checkpoint = _run_folder(flat_folder, tmp_path)
    cfg, split = prepare(TrainConfig(resume=True, name="r", output_dir=str(runs), gpus=0, workers=2))
    optimizer, scheduler = build_stage_schedule(get_task(cfg.task).build_model(cfg, split), cfg, False, 3)
    checkpoint["scheduler"]["_schedulers"][0]["base_lrs"] = list(range(10**6))
    with pytest.raises(ckpt.CheckpointError, match=r"^--resume: s3://b/r/checkpoint\.pth its scheduler state does "
                                                   r"not fit this run \(_schedulers\[0\]\.base_lrs must be a list of 1"):
        resume_state(get_task(cfg.task), checkpoint, optimizer, scheduler, torch.amp.GradScaler("cpu"),
                     "s3://b/r/checkpoint.pth")
    assert scheduler.state_dict()["_schedulers"][0]["base_lrs"] == [cfg.lr]  # nothing loaded


def test_a_workers_refusal_of_a_checkpoint_ends_the_command_as_bad_input() -> None:
    """When every failed worker refused its checkpoint, the driver raises that refusal (exit 2), not a failure."""
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    from torchferry.distributed.finish import refused_input

    refusal = ckpt.CheckpointError("--resume: s3://b/r/checkpoint.pth its scheduler state does not fit this run")
    both = WorkerGroupError("2 workers failed", {r: UserExceptionWithTraceback(refusal, "Traceback ...") for r in (0, 1)})
    assert refused_input(both) is refusal
    crashed = WorkerGroupError("2 workers failed", {0: UserExceptionWithTraceback(refusal, "Traceback ..."),
                                                    1: UserExceptionWithTraceback(RuntimeError("oom"), "Traceback")})
    assert refused_input(crashed) is None and refused_input(RuntimeError("x")) is None
