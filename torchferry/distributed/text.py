"""The text classification task: a `text,label` CSV, a vocabulary from the training split, an embedding + LSTM
(or a small Transformer encoder), cross-entropy, accuracy; the best checkpoint by val_acc (the Task interface:
tasks.py; the tokenizer: torchferry/inputs/text.py; the CSV: text_data.py; the models: text_models.py)."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from torchferry.contract import short
from torchferry.distributed import TorchferryError
from torchferry.distributed.config import TrainConfig, absolute_path, resolve_defaults
from torchferry.distributed.image_task import ImageTask, classifier_problems
from torchferry.distributed.text_data import TextSplit, encoded_dataset, text_split
from torchferry.distributed.text_models import TEXT_ARCHS, build_text_model, check_text_arch_kwargs
from torchferry.inputs.text import build_vocab, text_spec, text_spec_problems

_logger = logging.getLogger(__name__)

DEFAULT_MODEL = "lstm"


def read_split(cfg: TrainConfig) -> TextSplit:
    """The run's TextSplit, its vocabulary (`spec`) built from the training texts alone."""
    split = text_split(absolute_path(cfg.data), val_path=absolute_path(cfg.val_data) if cfg.val_data else None,
                       val_split=cfg.val_split, seed=cfg.seed, allow_small_classes=cfg.allow_small_classes)
    if not split.val:
        raise TorchferryError(f"no validation texts in {cfg.data!r}; give --val-data or a larger --val-split")
    vocab = build_vocab((text for text, _ in split.train), min_freq=cfg.min_freq, max_size=cfg.vocab_size)
    split.spec = text_spec(vocab, cfg.max_length)
    return split


