"""The one training configuration: a typed dataclass and the defaults that depend on the data.

The command line (`flags.py`) fills a `TrainConfig`; `resolve_defaults` then fills what depends on the
data set and the model (image size, normalisation, augmentation strength, learning rate), so that the resolved
config saved beside the run and inside every checkpoint says exactly what was trained.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from torchferry.contract import DEFAULT_TASK, MAX_IMAGE_SIDE, MAX_RESIZE, TASKS
from torchferry.distributed import TorchferryError
from torchferry.inputs.text import MAX_SEQUENCE, MAX_VOCAB

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
GRAY_MEAN = [0.5]
GRAY_STD = [0.5]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("cosine", "step", "multistep", "plateau", "constant")
CHECK_IMAGES = ("auto", "full", "header", "none")

# Built-in and torchvision data sets whose images are grayscale, small, or not mirror-symmetric.
GRAYSCALE_SETS = ("digits", "mnist", "fashionmnist")
NO_FLIP_SETS = ("digits", "mnist")
SMALL_IMAGE_SIZES = {"digits": 32, "mnist": 28, "fashionmnist": 28, "cifar10": 32}
BUILTIN_TABLES = ("diabetes",)  # scikit-learn's bundled regression sets: no download
# What --model and --opt mean when not given, per task (TrainConfig's own defaults are the image task's).
DEFAULT_MODELS = {"image": "smallcnn", "tabular": "mlp", "text": "lstm"}
DEFAULT_OPTIMIZERS = {"image": "sgd", "tabular": "adam", "text": "adam"}
LOSSES = ("mse", "huber")


def default_cache_dir() -> str:
    """Where the built-in data set is written once: $TORCHFERRY_CACHE, else ~/.cache/torchferry."""
    return os.environ.get("TORCHFERRY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "torchferry")


@dataclass
class TrainConfig:
    """Everything a training run needs; plain data so it travels to Ray workers and into checkpoints."""

    # task and data
    task: str = DEFAULT_TASK
    data: str = "digits"
    target: str | None = None
    categorical: list[str] = field(default_factory=list)
    max_length: int = 64
    vocab_size: int = 20_000
    min_freq: int = 1
    val_data: str | None = None
    image_root: str | None = None
    val_split: float = 0.2
    download: bool = False
    cache_dir: str = field(default_factory=default_cache_dir)
    num_workers: int = 2
    skip_bad_images: bool = False
    allow_small_classes: bool = False
    check_images: str = "auto"
    image_size: int | None = None
    resize_size: int | None = None
    channels: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    hflip: float | None = None
    rotation: float | None = None
    color_jitter: float = 0.0
    crop_scale_min: float | None = None
    # model
    model: str = "smallcnn"
    pretrained: str | None = None
    freeze_backbone: bool = False
    unfreeze_at_epoch: int | None = None
    finetune_lr: float | None = None
    init_from: str | None = None
    # optimisation
    epochs: int = 30
    batch_size: int = 128
    opt: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    loss: str | None = None
    huber_delta: float = 1.0
    lr_scheduler: str = "cosine"
    lr_warmup_epochs: int = 0
    lr_warmup_decay: float = 0.01
    lr_step_size: int = 30
    lr_milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    lr_min: float = 0.0
    plateau_patience: int = 3
    amp: bool = False
    compile: bool = False
    channels_last: bool | None = None
    gpu_decode: bool = False
    seed: int = 0
    # cluster and run
    gpus: int = 0
    workers: int = 2
    cpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"
    address: str | None = None
    storage: str | None = None
    name: str | None = None
    output_dir: str = "runs"
    keep_checkpoints: int = 2
    max_failures: int = 0
    resource_check: bool = True
    resume: bool = False
    progress: str = "auto"
    verbose: bool = False
    debug: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain data (str, numbers, lists): safe for JSON, Ray and `torch.load(weights_only=True)`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Rebuild from `to_dict` output; unknown keys are an error so a typo fails where it is made."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TorchferryError(f"unknown training config keys {unknown}")
        # A saved config (config.json, a checkpoint's `config`) is a file: every value must have its field's type.
        hints = typing.get_type_hints(cls)
        for key, value in data.items():
            if not _has_type(value, hints[key]):
                raise TorchferryError(f"training config key {key!r} must be {_type_name(hints[key])}, "
                                      f"got {_short_repr(value)}")
        return cls(**data)

    @property
    def num_workers_total(self) -> int:
        """Ray Train workers: one per GPU with --gpus N, else --workers CPU workers."""
        return self.gpus if self.gpus > 0 else self.workers

    @property
    def storage_path(self) -> str:
        """Where Ray keeps checkpoints: --storage, else the output dir (so they sit in runs/<name>/)."""
        if self.storage and "://" in self.storage:
            return self.storage
        return os.path.abspath(os.path.expanduser(self.storage or self.output_dir))

    @property
    def run_dir(self) -> str:
        """runs/<name>, absolute."""
        assert self.name, "resolve_defaults sets the run name"
        return os.path.abspath(os.path.join(self.output_dir, self.name))


def _has_type(value: Any, hint: Any) -> bool:
    """Whether plain data `value` fits a TrainConfig field type (str, int, float, bool, lists of numbers, None)."""
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return any(_has_type(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and len(value) <= 1024 and all(_has_type(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str) and len(value) <= 4096
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return str(hint).replace("<class '", "").replace("'>", "")


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def infer_task(data: str, target: str | None) -> str:
    """The task --data and --target imply when --task is not given: a table with --target (or a built-in
    table) is a tabular regression; a CSV whose header names a `text` column a text classification; anything
    else an image classification."""
    if data in BUILTIN_TABLES or target is not None:
        return "tabular"
    if data.lower().endswith(".csv") and "text" in _csv_header(data):
        return "text"
    return DEFAULT_TASK


def _csv_header(path: str) -> list[str]:
    """The lower-cased column names of a CSV's first line (none when it cannot be read: the data check says why)."""
    import csv

    try:
        with open(os.path.expanduser(path), newline="", encoding="utf-8-sig", errors="replace") as f:
            return [c.strip().lower() for c in next(csv.reader([f.readline(65536)]), [])]
    except OSError:
        return []


