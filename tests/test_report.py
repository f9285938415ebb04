"""The end-of-run pictures cost one drawing each: the prediction grid reaches TensorBoard as the PNG written."""

from __future__ import annotations

from pathlib import Path

import matplotlib.figure
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from torchferry.distributed import report


class _FirstPixel(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(x[:, 0, 0, 0].round().long(), 3).float()


def test_prediction_grid_is_drawn_once_for_the_file_and_tensorboard(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    draws, saving = [], []  # each drawing of a figure: whether it happened while the PNG file was being written
    real_draw, real_save = matplotlib.figure.Figure.draw, report._save
    monkeypatch.setattr(matplotlib.figure.Figure, "draw", lambda fig, renderer: (draws.append(bool(saving)),
                                                                                  real_draw(fig, renderer))[1])

    def save(fig, path):
        saving.append(path)
        try:
            return real_save(fig, path)
        finally:
            saving.pop()

    monkeypatch.setattr(report, "_save", save)
    dataset = [(torch.full((1, 8, 8), float(i % 3)), i % 3) for i in range(30)]
    writer = SummaryWriter(str(tmp_path / "tb"))
    report.prediction_grid(_FirstPixel(), dataset, ["a", "b", "c"], {"mean": [0.0], "std": [1.0]},
                           str(tmp_path / "grid.png"), count=9, writer=writer)
    writer.close()
    assert draws and all(draws)  # drawn for the file only, never again for TensorBoard
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["val_predictions"]
    (image,) = events.Images("val_predictions")
    with Image.open(tmp_path / "grid.png") as png:
        assert (image.width, image.height) == png.size
        assert np.asarray(png.convert("RGB")).std() > 0  # something was drawn
