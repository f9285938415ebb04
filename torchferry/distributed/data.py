"""The data of a run: `--data` read into a `DataSplit`, the built-in digits, torchvision data sets, datasets.

`discover(cfg)` turns `--data` into a `DataSplit` (class names plus train and validation samples) and
checks it; the driver calls it before Ray starts so that bad data fails in seconds with one clear
message, and every worker calls it again (it is deterministic for a given `--seed`) to build its
datasets with `build_datasets`. Folders and annotation files are read by `discovery.py`, images checked
by `image_check.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from torchferry.cli import lead_line
from torchferry.contract import SIXTEEN_BIT_MODES, eight_bit
from torchferry.distributed import TorchferryError
from torchferry.distributed.config import TrainConfig, absolute_path, data_set_key, default_cache_dir
from torchferry.distributed.discovery import (
    DataSplit,
    Sample,
    annotation_split,
    folder_split,
    require_regular_file,
    split_folder,
)
from torchferry.distributed.image_check import check_split_images

_logger = logging.getLogger(__name__)

TORCHVISION_SETS = ("cifar10", "mnist", "fashionmnist", "flowers102")
DIGITS_VERSION = "digits-v1"


def discover(cfg: TrainConfig) -> DataSplit:
    """Read `--data` (and `--val-data`) into a checked DataSplit; raises TorchferryError on bad data."""
    key = data_set_key(cfg.data)
    if key == "digits":
        split = split_folder(materialize_digits(cfg.cache_dir), cfg)
    elif key in TORCHVISION_SETS:
        split = _torchvision_split(key, cfg)
    elif key == "annotations":
        split = annotation_split(cfg)
    else:
        split = folder_split(cfg)
    if len(split.classes) < 2:
        raise TorchferryError(f"found {len(split.classes)} class(es) in {cfg.data!r}; a classifier needs at least 2")
    if split.torchvision_name is None:
        if key != "digits":
            split = check_split_images(split, cfg)
        for part, samples in (("training", split.train), ("validation", split.val)):
            if not samples:
                raise TorchferryError(f"no {part} images found in {cfg.data!r}")
    return split


def materialize_digits(cache_dir: str) -> str:
    """Write scikit-learn's 1,797 handwritten digits once as 8×8 PNGs in DIR/<digit>/; returns DIR."""
    root = absolute_path(cache_dir)
    if os.path.exists(root) and not os.path.isdir(root):
        raise TorchferryError(f"--cache-dir {cache_dir!r} is not a directory")
    target = os.path.join(root, DIGITS_VERSION)
    if os.path.isfile(os.path.join(target, ".complete")):
        return target
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as exc:
        raise TorchferryError(f"--cache-dir {cache_dir!r}: cannot create it ({exc.strerror})") from None
    from sklearn.datasets import load_digits

    bunch = load_digits()
    try:
        tmp = tempfile.mkdtemp(prefix=".digits-", dir=root)
    except OSError as exc:
        raise TorchferryError(f"--cache-dir {cache_dir!r}: cannot write there ({exc.strerror})") from None
    try:
        for i, (pixels, label) in enumerate(zip(bunch.images, bunch.target)):
            class_dir = os.path.join(tmp, str(int(label)))
            os.makedirs(class_dir, exist_ok=True)
            # sklearn stores 0..16 ink levels; scale to 0..255 gray (white ink on black, as the scans).
            Image.fromarray((pixels * (255.0 / 16.0)).round().astype("uint8"), mode="L").save(
                os.path.join(class_dir, f"{i:04d}.png"))
        open(os.path.join(tmp, ".complete"), "w").close()
        try:
            os.rename(tmp, target)
        except OSError:
            # Another worker finished first: its complete copy wins.
            if not os.path.isfile(os.path.join(target, ".complete")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def checkpoint_data_config(checkpoint: dict[str, Any], data: str | None, val_data: str | None = None,
                           image_root: str | None = None) -> TrainConfig:
    """The training config of a checked checkpoint, as a command that reads its data (evaluate, export) uses it.

    A checkpoint is a file, not the operator: it never chooses which files are read nor where anything is
    written. Its recorded data are read only when `data` (the command's --data) names them again, the
    built-in digits aside; its --val-data and --image-root are replaced by the command's own (none unless
    given); the digits cache is the operator's ($TORCHFERRY_CACHE, or ~/.cache/torchferry), never the one it
    recorded. Its seed and --val-split stay, so that the same validation split is rebuilt.
    """
    cfg = TrainConfig.from_dict(dict(checkpoint["config"]))
    if not data and data_set_key(cfg.data) != "digits":
        raise TorchferryError(f"the checkpoint was trained on {cfg.data[:200]!r}; pass --data to read it (a "
                              "checkpoint alone does not choose which files are read)")
    if (val_data or image_root) and not data:
        raise TorchferryError("--val-data and --image-root go with --data")
    absolute = {k: os.path.abspath(os.path.expanduser(v)) if v else None
                for k, v in (("val_data", val_data), ("image_root", image_root))}
    return dataclasses.replace(cfg, data=data or cfg.data, **absolute, check_images="none", download=False,
                               cache_dir=default_cache_dir())


def _torchvision_dataset(name: str, root: str, train: bool, download: bool) -> Any:
    from torchvision import datasets

    if name == "cifar10":
        from torchferry.distributed.cifar import LocalCIFAR10

        return LocalCIFAR10(root, train=train, download=download)
    if name == "mnist":
        return datasets.MNIST(root, train=train, download=download)
    if name == "fashionmnist":
        return datasets.FashionMNIST(root, train=train, download=download)
    return datasets.Flowers102(root, split="train" if train else "val", download=download)


def _torchvision_split(name: str, cfg: TrainConfig) -> DataSplit:
    root = absolute_path(cfg.data.split(":", 1)[1])
    if not cfg.download and not os.path.isdir(root):
        raise TorchferryError(f"{name} root {root!r} does not exist; pass --download to fetch it there")
    try:
        train = _torchvision_dataset(name, root, train=True, download=cfg.download)
        _torchvision_dataset(name, root, train=False, download=False)
    except (OSError, RuntimeError) as exc:  # urllib's URLError and socket errors are OSErrors
        fetching = cfg.download and (isinstance(exc, OSError) or "download" in str(exc).lower())
        if not fetching:
            raise TorchferryError(f"cannot read {name} from {root!r}: {lead_line(exc)}") from None
        reason = getattr(exc, "reason", None) or exc
        raise TorchferryError(f"--download: cannot fetch {name} into {root!r} ({lead_line(reason)}); check the "
                              "network or proxy, or put the files there and leave out --download") from None
    classes = [str(c) for c in getattr(train, "classes", [])] or [str(i) for i in range(102)]
    return DataSplit(classes=classes, torchvision_name=name, torchvision_root=root)


# ----------------------------------------------------------------------------------------------------
# datasets


def load_image(path: str, channels: int) -> Image.Image:
    """Open an image as the model sees it: EXIF orientation applied, first frame, L or RGB.

    16-bit grayscale is scaled to 8 bits (not clipped) by the contract's rule, as `serve/images.py` does for clients.
    """
    require_regular_file(path)
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in SIXTEEN_BIT_MODES:
            img = Image.fromarray(eight_bit(np.asarray(img)), mode="L")
        return img.convert("L" if channels == 1 else "RGB")


class ImageListDataset:
    """(path, label) samples read with `load_image` and transformed; a bad file is named in the error."""

    def __init__(self, samples: Sequence[Sample], channels: int, transform: Callable | None = None):
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.channels = channels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        try:
            img = load_image(path, self.channels)
        except Exception as exc:
            raise RuntimeError(f"cannot read image {path}: {exc}") from exc
        return (self.transform(img) if self.transform else img), label


class ConvertedDataset:
    """A torchvision data set whose PIL images are converted to L/RGB, then transformed."""

    def __init__(self, dataset: Any, channels: int, transform: Callable | None = None):
        self.dataset = dataset
        self.mode = "L" if channels == 1 else "RGB"
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img, label = self.dataset[index]
        img = img.convert(self.mode)
        return (self.transform(img) if self.transform else img), int(label)


def build_datasets(split: DataSplit, channels: int, train_transform: Callable | None,
                   eval_transform: Callable | None, download: bool = False) -> tuple[Any, Any]:
    """Training and validation datasets with their transforms."""
    if split.torchvision_name:
        name, root = split.torchvision_name, split.torchvision_root
        assert root is not None
        return (ConvertedDataset(_torchvision_dataset(name, root, True, download), channels, train_transform),
                ConvertedDataset(_torchvision_dataset(name, root, False, False), channels, eval_transform))
    return (ImageListDataset(split.train, channels, train_transform),
            ImageListDataset(split.val, channels, eval_transform))


def eval_datasets(split: DataSplit, preprocess: dict[str, Any]) -> tuple[Any, Any]:
    """Training and validation datasets both through a checkpoint's eval transform (its `preprocess`): what the
    model sees when it is evaluated, verified or served."""
    from torchferry.distributed.presets import build_eval_transform

    eval_tf = build_eval_transform(preprocess)
    return build_datasets(split, int(preprocess["channels"]), eval_tf, eval_tf)


@dataclasses.dataclass(frozen=True)
class CheckpointData:
    """The data a checkpoint describes, rebuilt: what `--data` named (`source`) and its two datasets through the
    checkpoint's eval transform."""

    source: str
    train: Any
    val: Any


def checkpoint_datasets(checkpoint: dict[str, Any], data: str | None, val_data: str | None = None,
                        image_root: str | None = None) -> CheckpointData:
    """Rebuild the training and validation data a checked checkpoint describes, as `checkpoint_data_config` allows
    (same split, seed and classes); TorchferryError when the data cannot be read or its classes differ."""
    cfg = checkpoint_data_config(checkpoint, data, val_data, image_root)
    split = discover(cfg)
    classes = list(checkpoint["classes"])
    if list(split.classes) != classes:
        raise TorchferryError(f"the classes in {cfg.data!r} ({len(split.classes)}) differ from the checkpoint's "
                              f"({len(classes)})")
    train, val = eval_datasets(split, checkpoint["preprocess"])
    return CheckpointData(source=cfg.data, train=train, val=val)
