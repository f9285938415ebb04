"""The typed config: command line → TrainConfig, data-dependent defaults, and the GPU-path flags."""

from __future__ import annotations

import os

import pytest

from torchferry.distributed import TorchferryError
from torchferry.distributed.config import TrainConfig, fit_to_images, resolve_defaults, validate_flags
from torchferry.distributed.flags import config_from_args


def test_command_line_fills_the_dataclass_and_round_trips() -> None:
    cfg = config_from_args(["--gpus", "2", "--amp", "--compile", "--model", "resnet50", "--lr-milestones", "10,20",
                            "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2", "--placement-strategy", "SPREAD"])
    assert (cfg.gpus, cfg.amp, cfg.compile, cfg.lr_milestones, cfg.placement_strategy) == \
        (2, True, True, [10, 20], "SPREAD")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_keys_fail_where_they_are_made() -> None:
    with pytest.raises(TorchferryError, match="unknown training config keys"):
        TrainConfig.from_dict({**TrainConfig().to_dict(), "lr_typo": 1})


def test_gpu_path_defaults() -> None:
    assert resolve_defaults(TrainConfig(amp=True, gpus=2)).channels_last is True
    assert resolve_defaults(TrainConfig(amp=True, gpus=0)).channels_last is True  # oneDNN's CPU convolutions
    assert resolve_defaults(TrainConfig(gpus=0)).channels_last is True
    assert resolve_defaults(TrainConfig(gpus=2)).channels_last is False  # fp32 on GPU: no tensor cores to feed
    assert resolve_defaults(TrainConfig(task="text")).channels_last is False  # token batches have no channels
    assert resolve_defaults(TrainConfig(amp=True, gpus=2, channels_last=False)).channels_last is False
    assert TrainConfig(gpus=2, workers=7).num_workers_total == 2  # one worker per GPU


def test_dataset_dependent_defaults() -> None:
    digits = resolve_defaults(TrainConfig())
    assert (digits.channels, digits.image_size, digits.hflip, digits.mean) == (1, 32, 0.0, [0.5])
    assert digits.lr == pytest.approx(0.1 * 128 / 256)
    folder = resolve_defaults(TrainConfig(data="/somewhere/flowers", model="resnet50", opt="adamw"))
    assert (folder.channels, folder.image_size, folder.resize_size, folder.hflip, folder.lr) == (3, 224, 256, 0.5, 1e-3)
    weights = resolve_defaults(TrainConfig(data="/x", model="vit_b_16"),
                               {"size": 384, "resize": 384, "mean": [0.5] * 3, "std": [0.5] * 3})
    assert (weights.image_size, weights.resize_size, weights.mean) == (384, 384, [0.5] * 3)


@pytest.mark.parametrize("kwargs,message", [
    ({"unfreeze_at_epoch": 3}, "needs --freeze-backbone"),
    ({"resume": True}, "--resume needs --name"),
    ({"lr_scheduler": "multistep"}, "needs --lr-milestones"),
    ({"mean": [0.5]}, "go together"),
    ({"val_split": 1.5}, "--val-split"),
    ({"image_size": 4096}, "--image-size must be between 8 and 2048"),
    ({"resize_size": 100_000}, "--resize-size must be between 1 and 4096"),
])
def test_flag_combinations_that_cannot_work(kwargs: dict, message: str) -> None:
    with pytest.raises(TorchferryError, match=message):
        validate_flags(TrainConfig(**kwargs))


def test_every_path_is_made_absolute_where_the_command_runs(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray runs the loop in its own session folder: relative paths must not reach it (issue 14)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.csv").write_text("path,label\n")
    cfg = resolve_defaults(TrainConfig(data="train.csv", val_data="val.csv", image_root="images", output_dir="runs",
                                       storage="ckpts", init_from="old/best.pth", pretrained="w/resnet.pth",
                                       cache_dir="~/cache", name="n"))
    for attr, want in [("data", tmp_path / "train.csv"), ("val_data", tmp_path / "val.csv"),
                       ("image_root", tmp_path / "images"), ("output_dir", tmp_path / "runs"),
                       ("storage", tmp_path / "ckpts"), ("init_from", tmp_path / "old" / "best.pth"),
                       ("pretrained", tmp_path / "w" / "resnet.pth")]:
        assert getattr(cfg, attr) == str(want), attr
    assert cfg.cache_dir == os.path.join(os.path.expanduser("~"), "cache")
    assert cfg.run_dir == str(tmp_path / "runs" / "n")
    named = resolve_defaults(TrainConfig(data="cifar10:data/c10", storage="s3://bucket/runs", pretrained="DEFAULT",
                                         model="resnet18"))
    assert (named.data, named.storage, named.pretrained) == (f"cifar10:{tmp_path}/data/c10", "s3://bucket/runs",
                                                             "DEFAULT")
    assert resolve_defaults(TrainConfig()).data == "digits"


def test_defaults_fit_small_grayscale_images() -> None:
    """8 px grayscale images: a small input, one channel, the built-in digits' gentle augmentation (issue 14)."""
    profile = {"images": 300, "median_side": 8, "grayscale": True}
    cfg, note = fit_to_images(TrainConfig(data="/data/mydigits"), profile)
    assert (cfg.image_size, cfg.resize_size, cfg.channels, cfg.hflip, cfg.rotation, cfg.crop_scale_min) == \
        (32, 32, 1, 0.0, 10.0, 0.5)
    assert note and "grayscale" in note and "median side 8 px" in note and "--image-size 32" in note
    builtin = resolve_defaults(TrainConfig())
    fitted = resolve_defaults(TrainConfig(data="/data/mydigits"), None, profile)
    for key in ("image_size", "resize_size", "channels", "mean", "std", "hflip", "rotation", "crop_scale_min", "lr"):
        assert getattr(fitted, key) == getattr(builtin, key), key


def test_defaults_fit_other_images_and_yield_to_flags_and_weights() -> None:
    color = {"images": 50, "median_side": 30, "grayscale": False}
    small_color = resolve_defaults(TrainConfig(data="/d", model="resnet18"), None, color)
    assert (small_color.image_size, small_color.channels, small_color.hflip, small_color.crop_scale_min) == \
        (32, 3, 0.5, 0.5)
    gray = {"images": 50, "median_side": 100, "grayscale": True}
    mid = resolve_defaults(TrainConfig(data="/d"), None, gray)
    assert (mid.image_size, mid.channels, mid.resize_size, mid.crop_scale_min) == (104, 1, 119, 0.08)
    assert resolve_defaults(TrainConfig(data="/d", model="resnet18"), None, gray).channels == 3  # torchvision: RGB
    large = resolve_defaults(TrainConfig(data="/d"), None, {"images": 9, "median_side": 500, "grayscale": False})
    assert (large.image_size, large.hflip) == (224, 0.5)
    explicit = resolve_defaults(TrainConfig(data="/d", image_size=64, channels=3, hflip=0.5), None,
                                {"images": 9, "median_side": 8, "grayscale": True})
    assert (explicit.image_size, explicit.channels, explicit.hflip, explicit.resize_size) == (64, 3, 0.5, 64)
    weights = {"size": 224, "resize": 256, "mean": [0.4] * 3, "std": [0.2] * 3}
    pretrained = resolve_defaults(TrainConfig(data="/d", model="resnet18"), weights,
                                  {"images": 9, "median_side": 8, "grayscale": True})
    assert (pretrained.image_size, pretrained.channels, pretrained.crop_scale_min) == (224, 3, 0.08)
    assert fit_to_images(TrainConfig(), {"images": 9, "median_side": 8, "grayscale": True}) == (TrainConfig(), None)
