"""`python -m distributed.evaluate` and the pictures a run leaves (curves, prediction grid)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from torchferry.distributed import checkpoint as ckpt
from torchferry.distributed import TorchferryError, evaluate, report


@pytest.mark.slow
def test_run_leaves_curves_and_prediction_grid(trained_run: dict) -> None:
    for name in ("curves.png", "val_predictions.png"):
        with Image.open(trained_run["run_dir"] / name) as img:
            assert img.format == "PNG" and img.size[0] > 200


@pytest.mark.slow
def test_evaluate_reports_what_training_recorded(trained_run: dict, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    best_path = trained_run["run_dir"] / "best.pth"
    code = evaluate.main([str(best_path), "--data", str(trained_run["data"]), "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads((tmp_path / "evaluation.json").read_text())
    best = ckpt.load_checkpoint(str(best_path))
    assert report["accuracy"] == pytest.approx(best["metrics"]["val_acc"], abs=1e-9)
    assert report["items"] == "images" and report["images"] == 24 and sum(map(sum, report["confusion_matrix"])) == 24
    assert [r["class"] for r in report["per_class"]] == ["blue", "green", "red"]
    assert all(r["support"] == 8 for r in report["per_class"])
    assert "confusion matrix (rows: true, columns: predicted)" in out and "most confused" in out
    with Image.open(tmp_path / "confusion_matrix.png") as img:
        assert img.format == "PNG"


def test_evaluate_on_other_data_with_other_classes_is_refused(small_checkpoint: dict, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    from helpers import write_class_tree

    write_class_tree(tmp_path / "other", 5, classes=("red", "green"))
    code = evaluate.main([str(small_checkpoint["checkpoint"]), "--data", str(tmp_path / "other")])
    assert code == 2 and "differ from the checkpoint's" in capsys.readouterr().err


def test_evaluate_refuses_a_damaged_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    assert evaluate.main([str(tmp_path / "bad.pth")]) == 2
    assert "cannot load" in capsys.readouterr().err


class _PixelClassifier(torch.nn.Module):
    """Predicts the class written in an image's first pixel (one-hot logits)."""

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(x[:, 0, 0, 0].round().long(), self.classes).float()


def test_prediction_grid_shows_the_mistakes_first(tmp_path: Path) -> None:
    wrong = {37: 2, 81: 1}  # index -> the class its image says (its label is index % 3)
    dataset = []
    for i in range(100):
        x = torch.zeros(1, 8, 8)
        x[0, 0, 0] = wrong.get(i, i % 3)
        dataset.append((x, i % 3))
    shown = report.prediction_grid(_PixelClassifier(3), dataset, ["a", "b", "c"], {"mean": [0.0], "std": [1.0]},
                                   str(tmp_path / "grid.png"), count=16)
    assert len(shown) == 16
    assert [e["index"] for e in shown[:2]] == [37, 81] and not any(e["correct"] for e in shown[:2])
    assert shown[0]["title"] == "c / b" and shown[1]["title"] == "b / a"  # predicted / true
    assert all(e["correct"] for e in shown[2:]) and len({e["true"] for e in shown[2:]}) == 3
    with Image.open(tmp_path / "grid.png") as img:
        assert img.format == "PNG"


def test_curves_have_whole_epoch_ticks(tmp_path: Path) -> None:
    history = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": 1.1 / (e + 1), "train_acc": 0.5 + 0.1 * e,
                "val_acc": 0.45 + 0.1 * e} for e in range(3)]
    drawn = report.plot_curves(history, str(tmp_path / "curves.png"))
    assert drawn["epochs"] == [1, 2, 3]
    for ticks in drawn["xticks"]:
        assert ticks and all(t == int(t) for t in ticks) and {1.0, 2.0, 3.0} <= set(ticks)


@pytest.mark.parametrize("classes", [["cat", "dog", "bird"], ["a rather long class name", "dog", "bird"]])
def test_text_confusion_matrix_labels_rows_and_columns_alike(classes: list[str]) -> None:
    lines = report.confusion_table([[5, 1, 0], [0, 6, 0], [2, 0, 4]], classes)
    columns = lines[0].split()
    rows = [ln.split()[0] for ln in lines[1:4]]
    assert columns == rows
    assert [ln.split()[1:] for ln in lines[1:4]] == [["5", "1", "0"], ["0", "6", "0"], ["2", "0", "4"]]
    if columns == ["0", "1", "2"]:
        assert lines[4] == "classes: 0 = a rather long class name, 1 = dog, 2 = bird"
    else:
        assert columns == classes


def test_evaluate_reports_on_a_text_checkpoint(tmp_path: Path) -> None:
    from helpers import write_text_checkpoint, write_text_csv

    data = write_text_csv(tmp_path / "texts.csv", per_class=10)
    best = write_text_checkpoint(tmp_path / "best.pth", data, epochs=2)
    report = evaluate.evaluate_checkpoint(str(best), str(data))
    assert report["classes"] == ["food", "sports", "weather"] and report["texts"] == 6 and "images" not in report
    assert evaluate.format_report(report).startswith(f"accuracy {report['accuracy']:.4f} on 6 texts (")
    assert sum(map(sum, report["confusion_matrix"])) == 6 and "validation texts" in report["data"]
    with pytest.raises(TorchferryError, match="pass --data"):
        evaluate.evaluate_checkpoint(str(best))
    with pytest.raises(TorchferryError, match="--image-root is for images"):
        evaluate.evaluate_checkpoint(str(best), str(data), image_root=str(tmp_path))


def test_evaluate_asks_the_task_whether_it_classifies() -> None:
    from torchferry.distributed.tasks import get_task

    assert [get_task(name).classifier for name in ("image", "text", "tabular")] == [True, True, False]


def test_the_confusion_matrix_is_bounded_whatever_the_classes(tmp_path: Path) -> None:
    """The data or a checkpoint choose the classes (100,000 at most): the picture stops growing at 4,000 px (300
    classes drew a 13,700 px square: 4.8 GB and 18 s) and the dense matrix is made up to 1,000 classes (100,000
    would be 80 GB), the most confused pairs counted from the mistakes either way."""
    import numpy as np
    from sklearn.metrics import confusion_matrix

    report.plot_confusion(np.eye(150, dtype=np.int64), [f"class {i}" for i in range(150)], str(tmp_path / "c.png"))
    with Image.open(tmp_path / "c.png") as img:
        assert max(img.size) <= 4100, img.size
    truth, preds = np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 0, 0, 1])
    matrix, pairs = evaluate.confusion(truth, preds, ["a", "b", "c"])
    assert (matrix == confusion_matrix(truth, preds, labels=[0, 1, 2])).all()
    assert pairs == [(2, "c", "a"), (1, "c", "b"), (1, "a", "b")]
    many = [f"c{i}" for i in range(100_000)]
    matrix, pairs = evaluate.confusion(np.array([5, 99_999, 7]), np.array([5, 3, 7]), many)
    assert matrix is None and pairs == [(1, "c99999", "c3")]
