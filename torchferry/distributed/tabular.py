"""The tabular regression task: a CSV (or the built-in diabetes set), an MLP by default, MSE or Huber on the
standardised target, MAE/RMSE/R²; the best checkpoint by val_rmse (the Task interface: tasks.py).

The model maps the encoded features (`torchferry.inputs.tabular.encode_rows`: standardised numbers, one-hot
categories) to the target in its own units: a `Regressor` wraps the network and undoes the target's
standardisation with two buffers, so the exported graph answers in the target's units and the server needs
no statistics of the target.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from torchferry.contract import is_number, short
from torchferry.distributed import TorchferryError
from torchferry.distributed.config import TrainConfig, data_set_key, resolve_defaults
from torchferry.distributed.tabular_data import TableSplit, read_table
from torchferry.distributed.tasks import Task
from torchferry.inputs.tabular import encode_rows, features_problems, width

_logger = logging.getLogger(__name__)

MLP_HIDDEN = (64, 64)


class Regressor(nn.Module):
    """`body` (encoded features → standardised target) followed by the target's own scale."""

    def __init__(self, body: nn.Module, target_mean: float, target_std: float):
        super().__init__()
        self.body = body
        self.register_buffer("target_mean", torch.tensor(float(target_mean)))
        self.register_buffer("target_std", torch.tensor(float(target_std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.target_std + self.target_mean


def mlp(in_features: int, out_features: int = 1, hidden: tuple[int, ...] = MLP_HIDDEN) -> nn.Sequential:
    """The default network: Linear and ReLU layers of `hidden` widths, then a linear output."""
    layers: list[nn.Module] = []
    for size in hidden:
        layers += [nn.Linear(in_features, size), nn.ReLU()]
        in_features = size
    return nn.Sequential(*layers, nn.Linear(in_features, out_features))


def build_body(arch: str, in_features: int) -> nn.Module:
    """The network of `arch`: the MLP, or a `package.module:factory` called with in_features= and out_features=1."""
    from torchferry.distributed.models import FACTORY_PATTERN, _import_factory

    if arch == "mlp":
        return mlp(in_features)
    if not FACTORY_PATTERN.fullmatch(arch):
        raise TorchferryError(f"unknown --model {arch!r} for a tabular run; choose mlp or package.module:factory")
    model = _import_factory(arch)(in_features=in_features, out_features=1)
    if not isinstance(model, nn.Module):
        raise TorchferryError(f"--model {arch!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def target_stats(split: TableSplit) -> tuple[float, float]:
    """Mean and standard deviation (1 when constant) of the training split's target."""
    values = torch.tensor([row[split.target] for row in split.train], dtype=torch.float64)
    std = float(values.std(unbiased=False))
    return float(values.mean()), std if std > 0 else 1.0


class StandardisedLoss(nn.Module):
    """MSE or Huber of prediction and target, both standardised by the training target's mean and std."""

    def __init__(self, kind: str, mean: float, std: float, delta: float = 1.0):
        super().__init__()
        self.mean, self.std = mean, std
        self.loss = nn.HuberLoss(delta=delta) if kind == "huber" else nn.MSELoss()

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss((output - self.mean) / self.std, (target - self.mean) / self.std)


def regression_metrics(prefix: str, totals: list[float], count: int) -> dict[str, float]:
    """MAE, RMSE and R² from the sums [Σ|e|, Σe², Σy, Σy²] of `count` rows."""
    n = max(count, 1)
    sae, sse, sy, syy = totals
    sst = syy - sy * sy / n
    return {f"{prefix}_mae": sae / n, f"{prefix}_rmse": math.sqrt(max(sse, 0.0) / n),
            f"{prefix}_r2": 1.0 - sse / sst if sst > 0 else 0.0}


class TabularTask(Task):
    """A regression on a table: float32 [N, F] encoded features in, [N, 1] predictions in the target's units."""

    name = "tabular"
    best_metric, best_mode = "val_rmse", "min"
    metric_columns = ("epoch", "train_loss", "train_rmse", "val_loss", "val_mae", "val_rmse", "val_r2", "lr",
                      "images_per_s", "seconds")
    checkpoint_metrics = ("val_rmse", "val_mae", "val_r2", "val_loss", "train_loss", "train_rmse")
    required_keys = ("features",)
    output_name = "prediction"
    items = "rows"
    sums_length = 4

    def prepare(self, cfg: TrainConfig) -> tuple[TrainConfig, TableSplit]:
        if cfg.model == "smallcnn" or (cfg.model != "mlp" and ":" not in cfg.model):
            raise TorchferryError(f"--model {cfg.model!r} is not a tabular model; choose mlp (the default) or "
                                  "package.module:factory")
        split = read_table(cfg)
        _logger.info("data: %s", split.describe())
        r = dataclasses.replace(cfg, target=split.target)
        if r.name is None:
            source = r.data if data_set_key(r.data) == r.data else split.source.split(".")[0]
            r.name = f"{r.model.rsplit(':', 1)[-1]}-{source}-{time.strftime('%Y%m%d-%H%M%S')}"
        r = resolve_defaults(r)
        model = self.build_model(r, split)
        x = encode_rows(split.train[:2], split.features, with_target=True)
        with torch.no_grad():
            out = model.train()(torch.from_numpy(x))
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(x), 1):
            got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise TorchferryError(f"--model {r.model} returns {got} for a batch of [{len(x)}, {x.shape[1]}] features; "
                                  f"a regression model must return [batch, 1]")
        return r, split

    def datasets(self, split: TableSplit, cfg: TrainConfig, use_cuda: bool) -> tuple[Any, Any]:
        return rows_dataset(split.train, split), rows_dataset(split.val, split)

    def build_model(self, cfg: TrainConfig, split: TableSplit) -> nn.Module:
        return Regressor(build_body(cfg.model, width(split.features)), *target_stats(split))

    def criteria(self, cfg: TrainConfig, split: TableSplit) -> tuple[Callable, Callable]:
        mean, std = target_stats(split)
        return (StandardisedLoss(cfg.loss or "mse", mean, std, cfg.huber_delta),
                StandardisedLoss(cfg.loss or "mse", mean, std, cfg.huber_delta))

    def batch_sums(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        e, y = (output - target).double(), target.double()
        return torch.stack([e.abs().sum(), (e * e).sum(), y.sum(), (y * y).sum()])

    def phase_metrics(self, prefix: str, stats: Any) -> dict[str, float]:
        figures = regression_metrics(prefix, stats.totals, stats.images)
        return figures if prefix == "val" else {f"{prefix}_rmse": figures[f"{prefix}_rmse"]}

    def outputs_match(self, source: dict[str, Any], split: TableSplit) -> bool:
        return source.get("task") == self.name  # one output either way; the inputs must fit to load at all

    def pictures(self, cfg: TrainConfig, best: dict[str, Any], history: list[dict[str, Any]],
                 split: TableSplit) -> None:
        import os

        from torchferry.distributed.checkpoint import model_from_checkpoint
        from torchferry.distributed.report import plot_curves
        from torchferry.distributed.tabular_report import predicted_vs_actual

        plot_curves(history, os.path.join(cfg.run_dir, "curves.png"), figure=("rmse", "RMSE"), ylim=None)
        model = model_from_checkpoint(best, factory=cfg.model)
        with torch.inference_mode():
            predicted = model(torch.from_numpy(encode_rows(split.val, best["features"], unknown="zeros", with_target=True)))
        actual = [row[split.target] for row in split.val]
        predicted_vs_actual(predicted[:, 0].tolist(), actual, split.target,
                            os.path.join(cfg.run_dir, "val_predictions.png"))

    def checkpoint_fields(self, split: TableSplit, cfg: TrainConfig) -> dict[str, Any]:
        return {"features": split.features}

    def field_problems(self, obj: dict[str, Any]) -> Iterator[str]:
        from torchferry.distributed.models import FACTORY_PATTERN

        arch = obj["arch"]
        if not isinstance(arch, str) or len(arch) > 200 or not (arch == "mlp" or FACTORY_PATTERN.fullmatch(arch)):
            yield f"arch {short(arch)} is neither mlp nor a package.module:factory name"
        yield from features_problems(obj["features"])
        metrics = obj["metrics"]
        value = metrics.get("val_rmse") if isinstance(metrics, dict) else None
        if not (is_number(value) and math.isfinite(value) and value >= 0):
            yield f"metrics.val_rmse must be a finite number >= 0, got {short(value)}"

    def model_builder(self, checkpoint: dict[str, Any], factory: str | None) -> Callable[[], nn.Module]:
        from torchferry.distributed.models import require_trusted_arch

        arch = checkpoint["arch"]
        if arch != "mlp" or factory is not None:
            require_trusted_arch(arch, factory)
        if checkpoint.get("arch_kwargs"):
            raise TorchferryError(f"arch_kwargs {short(checkpoint['arch_kwargs'])}: a tabular model takes none")
        features = width(checkpoint["features"])
        return lambda: Regressor(build_body(arch, features), 0.0, 1.0)  # the target's scale is in the weights

    def input_shape(self, checkpoint: dict[str, Any]) -> list[int]:
        return [width(checkpoint["features"])]

    def onnx_metadata(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        metrics = checkpoint["metrics"]
        return {"features": checkpoint["features"], "target": checkpoint["features"]["target"],
                **{k: float(metrics[k]) for k in ("val_rmse", "val_mae", "val_r2") if k in metrics}}

    def metadata_keys(self) -> tuple[str, ...]:
        return ("features", "arch")

    def random_input(self, checkpoint: dict[str, Any], batch: int, generator: Any) -> torch.Tensor:
        return torch.randn(batch, *self.input_shape(checkpoint), generator=generator)

    def real_batches(self, checkpoint: dict[str, Any], data: str | None, limit: int) -> tuple[Iterator, str]:
        cfg = TrainConfig.from_dict(dict(checkpoint["config"]))
        if not data and data_set_key(cfg.data) != cfg.data:
            raise TorchferryError(f"the checkpoint was trained on {cfg.data[:200]!r}; pass --data to read it (a "
                                  "checkpoint alone does not choose which files are read)")
        split = read_table(dataclasses.replace(cfg, data=data or cfg.data, val_data=None))
        rows = split.val[:limit]
        x = torch.from_numpy(encode_rows(rows, checkpoint["features"], unknown="zeros", with_target=True))
        y = torch.tensor([[row[split.target]] for row in rows], dtype=torch.float32)
        return iter(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)), (
            f"{len(rows)} validation rows of {split.source}")


def rows_dataset(rows: list[dict[str, Any]], split: TableSplit) -> torch.utils.data.TensorDataset:
    """(encoded features, [target]) pairs of `rows`; categories the training rows lack encode as zeros."""
    x = torch.from_numpy(encode_rows(rows, split.features, unknown="zeros", with_target=True))
    y = torch.tensor([[row[split.target]] for row in rows], dtype=torch.float32)
    return torch.utils.data.TensorDataset(x, y)
