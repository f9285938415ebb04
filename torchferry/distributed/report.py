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

from torchferry.distributed.checkpoint import atomic_write_bytes


def figure_module() -> Any:
    """matplotlib.pyplot on the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str) -> bytes:
    """Draw `fig` once into a PNG file (atomically); returns the PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    figure_module().close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return buffer.getvalue()


def plot_curves(history: Sequence[dict[str, Any]], path: str, figure: tuple[str, str] = ("acc", "accuracy"),
                ylim: tuple[float, float] | None = (0, 1.02)) -> dict[str, Any]:
    """curves.png: train/val loss and a figure (accuracy; a regression's RMSE: `figure=("rmse", "RMSE")`) by
    epoch (whole epochs on the x axis).

    Returns what was drawn: the epochs (1-based) and the x ticks of each panel.
    """
    plt = figure_module()
    from matplotlib.ticker import MaxNLocator

    rows = sorted(history, key=lambda r: r["epoch"])
    epochs = [r["epoch"] + 1 for r in rows]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("train_loss", "-"), ("val_loss", "--")):
        loss_ax.plot(epochs, [r[key] for r in rows], style, marker="o", label=key)
    key, label = figure
    for name, style in ((f"train_{key}", "-"), (f"val_{key}", "--")):
        acc_ax.plot(epochs, [r[name] for r in rows], style, marker="o", label=name)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    acc_ax.set(xlabel="epoch", ylabel=label, title=label)
    if ylim is not None:
        acc_ax.set_ylim(*ylim)
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    drawn = {"epochs": epochs, "xticks": [_visible_ticks(ax) for ax in (loss_ax, acc_ax)]}
    _save(fig, path)
    return drawn


def _visible_ticks(ax: Any) -> list[float]:
    low, high = sorted(ax.get_xlim())
    return [float(t) for t in ax.get_xticks() if low <= t <= high]


def _denormalize(x: torch.Tensor, preprocess: dict[str, Any]) -> np.ndarray:
    mean = torch.tensor(preprocess["mean"]).view(-1, 1, 1)
    std = torch.tensor(preprocess["std"]).view(-1, 1, 1)
    img = (x * std + mean).clamp(0, 1).numpy()
    return img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)


@torch.inference_mode()
def choose_examples(model: nn.Module, dataset: Any, count: int, scan: int = 512,
                    batch_size: int = 64) -> list[dict[str, Any]]:
    """Up to `count` validation examples to show: the mistakes first, then correct predictions.

    Up to `scan` images spread over the set are predicted; both groups keep that spread (every class tends to
    appear), so a 99 % model still shows the few images it gets wrong.
    """
    model = model.eval()
    indices = np.unique(np.linspace(0, len(dataset) - 1, min(scan, len(dataset))).astype(int)).tolist()
    seen: list[dict[str, Any]] = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        images, labels = zip(*(dataset[i] for i in chunk))
        preds = model(torch.stack(list(images))).argmax(1).tolist()
        seen += [{"index": i, "true": int(t), "predicted": int(p), "correct": int(p) == int(t)}
                 for i, t, p in zip(chunk, labels, preds)]
    wrong = [e for e in seen if not e["correct"]]
    right = [e for e in seen if e["correct"]]
    return (_spread(wrong, count) + _spread(right, count - min(count, len(wrong))))[:count]


def _spread(items: list[Any], n: int) -> list[Any]:
    """n items evenly spaced over `items` (all of them when there are no more than n)."""
    if n <= 0 or not items:
        return []
    if len(items) <= n:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, n).astype(int).tolist()]


