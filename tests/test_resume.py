"""--resume and a run folder's checkpoints: a resume state that does not fit the run is refused before Ray starts."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from torchferry.distributed import checkpoint as ckpt
from torchferry.distributed import launch
from torchferry.distributed.config import TrainConfig

SCHEDULES = [("cosine", 1, "sgd"), ("multistep", 0, "sgd"), ("plateau", 0, "sgd"), ("step", 1, "adam")]


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


def _run_folder(flat_folder: Path, tmp_path: Path, schedule: str = "cosine", warmup: int = 1,
                opt: str = "sgd") -> tuple[Path, dict]:
    """runs/r as a stopped run leaves it: config.json and one epoch's checkpoint folder."""
    from torchferry.distributed.preflight import prepare

    runs = tmp_path / "runs"
    saved = TrainConfig(data=str(flat_folder), name="r", output_dir=str(runs), image_size=16, epochs=3, gpus=0,
                        workers=2, lr_scheduler=schedule, lr_warmup_epochs=warmup, opt=opt,
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


def _buffer(c: dict[str, Any], make: Callable[[torch.Tensor], Any], name: str = "momentum_buffer") -> None:
    """Parameter 0's buffer `name` made from the honest one."""
    state = c["optimizer"]["state"][0]
    state[name] = make(state[name])


def _group(c: dict[str, Any]) -> dict[str, Any]:
    return c["optimizer"]["param_groups"][0]


def _main_schedule(c: dict[str, Any]) -> dict[str, Any]:
    """The schedule after the warm-up in a SequentialLR's state."""
    return c["scheduler"]["_schedulers"][1]


def _scaler(**change: Any) -> dict[str, Any]:
    """A GradScaler's state with AMP's scaling on, changed."""
    return {**torch.amp.GradScaler("cpu").state_dict(), **change}


SGD_COSINE = {"schedule": "cosine", "warmup": 1, "opt": "sgd"}
# Each of these passed the checks of kind (keys, kinds, lengths, shapes) and then crashed, hung or quietly spoiled
# a worker's run: every setting must now equal the run's own, every counter and rate be one a run can reach.
HOSTILE_MEANING: list[tuple[str, dict[str, Any], Callable[[dict], Any], str]] = [
    ("parameter ids in another order", SGD_COSINE, lambda c: _group(c).update(params=_group(c)["params"][::-1]),
     "param_groups[0].params must be [0, 1"),
    ("a group without its momentum", SGD_COSINE, lambda c: _group(c).pop("momentum"), "lacks 'momentum'"),
    ("a weight decay not the run's", SGD_COSINE, lambda c: _group(c).update(weight_decay=1e9), "weight_decay must be"),
    ("a learning rate of NaN", SGD_COSINE, lambda c: _group(c).update(lr=math.nan), "lr must be a finite learning"),
    ("a number for a momentum buffer", SGD_COSINE, lambda c: _buffer(c, lambda b: 3.0),
     "state.0.momentum_buffer is a float"),
    ("a ()-shaped momentum buffer", SGD_COSINE, lambda c: _buffer(c, lambda b: torch.tensor(1.0)),
     "state.0.momentum_buffer is a torch.float32 tensor of []"),
    ("an expanded momentum buffer", SGD_COSINE, lambda c: _buffer(c, lambda b: torch.zeros(1).expand(b.shape)),
     "state.0.momentum_buffer must be a dense tensor with a storage of its own"),
    ("a sparse momentum buffer", SGD_COSINE, lambda c: _buffer(c, lambda b: b.to_sparse()),
     "state.0.momentum_buffer must be a dense tensor"),
    ("a momentum buffer viewing a huge storage", SGD_COSINE,
     lambda c: _buffer(c, lambda b: torch.zeros(b.numel() + 2**20)[:b.numel()].view(b.shape)),
     "state.0.momentum_buffer must be a dense tensor with a storage of its own"),
    ("an Adam average of a plain number", {"schedule": "cosine", "warmup": 1, "opt": "adam"},
     lambda c: _buffer(c, lambda b: 3.0, "exp_avg"), "state.0.exp_avg is a float"),
    ("an Adam state without its second moment", {"schedule": "cosine", "warmup": 1, "opt": "adamw"},
     lambda c: c["optimizer"]["state"][0].pop("exp_avg_sq"), "state of parameter 0 must map all of"),
    ("an Adam step of -1", {"schedule": "cosine", "warmup": 1, "opt": "adam"},
     lambda c: _buffer(c, lambda b: torch.tensor(-1.0), "step"), "state.0.step must be a count from 0"),
    ("a cosine schedule's T_max of 0", SGD_COSINE, lambda c: _main_schedule(c).update(T_max=0),
     "_schedulers[1].T_max must be 2 as this run's schedule has it"),
    ("a warm-up's start factor of 0", SGD_COSINE, lambda c: c["scheduler"]["_schedulers"][0].update(start_factor=0.0),
     "_schedulers[0].start_factor must be"),
    ("a step schedule's step size of 0", {"schedule": "step", "warmup": 1, "opt": "sgd"},
     lambda c: _main_schedule(c).update(step_size=0), "_schedulers[1].step_size must be"),
    ("a milestone counted 2**53 times", {"schedule": "multistep", "warmup": 1, "opt": "sgd"},
     lambda c: _main_schedule(c).update(milestones=Counter({1: 2**53})), "_schedulers[1].milestones must be Counter"),
    ("a plateau's factor above 1", {"schedule": "plateau", "warmup": 0, "opt": "sgd"},
     lambda c: c["scheduler"].update(factor=2.0), "factor must be"),
    ("a plateau's best of NaN", {"schedule": "plateau", "warmup": 0, "opt": "sgd"},
     lambda c: c["scheduler"].update(best=math.nan), "best must be a number or infinite"),
    ("a negative schedule counter", SGD_COSINE, lambda c: c["scheduler"].update(last_epoch=-5),
     "last_epoch must be a count from 0"),
    ("a scaler's scale of NaN", SGD_COSINE, lambda c: c.update(scaler=_scaler(scale=math.nan)), "scale must be"),
    ("a scaler's scale of 0", SGD_COSINE, lambda c: c.update(scaler=_scaler(scale=0.0)), "scale must be"),
    ("a scaler's growth interval of 0", SGD_COSINE, lambda c: c.update(scaler=_scaler(growth_interval=0)),
     "growth_interval must be 2000"),
]


CASES = [(what, SGD_COSINE, change, reason) for what, change, reason in HOSTILE] + HOSTILE_MEANING


@pytest.mark.parametrize("what,run,change,reason", CASES, ids=[h[0] for h in CASES])
def test_a_resume_state_that_does_not_fit_the_run_is_refused_before_ray_starts(
        what: str, run: dict[str, Any], change: Callable[[dict], Any], reason: str, flat_folder: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit 2 and one line naming the checkpoint file and what is wrong; Ray never starts."""
    runs, checkpoint = _run_folder(flat_folder, tmp_path, **run)
    change(checkpoint)
    path = _write(runs, checkpoint)
    monkeypatch.setattr(launch, "start_ray", _no_ray)
    code = launch.main(["--resume", "--name", "r", "--output-dir", str(runs), "--gpus", "0", "--workers", "2"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and str(path) in lines[0] and reason in lines[0], lines


@pytest.mark.parametrize("schedule,warmup,opt", SCHEDULES)
def test_a_run_s_own_resume_state_fits_on_the_driver_and_the_workers(schedule: str, warmup: int, opt: str,
                                                                     flat_folder: Path, tmp_path: Path) -> None:
    """The checks pass what a run itself wrote, every schedule, and a worker restores it as torch would; what a
    resumed run writes after another epoch passes too."""
    from torchferry.distributed.loop import build_stage_schedule, stage_epochs
    from torchferry.distributed.preflight import prepare
    from torchferry.distributed.resume import resume_state
    from torchferry.distributed.resume_check import resume_state_problem
    from torchferry.distributed.tasks import get_task

    runs, checkpoint = _run_folder(flat_folder, tmp_path, schedule, warmup, opt)
    cfg, split = prepare(TrainConfig(resume=True, name="r", output_dir=str(runs), gpus=0, workers=2))
    model = get_task(cfg.task).build_model(cfg, split)
    optimizer, scheduler = build_stage_schedule(model, cfg, False, stage_epochs(cfg, False))
    past = resume_state(get_task(cfg.task), checkpoint, optimizer, scheduler, torch.amp.GradScaler("cpu"))
    assert past.start_epoch == 1 and past.best == 0.5
    assert scheduler.state_dict() == checkpoint["scheduler"]
    assert optimizer.state_dict()["param_groups"] == checkpoint["optimizer"]["param_groups"]
    for p in model.parameters():  # the resumed run's next epoch, and the checkpoint it writes
        p.grad = torch.ones_like(p)
    optimizer.step()
    scheduler.step(2.0) if schedule == "plateau" else scheduler.step()
    later = {**checkpoint, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    assert later["scheduler"]["last_epoch"] == checkpoint["scheduler"]["last_epoch"] + 1
    assert resume_state_problem(later, *build_stage_schedule(model, cfg, False, stage_epochs(cfg, False))) is None
    checkpoint["scheduler"].pop("last_epoch")  # a plain value an older torch may not have saved
    optimizer, scheduler = build_stage_schedule(model, cfg, False, stage_epochs(cfg, False))
    resume_state(get_task(cfg.task), checkpoint, optimizer, scheduler, torch.amp.GradScaler("cpu"))


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_a_channels_last_run_s_own_buffers_fit(opt: str) -> None:
    """A --channels-last run's convolution weights are channels-last, and so are their buffers: dense, not
    contiguous; they pass, and a buffer of another layout of the same storage size (a transposed one) does not."""
    from torchferry.distributed.loop import build_optimizer
    from torchferry.distributed.resume_check import optimizer_problem

    def built() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4, 2)).to(
            memory_format=torch.channels_last)
        return model, build_optimizer(model.parameters(), TrainConfig(data=".", opt=opt), 0.1)

    model, optimizer = built()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    state = optimizer.state_dict()
    buffer = "momentum_buffer" if opt == "sgd" else "exp_avg"
    assert not state["state"][0][buffer].is_contiguous()
    assert optimizer_problem(built()[1], state) is None
    state["state"][0][buffer] = state["state"][0][buffer].transpose(0, 1).contiguous().transpose(0, 1)
    assert "must be a dense tensor" in str(optimizer_problem(built()[1], state))


def test_an_amp_scaler_s_own_state_fits() -> None:
    """A GradScaler's state with AMP's scaling on passes as it starts and as it has moved on."""
    from torchferry.distributed.resume_check import scaler_problem

    scaler = torch.amp.GradScaler("cpu")
    assert scaler_problem(scaler.state_dict()) is None
    scaler.scale(torch.ones(()))
    scaler.update(new_scale=0.5)
    assert scaler_problem({**scaler.state_dict(), "_growth_tracker": 1999}) is None
    assert scaler_problem({**scaler.state_dict(), "_growth_tracker": 2001}) is not None


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
