"""The one place preprocessing is defined: train augmentation, and the eval transform a checkpoint records.

The eval transform is fully described by the plain-data `preprocess` spec stored in every checkpoint and
ONNX model (`{"size": [H, W], "resize": int, "mean": [...], "std": [...], "channels": 1|3,
"interpolation": "bilinear"}`, `torchferry.contract.preprocess_spec`); `serve/` re-implements exactly this in
numpy/PIL.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import v2

from torchferry import contract
from torchferry.distributed.config import TrainConfig


def preprocess_spec(cfg: TrainConfig) -> dict[str, Any]:
    """The eval transform as plain data (the checkpoint's `preprocess`)."""
    assert cfg.image_size and cfg.resize_size and cfg.mean and cfg.std and cfg.channels, "resolve_defaults first"
    return contract.preprocess_spec(size=cfg.image_size, resize=cfg.resize_size, mean=list(cfg.mean),
                                    std=list(cfg.std), channels=cfg.channels)


def _to_normalized_tensor(mean: list[float], std: list[float]) -> list[Any]:
    return [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=mean, std=std)]


def build_eval_transform(preprocess: dict[str, Any]) -> v2.Compose:
    """PIL image (already L/RGB) → normalised float tensor: resize the shorter side, center crop."""
    if preprocess.get("interpolation", "bilinear") != "bilinear":
        raise ValueError(f"unsupported interpolation {preprocess['interpolation']!r}; only bilinear is recorded")
    return v2.Compose([
        v2.Resize(int(preprocess["resize"]), interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
        v2.CenterCrop(list(preprocess["size"])),
        *_to_normalized_tensor(preprocess["mean"], preprocess["std"]),
    ])


class DeviceNormalize:
    """uint8 [N, C, H, W] batch → float, scaled to [0, 1] and normalised, on whatever device it is on.

    On a GPU the DataLoader workers then hand over uint8 images (a quarter of the bytes to collate, pin and
    copy) and skip the float conversion, which costs them about as much as decoding; the GPU does it in
    microseconds. Equal to `ToDtype(float32, scale=True)` + `Normalize(mean, std)`.
    """

    def __init__(self, mean: list[float], std: list[float]):
        self.mean, self.std = list(mean), list(std)
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.device not in self._cache:
            shape = (1, len(self.mean), 1, 1)
            self._cache[images.device] = (torch.tensor(self.mean, device=images.device).view(shape),
                                          torch.tensor(self.std, device=images.device).view(shape))
        mean, std = self._cache[images.device]
        return images.float().div_(255.0).sub_(mean).div_(std)


def build_train_transform(cfg: TrainConfig, normalize: bool = True) -> v2.Compose:
    """Augmentation: random resized crop, flip, rotation and color jitter as configured, then normalise.

    `normalize=False` stops at the uint8 tensor: the training loop then normalises on the GPU
    (`DeviceNormalize`).
    """
    steps = train_augment_steps(cfg)
    if normalize:
        steps.extend(_to_normalized_tensor(list(cfg.mean or []), list(cfg.std or [])))
    else:
        steps.append(v2.PILToTensor())
    return v2.Compose(steps)


def train_augment_steps(cfg: TrainConfig) -> list[Any]:
    """The augmentation alone, for PIL images or uint8 tensors on any device (gpu_input.py runs it on the GPU):
    random resized crop, flip, rotation and color jitter as configured."""
    steps: list[Any] = [v2.RandomResizedCrop(int(cfg.image_size or 224), scale=(float(cfg.crop_scale_min or 0.08), 1.0),
                                             interpolation=v2.InterpolationMode.BILINEAR, antialias=True)]
    if cfg.hflip:
        steps.append(v2.RandomHorizontalFlip(p=cfg.hflip))
    if cfg.rotation:
        steps.append(v2.RandomRotation(cfg.rotation, interpolation=v2.InterpolationMode.BILINEAR))
    if cfg.color_jitter:
        j = cfg.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j) if cfg.channels == 1
                     else v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    return steps