def prediction_grid(model: nn.Module, dataset: Any, classes: Sequence[str], preprocess: dict[str, Any],
                    path: str, count: int = 16, writer: Any = None) -> list[dict[str, Any]]:
    """val_predictions.png: validation images titled predicted/true, mistakes first (red), then right ones (green).

    Returns what was drawn, in order: index, true and predicted class index, correct, and the panel's title.
    """
    plt = figure_module()
    shown = choose_examples(model, dataset, count)
    panels = [_denormalize(dataset[e["index"]][0], preprocess) for e in shown]
    n = max(len(shown), 1)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    # One axes showing the panels side by side, each titled by a text in it: matplotlib lays out one axes, where
    # a grid of axes (one per panel) cost 1.5 s to draw, at the end of every run.
    h, w = panels[0].shape[:2] if panels else (8, 8)
    gap_x, gap_y = max(1, w // 10), max(2, int(h * 0.3))
    sheet = np.ones((rows * (h + gap_y), cols * (w + gap_x)) + panels[0].shape[2:] if panels else (h, w))
    fig = plt.figure(figsize=(2.2 * cols, 2.4 * rows))
    ax = fig.add_axes((0, 0, 1, 0.92))
    ax.axis("off")
    for i, (example, panel) in enumerate(zip(shown, panels)):
        top, left = (i // cols) * (h + gap_y) + gap_y, (i % cols) * (w + gap_x)
        sheet[top:top + h, left:left + w] = panel
        example["title"] = f"{classes[example['predicted']]} / {classes[example['true']]}"
        ax.text(left + w / 2, top - 0.5, example["title"], ha="center", va="bottom", fontsize=9,
                color="green" if example["correct"] else "red")
    ax.imshow(sheet, cmap="gray" if sheet.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    wrong = sum(not e["correct"] for e in shown)
    fig.suptitle(f"predicted / true: {wrong} mistake(s) first, then correct predictions" if wrong
                 else "predicted / true (no mistakes among the images checked)")
    png = _save(fig, path)
    if writer is not None:  # the PNG just drawn, not a second drawing of the figure (add_figure draws it again)
        from PIL import Image

        writer.add_image("val_predictions", np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), dataformats="HWC")
    return shown


def confusion_table(matrix: Sequence[Sequence[int]], classes: Sequence[str], max_name: int = 12) -> list[str]:
    """The confusion matrix as text, rows true and columns predicted, both labelled the same way: by class
    name, or by class index with a key when a name is longer than `max_name`."""
    by_name = all(len(c) <= max_name for c in classes)
    labels = list(classes) if by_name else [str(i) for i in range(len(classes))]
    width = max(len(lab) for lab in labels)
    cell = max(width, *(len(str(v)) for row in matrix for v in row)) + 2
    lines = [" " * width + "".join(f"{lab:>{cell}}" for lab in labels)]
    lines += [f"{lab:>{width}}" + "".join(f"{int(v):>{cell}}" for v in row) for lab, row in zip(labels, matrix)]
    if not by_name:
        lines.append("classes: " + ", ".join(f"{i} = {c}" for i, c in enumerate(classes)))
    return lines


# The confusion matrix's picture grows with the classes up to this side (4,000 px at 100 dpi: 64 MB to draw), and
# names them up to MAX_LABELLED_CLASSES: the data (or a checkpoint) choose the classes, 300 took 4.8 GB and 18 s.
MAX_FIGURE_INCHES, MAX_LABELLED_CLASSES = 40.0, 100
# A dense confusion matrix holds classes² counts (each a number in evaluation.json): made up to this many classes
# (8 MB); a checkpoint or a text CSV may name 100,000 classes (80 GB dense), whose most confused pairs still count.
MAX_MATRIX_CLASSES = 1000


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], path: str) -> None:
    """confusion_matrix.png: counts, true classes down, predicted across."""
    plt = figure_module()
    size = min(max(4.0, 0.45 * len(classes) + 2), MAX_FIGURE_INCHES)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues", interpolation="nearest")
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    if len(classes) <= MAX_LABELLED_CLASSES:
        ax.set(xticks=range(len(classes)), yticks=range(len(classes)))
        ax.set_xticklabels(classes, rotation=90)
        ax.set_yticklabels(classes)
    if len(classes) <= 30:
        peak = matrix.max() or 1
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] > peak / 2 else "black")
    _save(fig, path)


def run_pictures(run_dir: str, best: dict[str, Any], history: Sequence[dict[str, Any]], val_dataset: Any, *,
                 factory: str | None = None) -> None:
    """curves.png and val_predictions.png (also in TensorBoard) for a finished run (`factory`: the run's --model)."""
    from torch.utils.tensorboard import SummaryWriter

    from torchferry.distributed.checkpoint import model_from_checkpoint

    plot_curves(history, os.path.join(run_dir, "curves.png"))
    writer = SummaryWriter(os.path.join(run_dir, "tb"))
    try:
        prediction_grid(model_from_checkpoint(best, factory=factory), val_dataset, best["classes"], best["preprocess"],
                        os.path.join(run_dir, "val_predictions.png"), writer=writer)
    finally:
        writer.close()
