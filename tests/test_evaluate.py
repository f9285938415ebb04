"""`python -m distributed.evaluate` and the pictures a run leaves (curves, prediction grid)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from distributed import checkpoint as ckpt
from distributed import evaluate


def test_run_leaves_curves_and_prediction_grid(trained_run: dict) -> None:
    for name in ("curves.png", "val_predictions.png"):
        with Image.open(trained_run["run_dir"] / name) as img:
            assert img.format == "PNG" and img.size[0] > 200


def test_evaluate_reports_what_training_recorded(trained_run: dict, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    best_path = trained_run["run_dir"] / "best.pth"
    code = evaluate.main([str(best_path), "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads((tmp_path / "evaluation.json").read_text())
    best = ckpt.load_checkpoint(str(best_path))
    assert report["accuracy"] == pytest.approx(best["metrics"]["val_acc"], abs=1e-9)
    assert report["images"] == 24 and sum(map(sum, report["confusion_matrix"])) == 24
    assert [r["class"] for r in report["per_class"]] == ["blue", "green", "red"]
    assert all(r["support"] == 8 for r in report["per_class"])
    assert "confusion matrix (rows: true, columns: predicted)" in out and "most confused" in out
    with Image.open(tmp_path / "confusion_matrix.png") as img:
        assert img.format == "PNG"


def test_evaluate_on_other_data_with_other_classes_is_refused(trained_run: dict, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    from conftest import write_class_tree

    write_class_tree(tmp_path / "other", 5, classes=("red", "green"))
    code = evaluate.main([str(trained_run["run_dir"] / "best.pth"), "--data", str(tmp_path / "other")])
    assert code == 2 and "differ from the checkpoint's" in capsys.readouterr().err


def test_evaluate_refuses_a_damaged_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    assert evaluate.main([str(tmp_path / "bad.pth")]) == 2
    assert "cannot load" in capsys.readouterr().err