def data_set_key(data: str) -> str:
    """Short name of the data set: 'digits', 'diabetes', a torchvision name, or 'folder'/'annotations'."""
    if data in ("digits", *BUILTIN_TABLES):
        return data
    head, sep, _ = data.partition(":")
    if sep and head.lower() in ("cifar10", "mnist", "fashionmnist", "flowers102"):
        return head.lower()
    return "annotations" if os.path.isfile(os.path.expanduser(data)) else "folder"


def validate_flags(cfg: TrainConfig) -> None:
    """Check flag values and combinations that need no data; raises TorchferryError naming the flag."""
    checks = [
        (cfg.task in TASKS, f"--task must be one of {', '.join(TASKS)}, got {cfg.task!r}"),
        (cfg.loss is None or cfg.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}"),
        (math.isfinite(cfg.huber_delta) and cfg.huber_delta > 0, f"--huber-delta must be positive, got {cfg.huber_delta}"),
        (1 <= cfg.max_length <= MAX_SEQUENCE, f"--max-length must be from 1 to {MAX_SEQUENCE}, got {cfg.max_length}"),
        (3 <= cfg.vocab_size <= MAX_VOCAB, f"--vocab-size must be from 3 to {MAX_VOCAB}, got {cfg.vocab_size}"),
        (cfg.min_freq >= 1, f"--min-freq must be at least 1, got {cfg.min_freq}"),
        (cfg.epochs >= 1, f"--epochs must be at least 1, got {cfg.epochs}"),
        (cfg.gpus >= 0, f"--gpus must be 0 or more, got {cfg.gpus}"),
        (cfg.workers >= 1, f"--workers must be at least 1, got {cfg.workers}"),
        (cfg.cpus_per_worker > 0, f"--cpus-per-worker must be positive, got {cfg.cpus_per_worker}"),
        (0.0 < cfg.val_split < 1.0, f"--val-split must be between 0 and 1, got {cfg.val_split}"),
        (cfg.num_workers >= 0, f"--num-workers must be 0 or more, got {cfg.num_workers}"),
        (cfg.keep_checkpoints >= 1, f"--keep-checkpoints must be at least 1, got {cfg.keep_checkpoints}"),
        (cfg.max_failures >= -1, f"--max-failures must be -1 (forever) or more, got {cfg.max_failures}"),
        (cfg.lr is None or cfg.lr > 0, f"--lr must be positive, got {cfg.lr}"),
        (0.0 <= cfg.label_smoothing < 1.0, f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}"),
        (cfg.image_size is None or 8 <= cfg.image_size <= MAX_IMAGE_SIDE,
         f"--image-size must be between 8 and {MAX_IMAGE_SIDE}, got {cfg.image_size}"),
        (cfg.resize_size is None or 1 <= cfg.resize_size <= MAX_RESIZE,
         f"--resize-size must be between 1 and {MAX_RESIZE}, got {cfg.resize_size}"),
        (cfg.hflip is None or 0.0 <= cfg.hflip <= 1.0, f"--hflip is a probability, got {cfg.hflip}"),
        (not cfg.gpu_decode or cfg.gpus > 0, "--gpu-decode decodes and augments on the GPU: it needs --gpus 1 or more"),
        (not cfg.gpu_decode or cfg.task == "image", f"--gpu-decode is for images, not the {cfg.task} task"),
        (cfg.crop_scale_min is None or 0.0 < cfg.crop_scale_min <= 1.0,
         f"--crop-scale-min must be in (0, 1], got {cfg.crop_scale_min}"),
        (not (cfg.resume and not cfg.name), "--resume needs --name of the run to continue"),
        (cfg.unfreeze_at_epoch is None or cfg.freeze_backbone,
         "--unfreeze-at-epoch needs --freeze-backbone"),
        (cfg.unfreeze_at_epoch is None or 0 < cfg.unfreeze_at_epoch < cfg.epochs,
         f"--unfreeze-at-epoch must be between 1 and --epochs - 1, got {cfg.unfreeze_at_epoch}"),
        (cfg.lr_scheduler != "multistep" or bool(cfg.lr_milestones), "--lr-scheduler multistep needs --lr-milestones"),
        (cfg.lr_warmup_epochs < cfg.epochs, "--lr-warmup-epochs must be fewer than --epochs"),
        ((cfg.mean is None) == (cfg.std is None), "--mean and --std go together"),
        (cfg.mean is None or len(cfg.mean) == len(cfg.std or []), "--mean and --std need the same length"),
    ]
    for ok, message in checks:
        if not ok:
            raise TorchferryError(message)
    if cfg.batch_size < cfg.num_workers_total:
        raise TorchferryError(f"--batch-size {cfg.batch_size} is the global batch; it must be at least the "
                              f"number of workers ({cfg.num_workers_total})")


