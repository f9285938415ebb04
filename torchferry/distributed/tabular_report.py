"""The tabular task's picture: predicted against actual values of the validation rows (val_predictions.png)."""

from __future__ import annotations

from collections.abc import Sequence

from torchferry.distributed.report import _save, figure_module


def predicted_vs_actual(predicted: Sequence[float], actual: Sequence[float], target: str, path: str) -> None:
    """A scatter of predicted against actual `target`, with the line where they are equal, written atomically."""
    plt = figure_module()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(actual, predicted, s=12, alpha=0.7)
    low, high = min(*actual, *predicted), max(*actual, *predicted)
    ax.plot([low, high], [low, high], "--", color="gray", label="predicted = actual")
    ax.set(xlabel=f"actual {target}", ylabel=f"predicted {target}", title=f"validation rows ({len(actual)})")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
