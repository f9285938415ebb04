"""The GPU input pipeline (--gpu-decode, distributed/gpu_input.py), on the CPU: its decode and augmentation run on
CPU tensors here and must give what the CPU path (Pillow decode, the same augmentation on PIL images) gives for
the same random draws. On a CUDA machine the last test runs the real nvJPEG path."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from torchferry.contract import TorchferryError
from torchferry.distributed.config import TrainConfig, validate_flags
from torchferry.distributed.data import ConvertedDataset, load_image
from torchferry.distributed.flags import get_args_parser
from torchferry.distributed.gpu_input import (
    DeviceAugment,
    DeviceDecodingLoader,
    EncodedImageDataset,
    collate_encoded,
    device_decodable,
    encoded_train_dataset,
    read_sample,
)
from torchferry.distributed.presets import DeviceNormalize, build_train_transform


def _photo(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 4 + seed * 30) % 256, (yy * 3) % 256, (xx + yy) % 256], -1)
    return np.clip(base + rng.normal(0, 15, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def mixed_images(tmp_path: Path) -> dict[str, Path]:
    """JPEGs of several sizes (RGB and gray), a PNG, a CMYK JPEG and a JPEG whose EXIF says rotate."""
    out = {}
    for i, (w, h) in enumerate([(64, 48), (50, 70), (33, 33), (120, 80)]):
        out[f"rgb{i}"] = tmp_path / f"rgb{i}.jpg"
        Image.fromarray(_photo(w, h, i)).save(out[f"rgb{i}"], quality=90)
    out["gray"] = tmp_path / "gray.jpg"
    Image.fromarray(_photo(40, 40, 7)).convert("L").save(out["gray"], quality=90)
    out["png"] = tmp_path / "p.png"
    Image.fromarray(_photo(30, 40, 8)).save(out["png"])
    out["cmyk"] = tmp_path / "cmyk.jpg"
    Image.fromarray(_photo(30, 30, 9)).convert("CMYK").save(out["cmyk"])
    out["rotated"] = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_photo(40, 24, 10)).save(out["rotated"], exif=exif)
    return out


def _cfg(**kw) -> TrainConfig:
    base = {"data": "x", "channels": 3, "image_size": 32, "hflip": 0.5, "crop_scale_min": 0.08, "rotation": 0.0,
            "color_jitter": 0.0, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    return TrainConfig(**{**base, **kw})


def test_only_upright_8_bit_jpegs_travel_as_bytes(mixed_images: dict[str, Path]) -> None:
    def decodable(name: str, channels: int = 3) -> bool:
        return device_decodable(mixed_images[name].read_bytes(), channels)

    assert decodable("rgb0") and decodable("gray") and decodable("gray", channels=1)
    assert not decodable("rgb0", channels=1)  # RGB to gray stays Pillow's conversion
    assert not decodable("png") and not decodable("cmyk") and not decodable("rotated")
    progressive = io.BytesIO()
    Image.fromarray(_photo(40, 30, 7)).save(progressive, format="JPEG", progressive=True)
    assert not device_decodable(progressive.getvalue(), 3)  # nvJPEG's batched decode takes baseline JPEGs
    assert not device_decodable(b"\xff\xd8\xff" + b"\x00" * 20, 3)  # a broken JPEG goes to the CPU path's error
    assert read_sample(str(mixed_images["rgb1"]), 3).shape == (mixed_images["rgb1"].stat().st_size,)
    rotated = read_sample(str(mixed_images["rotated"]), 3)  # decoded here, upright as load_image makes it
    assert rotated.shape == (3, 40, 24) and rotated.dtype == torch.uint8


@pytest.mark.parametrize("extra,max_diff,mean_diff", [
    ({}, 1, 0.1),                              # random resized crop + flip: the interpolation's rounding only
    ({"color_jitter": 0.4}, 6, 1.0),           # + colour jitter: Pillow's enhancers against torch's blend
    ({"rotation": 10.0}, None, 4.0),           # + rotation: the corners Pillow and torch fill differ
])
def test_device_augmentation_matches_the_cpu_pipeline_on_cpu_tensors(mixed_images: dict[str, Path], extra: dict,
                                                                    max_diff: int | None, mean_diff: float) -> None:
    cfg = _cfg(**extra)
    paths = [str(p) for p in mixed_images.values()]
    for seed in range(3):
        torch.manual_seed(seed)
        cpu = torch.stack([build_train_transform(cfg, normalize=False)(load_image(p, 3)) for p in paths])
        torch.manual_seed(seed)
        device = DeviceAugment(cfg, "cpu")([read_sample(p, 3) for p in paths])
        assert device.shape == cpu.shape == (len(paths), 3, 32, 32) and device.dtype == torch.uint8
        diff = (cpu.int() - device.int()).abs().float()
        assert diff.mean() <= mean_diff, (seed, float(diff.mean()))
        if max_diff is not None:
            assert diff.max() <= max_diff, (seed, float(diff.max()))
        # normalised as the loop does it: the same floats up to those levels
        normalize = DeviceNormalize(cfg.mean, cfg.std)
        assert torch.allclose(normalize(device), normalize(cpu), atol=(max_diff or 255) / 255 / min(cfg.std) + 1e-6)
    torch.manual_seed(0)
    flips = [DeviceAugment(_cfg(hflip=1.0, crop_scale_min=1.0), "cpu")([read_sample(paths[2], 3)])[0]]
    torch.manual_seed(0)
    plain = DeviceAugment(_cfg(hflip=0.0, crop_scale_min=1.0), "cpu")([read_sample(paths[2], 3)])[0]
    assert torch.equal(flips[0], plain.flip(-1))  # the 33×33 image, whole: a flip is a mirror


def test_gray_runs_decode_to_one_channel(mixed_images: dict[str, Path]) -> None:
    cfg = _cfg(channels=1, mean=[0.5], std=[0.25])
    torch.manual_seed(1)
    cpu = build_train_transform(cfg, normalize=False)(load_image(str(mixed_images["gray"]), 1))
    torch.manual_seed(1)
    device = DeviceAugment(cfg, "cpu")([read_sample(str(mixed_images["gray"]), 1)])
    assert device.shape == (1, 1, 32, 32) and (cpu.int() - device[0].int()).abs().max() <= 1


def test_the_loader_yields_uint8_batches_on_the_device_and_reshuffles(mixed_images: dict[str, Path]) -> None:
    samples = [(str(p), i % 2) for i, p in enumerate(mixed_images.values())]
    dataset = EncodedImageDataset(samples, 3)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = DeviceDecodingLoader(DataLoader(dataset, batch_size=3, sampler=sampler, collate_fn=collate_encoded),
                                  DeviceAugment(_cfg(), "cpu"))
    assert loader.sampler is sampler and len(loader) == 3
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [3, 3, 2] and all(b[0].dtype == torch.uint8 for b in batches)
    assert all(b[0].shape[1:] == (3, 32, 32) for b in batches)
    assert sorted(t for _, target in batches for t in target.tolist()) == sorted(label for _, label in samples)
    with pytest.raises(RuntimeError, match="cannot read image .*missing.jpg"):
        EncodedImageDataset([("/nonexistent/missing.jpg", 0)], 3)[0]


def test_in_memory_data_sets_travel_as_uint8_images() -> None:
    from torchvision.datasets import FakeData

    cpu_train = ConvertedDataset(FakeData(size=4, image_size=(3, 20, 24)), 3, build_train_transform(_cfg()))
    encoded = encoded_train_dataset(None, 3, cpu_train)  # type: ignore[arg-type] - no split needed for these
    image, _ = encoded[0]
    assert image.shape == (3, 20, 24) and image.dtype == torch.uint8
    assert DeviceAugment(_cfg(), "cpu")([image]).shape == (1, 3, 32, 32)


def test_the_flag_needs_a_gpu_and_the_image_task() -> None:
    args = get_args_parser().parse_args(["--data", "digits", "--gpu-decode", "--gpus", "1"])
    assert args.gpu_decode is True
    validate_flags(TrainConfig(data="digits", gpu_decode=True, gpus=1))
    with pytest.raises(TorchferryError, match="--gpu-decode decodes and augments on the GPU: it needs --gpus"):
        validate_flags(TrainConfig(data="digits", gpu_decode=True))
    with pytest.raises(TorchferryError, match="--gpu-decode is for images, not the tabular task"):
        validate_flags(TrainConfig(data="diabetes", task="tabular", gpu_decode=True, gpus=1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvjpeg_decode_and_augmentation_on_the_gpu_match_the_cpu(mixed_images: dict[str, Path]) -> None:
    cfg = _cfg()
    items = [read_sample(str(p), 3) for p in mixed_images.values()]
    torch.manual_seed(0)
    cpu = DeviceAugment(cfg, "cpu")(items)
    torch.manual_seed(0)  # the same draws: the parameters are sampled on the CPU generator either way
    gpu = DeviceAugment(cfg, "cuda")(items)
    assert gpu.is_cuda and gpu.shape == cpu.shape
    assert (gpu.cpu().int() - cpu.int()).abs().float().mean() <= 2.0  # nvJPEG's IDCT and upsampling vs libjpeg's
    buffer = io.BytesIO()
    Image.fromarray(_photo(64, 48, 0)).save(buffer, format="JPEG")
    assert device_decodable(buffer.getvalue(), 3)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_launch_with_gpu_decode_learns_from_jpegs(tmp_path: Path) -> None:
    import os
    import re
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    for name, rgb in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(32):
            pixels = np.clip(np.array(rgb)[None, None, :] + rng.normal(0, 20, (48, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.jpg", quality=90)
    proc = subprocess.run([sys.executable, "-m", "distributed.launch", "--gpus", "1", "--gpu-decode", "--data",
                           str(tmp_path / "data"), "--model", "smallcnn", "--image-size", "32", "--epochs", "3",
                           "--output-dir", str(tmp_path / "runs"), "--name", "gpu-decode"], check=False,
                          capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "TORCHFERRY_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r"best val_acc (\d\.\d+)", proc.stdout)
    assert match and float(match.group(1)) >= 0.9, proc.stdout[-2000:]