def absolute_path(path: str) -> str:
    """`path` with ~ expanded, made absolute against this process's working directory."""
    return os.path.abspath(os.path.expanduser(path))


def is_weights_path(pretrained: str) -> bool:
    """--pretrained names a local file (not a torchvision weights enum name such as DEFAULT)."""
    return pretrained.endswith((".pth", ".pt", ".bin")) or os.sep in pretrained or os.path.exists(pretrained)


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Every local path in the config made absolute against this process's working directory.

    The driver does this before the config leaves it: Ray Train runs the loop in its own session folder,
    where a relative `data/shapes` or `runs` would name something else (issue 14).
    """
    r = dataclasses.replace(cfg)
    key = data_set_key(r.data)
    if key in ("folder", "annotations"):
        r.data = absolute_path(r.data)
    elif key not in ("digits", *BUILTIN_TABLES):
        name, _, root = r.data.partition(":")
        r.data = f"{name}:{absolute_path(root)}"
    for attr in ("val_data", "image_root", "init_from"):
        if getattr(r, attr):
            setattr(r, attr, absolute_path(getattr(r, attr)))
    r.cache_dir = absolute_path(r.cache_dir)
    r.output_dir = absolute_path(r.output_dir)
    if r.storage and "://" not in r.storage:
        r.storage = absolute_path(r.storage)
    if r.pretrained and is_weights_path(r.pretrained):
        r.pretrained = absolute_path(r.pretrained)
    return r


SMALL_SIDE = 64  # images whose median shorter side is at most this are a small-image set, like CIFAR or digits


def fit_to_images(cfg: TrainConfig, profile: dict[str, Any] | None,
                  weights_preprocess: dict[str, Any] | None = None) -> tuple[TrainConfig, str | None]:
    """Input size, channels and augmentation chosen from what a folder's images are, where no flag chose them.

    `profile` is `DataSplit.profile` (images looked at, median shorter side, all grayscale?). Small images get
    a small input (the next multiple of 8 at or above the median side, at least 32) and the gentler
    augmentation of the built-in small sets; grayscale images one channel where the model takes it (smallcnn,
    your own model); pretrained weights keep their own size and 3 channels. Returns the config and a line
    saying what was chosen and why (None when nothing was).
    """
    if not profile or data_set_key(cfg.data) not in ("folder", "annotations"):
        return cfg, None
    r = dataclasses.replace(cfg)
    side, gray = int(profile["median_side"]), bool(profile["grayscale"])
    small = side <= SMALL_SIDE and not weights_preprocess
    chosen = []
    if r.channels is None and gray and not weights_preprocess and (r.model == "smallcnn" or ":" in r.model):
        r.channels = 1
        chosen.append("--channels 1")
    if r.image_size is None and not weights_preprocess and side < 224:
        r.image_size = max(32, -(-side // 8) * 8)
        chosen.append(f"--image-size {r.image_size}")
    if small:
        # As for the built-in small sets: mild crops, no resize margin; no flips for grayscale glyph-like images.
        for attr, value in (("resize_size", r.image_size), ("crop_scale_min", 0.5),
                            ("hflip", 0.0 if gray else 0.5), ("rotation", 10.0 if gray else 0.0)):
            if getattr(r, attr) is None and value is not None:
                setattr(r, attr, value)
                chosen.append(f"--{attr.replace('_', '-')} {value:g}")
    if not chosen:
        return r, None
    kind = "grayscale" if gray else "color"
    return r, (f"defaults from the data ({profile['images']} images looked at: {kind}, median side {side} px"
               f"{', a small-image set' if small else ''}): {' '.join(chosen)}; pass the flags to choose otherwise")


def default_lr(opt: str, batch_size: int) -> float:
    """--lr's default: sgd 0.1 × batch-size/256 (the linear scaling rule), adam/adamw 1e-3."""
    return 0.1 * batch_size / 256 if opt == "sgd" else 1e-3


