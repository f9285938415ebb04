"""The checkpoint contract: atomic, self-describing, weights-only, refused when damaged or foreign."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from distributed import checkpoint as ckpt
from distributed.models import build_model


def sample_checkpoint() -> dict:
    model = build_model("smallcnn", 3, channels=3)
    return {"format": ckpt.FORMAT, "arch": "smallcnn", "arch_kwargs": {}, "num_classes": 3,
            "classes": ["a", "b", "c"],
            "preprocess": {"size": [16, 16], "resize": 16, "mean": [0.5] * 3, "std": [0.5] * 3, "channels": 3,
                           "interpolation": "bilinear"},
            "state_dict": ckpt.clean_state_dict(model), "epoch": 2,
            "metrics": {"val_acc": 0.9, "val_loss": 0.3, "train_loss": 0.2, "train_acc": 0.95},
            "config": {"lr": 0.1, "mean": None}, "versions": ckpt.versions()}


def test_round_trip_rebuilds_the_model(tmp_path: Path) -> None:
    c = sample_checkpoint()
    digest = ckpt.save_checkpoint(c, str(tmp_path / "best.pth"), sidecar=True)
    assert (tmp_path / "best.pth.sha256").read_text().split()[0] == digest == ckpt.sha256_file(str(tmp_path / "best.pth"))
    loaded = ckpt.load_checkpoint(str(tmp_path / "best.pth"))
    model = ckpt.model_from_checkpoint(loaded)
    x = torch.randn(2, 3, 16, 16)
    reference = build_model("smallcnn", 3, channels=3)
    reference.load_state_dict(c["state_dict"])
    assert torch.equal(model(x), reference.eval()(x))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_truncated_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.pth"
    ckpt.save_checkpoint(sample_checkpoint(), str(path))
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ckpt.CheckpointError, match="cannot load .* as a weights-only checkpoint"):
        ckpt.load_checkpoint(str(path))


def test_altered_checkpoint_fails_its_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "c.pth"
    ckpt.save_checkpoint(sample_checkpoint(), str(path), sidecar=True)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="does not match its sha256 sidecar"):
        ckpt.load_checkpoint(str(path))


def test_unknown_format_major_is_refused(tmp_path: Path) -> None:
    c = sample_checkpoint()
    c["format"] = "torchferry.checkpoint/2"
    ckpt.save_checkpoint(c, str(tmp_path / "c.pth"))
    with pytest.raises(ckpt.CheckpointError, match="format 'torchferry.checkpoint/2'; this torchferry reads"):
        ckpt.load_checkpoint(str(tmp_path / "c.pth"))


def test_foreign_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pth")
    with pytest.raises(ckpt.CheckpointError, match="not a torchferry checkpoint"):
        ckpt.load_checkpoint(str(tmp_path / "x.pth"))
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(str(tmp_path / "missing.pth"))


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    c = sample_checkpoint()
    c["config"] = {"evil": _Payload(str(marker))}
    with open(tmp_path / "evil.pth", "wb") as f:
        torch.save(c, f, pickle_module=pickle)
    with pytest.raises(ckpt.CheckpointError, match="pickled Python object that weights_only refuses"):
        ckpt.load_checkpoint(str(tmp_path / "evil.pth"))
    assert not marker.exists()


def test_metrics_csv_has_one_row_per_epoch_in_order(tmp_path: Path) -> None:
    rows = [{"epoch": e, "train_loss": 1.0 / (e + 1), "train_acc": 0.5, "val_loss": 0.4, "val_acc": 0.6, "lr": 0.1,
             "images_per_s": 100.0, "seconds": 1.5} for e in (1, 0, 2)]
    ckpt.write_metrics_csv(str(tmp_path / "metrics.csv"), rows)
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == ",".join(ckpt.METRIC_COLUMNS)
    assert [ln.split(",")[0] for ln in lines[1:]] == ["0", "1", "2"]


def test_atomic_write_leaves_old_file_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.bin"
    ckpt.atomic_write_bytes(str(target), b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        ckpt.atomic_write_bytes(str(target), b"new")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]
