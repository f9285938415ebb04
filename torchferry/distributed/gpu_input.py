"""The GPU input pipeline (`--gpu-decode`): JPEGs decoded on the GPU in batches, and augmented there.

On a GPU the CPU path (DataLoader workers decoding with Pillow, then cropping and flipping) is what limits
training: an H100 trains resnet50 faster than 12 cores decode JPEGs (bench/RESULTS.md). With `--gpu-decode` the
DataLoader workers only read files: a JPEG travels as its bytes, and the training loop decodes a whole batch with
nvJPEG (`torchvision.io.decode_jpeg(..., device="cuda")`, one call per batch), applies the same augmentation as the
CPU path (presets.train_augment_steps, the one definition: random resized crop, flip, rotation and colour jitter as
configured) to each image on the device, and stacks them as uint8 [N, C, H, W]; the loop then normalises them on
the device (DeviceNormalize) and lays them out channels_last, as it does for the CPU path's uint8 batches.

A file the GPU would not decode as the CPU path does is decoded by the worker as before and travels as a uint8
image: anything but a baseline 8-bit L or RGB JPEG (PNG, CMYK, ...), and a JPEG whose EXIF orientation asks for a
rotation (nvJPEG does not apply it; load_image does). Validation keeps the CPU path: its transform is the one the
checkpoint records and the server re-implements. Without a GPU the flag is refused (config.validate_flags).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from torchferry.distributed.config import TrainConfig
from torchferry.distributed.data import ConvertedDataset, load_image
from torchferry.distributed.discovery import DataSplit, Sample, require_regular_file
from torchferry.distributed.presets import train_augment_steps

JPEG_MAGIC = b"\xff\xd8\xff"
EXIF_ORIENTATION = 0x0112


def device_decodable(data: bytes, channels: int) -> bool:
    """True when the GPU decodes these bytes to what load_image gives: a baseline (not progressive) JPEG in L or RGB
    (or L read as RGB, which both convert alike), upright by its EXIF orientation. Reads the header only."""
    if not data.startswith(JPEG_MAGIC):
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:
            upright = img.getexif().get(EXIF_ORIENTATION, 1) == 1
            baseline = not (img.info.get("progressive") or img.info.get("progression"))
            return (img.format == "JPEG" and upright and baseline
                    and img.mode in (("L",) if channels == 1 else ("L", "RGB")))
    except Exception:  # noqa: BLE001 - whatever Pillow makes of it, the CPU path reads it (and names a bad file)
        return False


def read_sample(path: str, channels: int) -> torch.Tensor:
    """A JPEG's bytes as a 1-D uint8 tensor when the GPU can decode it; else the image decoded here, uint8 [C, H, W]."""
    require_regular_file(path)
    with open(path, "rb") as f:
        data = f.read()
    if device_decodable(data, channels):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return v2.functional.pil_to_tensor(load_image(path, channels))


class EncodedImageDataset:
    """(path, label) samples as `read_sample` gives them; a file that cannot be read is named in the error."""

    def __init__(self, samples: Sequence[Sample], channels: int):
        self.samples, self.channels = list(samples), channels
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            return read_sample(path, self.channels), label
        except Exception as exc:
            raise RuntimeError(f"cannot read image {path}: {exc}") from exc


def encoded_train_dataset(split: DataSplit, channels: int, cpu_train: Any) -> Any:
    """The training set for `--gpu-decode`, in place of the CPU path's `cpu_train`: files as `read_sample` reads
    them; a torchvision data set (decoded in memory already) as uint8 images, augmented on the GPU all the same."""
    if isinstance(cpu_train, ConvertedDataset):
        return ConvertedDataset(cpu_train.dataset, channels, v2.PILToTensor())
    return EncodedImageDataset(split.train, channels)


def collate_encoded(batch: list[tuple[torch.Tensor, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A batch of encoded or decoded images of any sizes, kept as a list, and its labels as one tensor."""
    return [item for item, _ in batch], torch.tensor([label for _, label in batch], dtype=torch.long)


class DeviceAugment:
    """A list of `read_sample` tensors → uint8 [N, C, H, W] on `device`: the JPEGs decoded in one call, then each
    image through the training augmentation (the CPU path's own steps, on device tensors)."""

    def __init__(self, cfg: TrainConfig, device: torch.device | str):
        self.device = torch.device(device)
        self.mode = ImageReadMode.GRAY if cfg.channels == 1 else ImageReadMode.RGB
        self.augment = v2.Compose(train_augment_steps(cfg))

    def decode(self, items: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each item as a uint8 [C, H, W] image on the device, in order."""
        images: list[torch.Tensor | None] = [
            item.to(self.device, non_blocking=True) if item.ndim == 3 else None for item in items]
        jpegs = [i for i, item in enumerate(items) if item.ndim == 1]
        if jpegs:
            with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec; its nvJPEG path still serves
                warnings.simplefilter("ignore", DeprecationWarning)
                decoded = decode_jpeg([items[i] for i in jpegs], mode=self.mode, device=self.device)
            for i, image in zip(jpegs, decoded):
                images[i] = image
        return [image for image in images if image is not None]

    def __call__(self, items: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.augment(image) for image in self.decode(items)])


class DeviceDecodingLoader:
    """A DataLoader of `collate_encoded` batches, seen by the training loop as one of (uint8 images on the device,
    labels on the device); its `sampler` is the loader's (set_epoch reshuffles it)."""

    def __init__(self, loader: Any, augment: DeviceAugment):
        self.loader, self.augment = loader, augment
        self.sampler = getattr(loader, "sampler", None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for items, target in self.loader:
            yield self.augment(items), target.to(self.augment.device, non_blocking=True)