def resolve_defaults(cfg: TrainConfig, weights_preprocess: dict[str, Any] | None = None,
                     profile: dict[str, Any] | None = None) -> TrainConfig:
    """Fill the data- and model-dependent defaults; `weights_preprocess` comes from pretrained weights,
    `profile` from the images of a folder or annotation file (`fit_to_images`).

    Paths come out absolute (`absolute_paths`), so the resolved config means the same on every worker.
    """
    key = data_set_key(cfg.data)
    small = key in SMALL_IMAGE_SIZES
    w = weights_preprocess or {}
    r, _ = fit_to_images(absolute_paths(cfg), profile, weights_preprocess)
    if r.channels is None:
        r.channels = 1 if (key in GRAYSCALE_SETS and r.model == "smallcnn") else 3
    if r.image_size is None:
        r.image_size = w.get("size") or SMALL_IMAGE_SIZES.get(key, 224)
    if r.resize_size is None:
        r.resize_size = w.get("resize") or (r.image_size if small else round(r.image_size * 256 / 224))
    if r.mean is None:
        r.mean = w.get("mean") or (IMAGENET_MEAN if r.channels == 3 else GRAY_MEAN)
        r.std = w.get("std") or (IMAGENET_STD if r.channels == 3 else GRAY_STD)
    if len(r.mean) != r.channels:
        raise TorchferryError(f"--mean/--std have {len(r.mean)} values but the input has {r.channels} channels")
    if r.hflip is None:
        r.hflip = 0.0 if key in NO_FLIP_SETS else 0.5
    if r.rotation is None:
        r.rotation = 10.0 if key in NO_FLIP_SETS else 0.0
    if r.crop_scale_min is None:
        r.crop_scale_min = 0.5 if small else 0.08
    if r.lr is None:
        r.lr = default_lr(r.opt, r.batch_size)
    if r.unfreeze_at_epoch is not None and r.finetune_lr is None:
        r.finetune_lr = r.lr / 10
    if r.channels_last is None:
        # Image batches in channels_last: oneDNN's convolutions on CPU run 25-40 % faster in it (smallcnn,
        # mobilenet_v3_small; resnet18 a few %, a ViT the same); on a GPU it pays with --amp's tensor cores.
        r.channels_last = r.task == "image" and (r.gpus == 0 or r.amp)
    if r.name is None:
        data_name = key if key not in ("folder", "annotations") else os.path.basename(
            os.path.normpath(os.path.expanduser(r.data))).split(".")[0] or key
        model_name = r.model.rsplit(":", 1)[-1]
        r.name = f"{model_name}-{data_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if os.sep in r.name or r.name in (".", ".."):
        raise TorchferryError(f"--name {r.name!r} must be a plain directory name")
    return r
