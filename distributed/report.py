"""Pictures of a run: loss/accuracy curves, a grid of validation predictions, the confusion matrix.

Drawn with matplotlib's Agg backend (no display needed) and written atomically as PNG files; the grid
also goes to TensorBoard.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from distributed.checkpoint import atomic_write_bytes


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _figure().close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_curves(history: Sequence[dict[str, Any]], path: str) -> None:
    """curves.png: train/val loss and accuracy by epoch."""
    plt = _figure()
    rows = sorted(history, key=lambda r: r["epoch"])
    epochs = [r["epoch"] + 1 for r in rows]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("train_loss", "-"), ("val_loss", "--")):
        loss_ax.plot(epochs, [r[key] for r in rows], style, marker="o", label=key)
    for key, style in (("train_acc", "-"), ("val_acc", "--")):
        acc_ax.plot(epochs, [r[key] for r in rows], style, marker="o", label=key)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def _denormalize(x: torch.Tensor, preprocess: dict[str, Any]) -> np.ndarray:
    mean = torch.tensor(preprocess["mean"]).view(-1, 1, 1)
    std = torch.tensor(preprocess["std"]).view(-1, 1, 1)
    img = (x * std + mean).clamp(0, 1).numpy()
    return img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)


@torch.inference_mode()
def prediction_grid(model: nn.Module, dataset: Any, classes: Sequence[str], preprocess: dict[str, Any],
                    path: str, count: int = 16, writer: Any = None) -> float:
    """val_predictions.png: `count` validation images titled predicted/true, green when right, red when wrong.

    Returns the fraction right among them.
    """
    plt = _figure()
    n = min(count, len(dataset))
    # Spread over the set, so that every class tends to appear.
    indices = np.linspace(0, len(dataset) - 1, n).astype(int).tolist()
    images, labels = zip(*(dataset[i] for i in indices))
    preds = model.eval()(torch.stack(list(images))).argmax(1).tolist()
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, x, label, pred in zip(axes.flat, images, labels, preds):
        ax.imshow(_denormalize(x, preprocess), cmap="gray" if x.shape[0] == 1 else None)
        ax.set_title(f"{classes[pred]} / {classes[label]}", color="green" if pred == label else "red", fontsize=9)
    fig.suptitle("predicted / true")
    if writer is not None:
        writer.add_figure("val_predictions", fig)
    _save(fig, path)
    return sum(p == t for p, t in zip(preds, labels)) / max(n, 1)


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], path: str) -> None:
    """confusion_matrix.png: counts, true classes down, predicted across."""
    plt = _figure()
    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true",
           title="confusion matrix")
    ax.set_xticklabels(classes, rotation=90)
    ax.set_yticklabels(classes)
    if len(classes) <= 30:
        peak = matrix.max() or 1
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] > peak / 2 else "black")
    _save(fig, path)


def run_pictures(run_dir: str, best: dict[str, Any], history: Sequence[dict[str, Any]], val_dataset: Any) -> None:
    """curves.png and val_predictions.png (also in TensorBoard) for a finished run."""
    from torch.utils.tensorboard import SummaryWriter

    from distributed.checkpoint import model_from_checkpoint

    plot_curves(history, os.path.join(run_dir, "curves.png"))
    writer = SummaryWriter(os.path.join(run_dir, "tb"))
    try:
        prediction_grid(model_from_checkpoint(best), val_dataset, best["classes"], best["preprocess"],
                        os.path.join(run_dir, "val_predictions.png"), writer=writer)
    finally:
        writer.close()
