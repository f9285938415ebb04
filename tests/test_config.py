"""The typed config: command line → TrainConfig, data-dependent defaults, and the GPU-path flags."""

from __future__ import annotations

import pytest

from distributed import TorchferryError
from distributed.config import TrainConfig, config_from_args, resolve_defaults, validate_flags


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
    assert resolve_defaults(TrainConfig(amp=True, gpus=0)).channels_last is False
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
])
def test_flag_combinations_that_cannot_work(kwargs: dict, message: str) -> None:
    with pytest.raises(TorchferryError, match=message):
        validate_flags(TrainConfig(**kwargs))
