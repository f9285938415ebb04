"""The image classification task: folders, annotation files and torchvision sets, smallcnn or a torchvision
classifier, cross-entropy, accuracy; the best checkpoint by val_acc (the Task interface: tasks.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from torchferry.contract import (
    MAX_CLASSES,
    TorchferryError,
    classes_problem,
    is_int,
    is_number,
    preprocess_problems,
    short,
)
from torchferry.distributed.config import TrainConfig
from torchferry.distributed.tasks import Task

_logger = logging.getLogger(__name__)


class ImageTask(Task):
    """An image classifier: [N, C, H, W] floats in, one logit per class out."""

    name = "image"
    best_metric, best_mode = "val_acc", "max"
    metric_columns = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s", "seconds")
    checkpoint_metrics = ("val_acc", "val_loss", "train_loss", "train_acc")
    input_key = "preprocess"  # the checkpoint and metadata key of the input spec (the text task's: "text")
    required_keys = ("num_classes", "classes", "preprocess")
    classifier = True
    items = "images"

    def prepare(self, cfg: TrainConfig) -> tuple[TrainConfig, Any]:
        from torchferry.distributed.data import discover
        from torchferry.distributed.models import check_arch, weights_preprocess
        from torchferry.distributed.preflight import fit_model_to_input
        from torchferry.distributed.timeline import mark

        check_arch(cfg.model)
        weights = weights_preprocess(cfg.model, cfg.pretrained)
        split = discover(cfg)
        _logger.info("data: %s", split.describe())
        mark("data_checked")
        cfg = fit_model_to_input(cfg, weights, split)
        mark("model_checked")
        return cfg, split

    def datasets(self, split: Any, cfg: TrainConfig, use_cuda: bool) -> tuple[Any, Any]:
        from torchferry.distributed.data import build_datasets
        from torchferry.distributed.presets import build_eval_transform, build_train_transform, preprocess_spec

        # On a GPU the training images travel as uint8 and are normalised there (device_transform).
        return build_datasets(split, int(cfg.channels or 3), build_train_transform(cfg, normalize=not use_cuda),
                              build_eval_transform(preprocess_spec(cfg)))

    def build_model(self, cfg: TrainConfig, split: Any) -> nn.Module:
        from torchferry.distributed.models import build_model

        return build_model(cfg.model, len(split.classes), cfg.pretrained, int(cfg.channels or 3))

    def criteria(self, cfg: TrainConfig, split: Any) -> tuple[Callable, Callable]:
        return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), nn.CrossEntropyLoss()

    def batch_sums(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from torchferry.distributed.epoch import correct_answers

        return correct_answers(output, target)

    def phase_metrics(self, prefix: str, stats: Any) -> dict[str, float]:
        return {f"{prefix}_acc": stats.accuracy}

    def device_transform(self, cfg: TrainConfig, device: torch.device) -> Callable | None:
        from torchferry.distributed.presets import DeviceNormalize

        return DeviceNormalize(list(cfg.mean or []), list(cfg.std or [])) if device.type == "cuda" else None

    def outputs_match(self, source: dict[str, Any], split: Any) -> bool:
        return list(source.get("classes") or []) == list(split.classes)

    def pictures(self, cfg: TrainConfig, best: dict[str, Any], history: list[dict[str, Any]], split: Any) -> None:
        from torchferry.distributed.data import eval_datasets
        from torchferry.distributed.report import run_pictures

        _, val = eval_datasets(split, best["preprocess"])
        run_pictures(cfg.run_dir, best, history, val, factory=cfg.model)

    def checkpoint_fields(self, split: Any, cfg: TrainConfig) -> dict[str, Any]:
        return image_fields(list(split.classes), cfg)

    def field_problems(self, obj: dict[str, Any]) -> Iterator[str]:
        from torchferry.distributed.models import FACTORY_PATTERN, is_builtin

        arch = obj["arch"]
        if not isinstance(arch, str) or not (is_builtin(arch) or FACTORY_PATTERN.fullmatch(arch)) or len(arch) > 200:
            yield (f"arch {short(arch)} is neither smallcnn, a torchvision classifier nor a package.module:factory "
                   "name")
        yield from classifier_problems(obj, preprocess_problems(obj["preprocess"]))

    def model_builder(self, checkpoint: dict[str, Any], factory: str | None) -> Callable[[], nn.Module]:
        from torchferry.distributed.models import build_model, check_arch_kwargs, require_trusted_arch

        arch = checkpoint["arch"]
        require_trusted_arch(arch, factory)
        channels = int(checkpoint["preprocess"]["channels"])
        kwargs = check_arch_kwargs(arch, checkpoint.get("arch_kwargs"))
        num_classes = int(checkpoint["num_classes"])
        return lambda: build_model(arch, num_classes, channels=channels, arch_kwargs=kwargs)

    def input_shape(self, checkpoint: dict[str, Any]) -> list[int]:
        pre = checkpoint["preprocess"]
        return [int(pre["channels"]), *(int(v) for v in pre["size"])]

    def onnx_metadata(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        return {"classes": list(checkpoint["classes"]), self.input_key: checkpoint[self.input_key],
                "num_classes": int(checkpoint["num_classes"]),
                "val_acc": float(checkpoint["metrics"].get("val_acc", float("nan")))}

    def metadata_keys(self) -> tuple[str, ...]:
        return ("classes", self.input_key, "arch")

    def random_input(self, checkpoint: dict[str, Any], batch: int, generator: Any) -> torch.Tensor:
        return torch.randn(batch, *self.input_shape(checkpoint), generator=generator)

    def validation_set(self, checkpoint: dict[str, Any], data: str | None, val_data: str | None = None,
                       image_root: str | None = None) -> tuple[Any, str]:
        from torchferry.distributed.data import checkpoint_datasets

        rebuilt = checkpoint_datasets(checkpoint, data, val_data, image_root)
        return rebuilt.val, rebuilt.source

    def real_batches(self, checkpoint: dict[str, Any], data: str | None, limit: int) -> tuple[Iterator, str]:
        dataset, source = self.validation_set(checkpoint, data)
        indices = list(range(min(len(dataset), limit)))
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=32)
        return iter(loader), f"{len(indices)} validation images from {source}"

    def agreement(self, onnx_out: Any, torch_out: Any) -> dict[str, float]:
        import numpy as np

        return {"top1_agreement": float(np.mean(onnx_out.argmax(1) == torch_out.argmax(1)))}


def image_fields(classes: list[str], cfg: TrainConfig) -> dict[str, Any]:
    """An image checkpoint's task fields: its classes and eval preprocessing."""
    from torchferry.distributed.presets import preprocess_spec

    if not classes:
        raise TorchferryError("an image checkpoint needs its class names")
    return {"num_classes": len(classes), "classes": list(classes), "preprocess": preprocess_spec(cfg)}


def classifier_problems(obj: dict[str, Any], input_problems: Iterator[str]) -> Iterator[str]:
    """What is wrong with a classifier checkpoint's `num_classes` and `classes`, its input spec (`input_problems`)
    and its `metrics.val_acc`, in that order."""
    n = obj["num_classes"]
    if not is_int(n, 2, MAX_CLASSES):
        yield f"num_classes must be an integer from 2 to {MAX_CLASSES}, got {short(n)}"
    classes = obj["classes"]
    problem = classes_problem(classes)
    if problem:
        yield problem
    elif len(classes) != n:
        yield f"classes lists {len(classes)} names for num_classes {short(n)}"
    yield from input_problems
    metrics = obj["metrics"]
    if isinstance(metrics, dict) and not (is_number(metrics.get("val_acc")) and 0.0 <= metrics["val_acc"] <= 1.0):
        yield f"metrics.val_acc must be a number from 0 to 1, got {short(metrics.get('val_acc'))}"