def _build(arch: str, num_classes: int, spec: dict[str, Any], kwargs: dict[str, Any]) -> nn.Module:
    vocab_size, max_length = len(spec["vocab"]), int(spec["max_length"])
    if arch in TEXT_ARCHS:
        return build_text_model(arch, num_classes, vocab_size, max_length, kwargs)
    from torchferry.distributed.models import _import_factory

    model = _import_factory(arch)(num_classes=num_classes, vocab_size=vocab_size, max_length=max_length, **kwargs)
    if not isinstance(model, nn.Module):
        raise TorchferryError(f"--model {arch!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _check_outputs(model: nn.Module, split: TextSplit) -> None:
    """A forward pass on two validation texts: the model must give one logit per class."""
    probe = encoded_dataset(split.val[:2], split.spec).tensors[0]
    with torch.no_grad():
        out = model.eval()(probe)
    want = (len(probe), len(split.classes))
    if not (isinstance(out, torch.Tensor) and tuple(out.shape) == want):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TorchferryError(f"the text model gives {shape} for {want[0]} texts; a text classifier gives "
                              f"[batch, {want[1]}], one logit per class")


class TextTask(ImageTask):
    """A text classifier: int64 token ids [N, max_length] in, one logit per class out. A classifier as the image
    task is (cross-entropy, accuracy, the best by val_acc, top-1 agreement in the parity proof): what reads,
    builds, stores and exports the model is its own."""

    name = "text"
    required_keys = ("num_classes", "classes", "text")
    input_key = "text"
    items = "texts"

    def prepare(self, cfg: TrainConfig) -> tuple[TrainConfig, Any]:
        from torchferry.distributed.models import FACTORY_PATTERN

        if cfg.model not in TEXT_ARCHS and not FACTORY_PATTERN.fullmatch(cfg.model):
            raise TorchferryError(f"--model {cfg.model!r} is not a text model; choose one of {list(TEXT_ARCHS)} "
                                  "or package.module:factory")
        r = dataclasses.replace(cfg, data=absolute_path(cfg.data),
                                val_data=absolute_path(cfg.val_data) if cfg.val_data else None)
        split = read_split(r)
        _logger.info("data: %s, a vocabulary of %d tokens", split.describe(), len(split.spec["vocab"]))
        if r.name is None:
            source = os.path.basename(r.data).rsplit(".", 1)[0] or "texts"
            r.name = f"{r.model.rsplit(':', 1)[-1]}-{source}-{time.strftime('%Y%m%d-%H%M%S')}"
        r = resolve_defaults(r)
        _check_outputs(self.build_model(r, split), split)
        return r, split

    def datasets(self, split: Any, cfg: TrainConfig, use_cuda: bool) -> tuple[Any, Any]:
        return encoded_dataset(split.train, split.spec), encoded_dataset(split.val, split.spec)

    def build_model(self, cfg: TrainConfig, split: Any) -> nn.Module:
        return _build(cfg.model, len(split.classes), split.spec, {})

    def device_transform(self, cfg: TrainConfig, device: torch.device) -> Callable | None:
        return None

    def outputs_match(self, source: dict[str, Any], split: Any) -> bool:
        return list(source.get("classes") or []) == list(split.classes) and source.get("text") == split.spec

    def pictures(self, cfg: TrainConfig, best: dict[str, Any], history: list[dict[str, Any]], split: Any) -> None:
        from torchferry.distributed.checkpoint import model_from_checkpoint
        from torchferry.distributed.report import MAX_MATRIX_CLASSES, plot_confusion, plot_curves

        plot_curves(history, os.path.join(cfg.run_dir, "curves.png"))
        if len(split.classes) > MAX_MATRIX_CLASSES:
            return
        model = model_from_checkpoint(best, factory=cfg.model)
        ids, labels = encoded_dataset(split.val, split.spec).tensors
        with torch.no_grad():
            predicted = torch.cat([model(chunk).argmax(1) for chunk in ids.split(256)])
        k = len(split.classes)
        matrix = torch.bincount(labels * k + predicted, minlength=k * k).reshape(k, k).numpy()
        plot_confusion(matrix, split.classes, os.path.join(cfg.run_dir, "confusion_matrix.png"))

    def checkpoint_fields(self, split: Any, cfg: TrainConfig) -> dict[str, Any]:
        return {"num_classes": len(split.classes), "classes": list(split.classes), "text": split.spec}

    def field_problems(self, obj: dict[str, Any]) -> Iterator[str]:
        arch = obj["arch"]
        from torchferry.distributed.models import FACTORY_PATTERN

        if not isinstance(arch, str) or not (arch in TEXT_ARCHS or FACTORY_PATTERN.fullmatch(arch)) or len(arch) > 200:
            yield f"arch {short(arch)} is neither {' nor '.join(TEXT_ARCHS)} nor a package.module:factory name"
        yield from classifier_problems(obj, text_spec_problems(obj["text"]))

    def model_builder(self, checkpoint: dict[str, Any], factory: str | None) -> Callable[[], nn.Module]:
        from torchferry.distributed.models import is_custom, require_trusted_arch

        arch = checkpoint["arch"]
        if arch not in TEXT_ARCHS or factory is not None:
            require_trusted_arch(arch, factory)
        raw = checkpoint.get("arch_kwargs") or {}
        kwargs = dict(raw) if is_custom(arch) else check_text_arch_kwargs(raw)
        num_classes, spec = int(checkpoint["num_classes"]), checkpoint["text"]
        return lambda: _build(arch, num_classes, spec, kwargs)

    # export ---------------------------------------------------------------------------------------
    def input_shape(self, checkpoint: dict[str, Any]) -> list[int]:
        return [int(checkpoint["text"]["max_length"])]

    def golden_kind(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        return {"dtype": "int64", "low": 0, "high": len(checkpoint["text"]["vocab"])}

    def random_input(self, checkpoint: dict[str, Any], batch: int, generator: Any) -> torch.Tensor:
        spec = checkpoint["text"]
        ids = torch.randint(0, len(spec["vocab"]), (batch, int(spec["max_length"])), generator=generator)
        lengths = torch.randint(0, int(spec["max_length"]) + 1, (batch, 1), generator=generator)
        return ids.masked_fill(torch.arange(ids.shape[1]).unsqueeze(0) >= lengths, 0)

    def validation_set(self, checkpoint: dict[str, Any], data: str | None, val_data: str | None = None,
                       image_root: str | None = None) -> tuple[Any, str]:
        """The validation texts of `data` (the command line's --data; --val-data when given) as the checkpoint
        encodes them, split with its seed and --val-split, and what they are."""
        if image_root:
            raise TorchferryError("--image-root is for images; a text checkpoint reads --data (and --val-data)")
        cfg = TrainConfig.from_dict(dict(checkpoint["config"]))
        if not data:
            raise TorchferryError(f"the checkpoint was trained on {cfg.data[:200]!r}; pass --data to read it (a "
                                  "checkpoint alone does not choose which files are read)")
        cfg = dataclasses.replace(cfg, data=absolute_path(data), val_data=absolute_path(val_data) if val_data else None)
        split = read_split(cfg)
        if split.classes != list(checkpoint["classes"]):
            raise TorchferryError(f"{data!r} has labels {split.classes[:5]}, the checkpoint {checkpoint['classes'][:5]}")
        return encoded_dataset(split.val, checkpoint["text"]), f"{len(split.val)} validation texts from {data}"

    def real_batches(self, checkpoint: dict[str, Any], data: str | None, limit: int) -> tuple[Iterator, str]:
        dataset, _ = self.validation_set(checkpoint, data)
        rows = range(min(len(dataset), limit))
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, rows), batch_size=32)
        return iter(loader), f"{len(rows)} validation texts from {data}"
