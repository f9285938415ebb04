"""Pre-flight: everything about a run that can fail on bad input, checked on the driver before Ray starts.

Flags, the data, the model and its pretrained weights, `--resume`'s saved configuration and the run
folder are checked here, so that a mistake costs seconds and one line, not a hang on a cluster. The model
is built and run once on a batch of 2 (`fit_model_to_input`), which also settles the defaults it can take.
Torch loads only when a check needs it (`--help` imports this module).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import sys
from typing import Any

from torchferry.distributed import TorchferryError
from torchferry.distributed.config import (
    TrainConfig,
    absolute_path,
    absolute_paths,
    data_set_key,
    default_cache_dir,
    fit_to_images,
    resolve_defaults,
    validate_flags,
)

_logger = logging.getLogger(__name__)


def prepare(cfg: TrainConfig) -> tuple[TrainConfig, Any]:
    """Validate flags, find and check the data, resolve defaults, build the model and run it once (the run's
    task does the last three: `Task.prepare`); all before Ray."""
    from torchferry.distributed.models import is_custom
    from torchferry.distributed.tasks import get_task

    validate_flags(cfg)
    if cfg.resume:
        cfg = resumed_config(cfg)
    if cfg.lr_scheduler == "plateau" and cfg.lr_warmup_epochs:
        raise TorchferryError("--lr-warmup-epochs does not combine with --lr-scheduler plateau")
    cfg = absolute_paths(cfg)
    cfg, split = get_task(cfg.task).prepare(cfg)
    if cfg.resume:
        from torchferry.distributed.resume import check_resumable

        check_resumable(cfg, split)  # the checkpoint it would continue from, refused here and not on the workers
    if cfg.progress == "auto":
        cfg.progress = "on" if sys.stderr.isatty() else "off"
    if cfg.init_from:
        from torchferry.distributed.checkpoint import load_checkpoint

        source = load_checkpoint(cfg.init_from)  # refused here, before Ray, if missing or damaged
        if is_custom(source["arch"]) and source["arch"] != cfg.model:
            raise TorchferryError(f"--init-from {cfg.init_from}: its model is the factory {source['arch']!r}, which "
                                  f"a checkpoint cannot choose to run; train it with --model {source['arch']}")
    return cfg, split


def fit_model_to_input(cfg: TrainConfig, weights: dict[str, Any] | None, split: Any) -> TrainConfig:
    """Resolve the defaults and prove the model takes them: one forward pass of a batch of 2 on the driver.

    Defaults chosen from the images (`fit_to_images`) are tried first; when the model cannot take them
    (a 3-channel model of your own on grayscale images, vit_b_16 and its fixed 224 px), the next candidate
    is tried: 3 channels, then the plain defaults. What the user asked for explicitly is never changed: a
    mismatch then ends the command with one line naming the flag to change.
    """
    fitted, note = fit_to_images(cfg, split.profile, weights)
    candidates = [resolve_defaults(cfg, weights, split.profile)]
    if cfg.channels is None and fitted.channels == 1:
        candidates.append(resolve_defaults(dataclasses.replace(cfg, channels=3), weights, split.profile))
    candidates.append(resolve_defaults(cfg, weights))
    native = native_image_size(cfg.model)
    if cfg.image_size is None and native and native != candidates[-1].image_size:
        candidates.append(resolve_defaults(dataclasses.replace(cfg, image_size=native), weights))  # inception: 299
    models: dict[int, Any] = {}
    first_error = None
    for i, candidate in enumerate(candidates):
        if i and candidate.to_dict() == candidates[i - 1].to_dict():
            continue
        channels = int(candidate.channels or 3)
        if channels not in models:
            models[channels] = build_checked_model(candidate, len(split.classes))
        problem = forward_problem(models[channels], candidate, len(split.classes))
        if problem is None:
            if i == 0 and note:
                _logger.info(note)
            elif i:
                _logger.info("not the defaults the images suggest (%s); training with --channels %d --image-size %d",
                             first_error, channels, candidate.image_size)
            return candidate
        first_error = first_error or problem
    raise TorchferryError(first_error)


def native_image_size(arch: str) -> int | None:
    """The input size a torchvision model's default weights were trained at (299 for inception_v3), else None."""
    from torchferry.distributed.models import is_custom

    if arch == "smallcnn" or is_custom(arch):
        return None
    from torchvision.models import get_model_weights

    try:
        return int(get_model_weights(arch).DEFAULT.transforms().crop_size[0])
    except (ValueError, KeyError, AttributeError, IndexError):  # a model without published weights
        return None


def build_checked_model(cfg: TrainConfig, num_classes: int) -> Any:
    """build_model on the driver, so that unknown names, factories and weights fail here."""
    from torchferry.distributed.models import build_model

    return build_model(cfg.model, num_classes, cfg.pretrained, int(cfg.channels or 3))


def forward_problem(model: Any, cfg: TrainConfig, num_classes: int) -> str | None:
    """None when `model` turns a batch of 2 inputs as configured into [2, num_classes] logits; else one line
    that names the flag to change."""
    import re

    import torch

    channels, size = int(cfg.channels or 3), int(cfg.image_size or 224)
    shape = f"[2, {channels}, {size}, {size}]"
    model.train()  # the mode the first training step runs in (inception's auxiliary heads included)
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, channels, size, size))
    except Exception as exc:  # noqa: BLE001 - any failure here is the model refusing this input
        text = str(exc)
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)[:200]
        wants = re.search(r"to have (\d+) channels", text)
        if wants and int(wants.group(1)) != channels:
            fix = f"pass --channels {wants.group(1)}"
        elif (m := re.search(r"[Ee]xpected (\d+) but got (\d+)", text)) and int(m.group(2)) == size:
            fix = f"pass --image-size {m.group(1)}"
        elif (native := native_image_size(cfg.model)) and native != size:
            fix = f"pass --image-size {native} (the size its pretrained weights use)"
        else:
            fix = f"change --image-size (now {size}) or --channels (now {channels})"
        return f"--model {cfg.model} does not take a batch of {shape} inputs ({first}); {fix}"
    logits = out if isinstance(out, torch.Tensor) else out[0]
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, num_classes):
        got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        return (f"--model {cfg.model} returns {got} for a batch of {shape} inputs; a classifier must return "
                f"[batch, {num_classes}] logits, one per class")
    return None


# What --resume takes from this command, not from the run's config.json: the cluster and console flags, and every
# place something is written (--output-dir and --name, where the config was found; --storage, the digits cache,
# --download into a data set's root).
RESUME_OVERRIDES = ("address", "max_failures", "progress", "verbose", "debug", "resource_check", "output_dir",
                    "name", "storage", "cache_dir", "download")


def resume_command(cfg: TrainConfig) -> str:
    """The command that continues the run `cfg` describes, its --storage and a --cache-dir other than the default
    named again (`resumed_config`)."""
    args = ["python", "-m", "distributed.launch", "--resume", "--name", str(cfg.name), "--output-dir", cfg.output_dir]
    if cfg.storage:
        args += ["--storage", cfg.storage]
    if data_set_key(cfg.data) == "digits" and absolute_path(cfg.cache_dir) != absolute_path(default_cache_dir()):
        args += ["--cache-dir", cfg.cache_dir]
    return shlex.join(args)


def resumed_config(cfg: TrainConfig) -> TrainConfig:
    """--resume: the run's saved configuration, with this command's cluster and console flags."""
    from torchferry.distributed.models import is_custom, require_trusted_arch

    path = os.path.join(os.path.abspath(cfg.output_dir), str(cfg.name), "config.json")
    if not os.path.isfile(path):
        raise TorchferryError(f"--resume: {path} does not exist, so there is no run {cfg.name!r} to continue")
    try:
        with open(path, encoding="utf-8") as f:
            saved = TrainConfig.from_dict(json.load(f))
    except (ValueError, TypeError, AttributeError) as exc:  # not JSON, or not a mapping of config keys
        raise TorchferryError(f"--resume: {path} is not a torchferry run config: {str(exc)[:200]}") from None
    # config.json is a file: it names a package.module:factory model only when the command line names it again.
    if is_custom(saved.model) or is_custom(cfg.model):
        require_trusted_arch(saved.model, cfg.model if is_custom(cfg.model) else None, flag="--model",
                             source=f"run {cfg.name!r}")
    # Nor does it choose where anything is written (a bucket of someone else's, a system folder, another run's
    # folder): a run kept on --storage continues only when the command line names that storage again, and the run's
    # --name, the digits cache and --download are this command's (RESUME_OVERRIDES).
    if saved.storage and not cfg.storage:
        raise TorchferryError(f"--resume: run {cfg.name!r} keeps its checkpoints on --storage {saved.storage}; name it "
                              "again (--storage), as a run's config.json does not choose where checkpoints are written")
    for key in RESUME_OVERRIDES:
        setattr(saved, key, getattr(cfg, key))
    saved.resume = True
    return saved


def refuse_held_run_dir(cfg: TrainConfig) -> None:
    """Refuse runs/<name> when it holds a run already, unless resuming; writes nothing."""
    run_dir = cfg.run_dir
    if cfg.resume:
        return
    ray_state = os.path.join(cfg.storage_path, str(cfg.name), "checkpoint_manager_snapshot.json")
    if any(os.path.exists(p) for p in (os.path.join(run_dir, "best.pth"), os.path.join(run_dir, "metrics.csv"),
                                       ray_state)):
        raise TorchferryError(f"run directory {run_dir} already holds a run; continue it with --resume --name "
                              f"{cfg.name}, or choose another --name (nothing there was changed)")


def claim_run_dir(cfg: TrainConfig) -> None:
    """Make runs/<name> and write config.json there; refuse a folder that holds a run unless resuming."""
    from torchferry.distributed import checkpoint as ckpt

    refuse_held_run_dir(cfg)
    if cfg.resume:
        return
    run_dir = cfg.run_dir
    os.makedirs(run_dir, exist_ok=True)
    ckpt.atomic_write_bytes(os.path.join(run_dir, "config.json"),
                            (json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n").encode())
