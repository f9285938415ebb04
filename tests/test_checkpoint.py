"""The checkpoint contract: atomic, self-describing, weights-only, refused when damaged or foreign."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import png

from torchferry.distributed import TorchferryError
from torchferry.distributed import checkpoint as ckpt
from torchferry.distributed.models import build_model


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
    model = ckpt.model_from_checkpoint(loaded, factory=None)
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


def test_a_file_torch_save_did_not_write_is_named_for_what_it_is(tmp_path: Path) -> None:
    """An exported model.onnx, an image or an empty file passed where a checkpoint goes is said to be one, not
    called a refused pickle (torch.load's 'Unsupported operand 8'); both torch.save formats still load."""
    (tmp_path / "model.onnx").write_bytes(b"\x08\x08\x12\x07pytorch")  # how an ONNX protobuf begins
    (tmp_path / "digit.png").write_bytes(png(8, 8))
    (tmp_path / "empty.pth").write_bytes(b"")
    reasons = {"model.onnx": "it is an ONNX model, not a checkpoint: pass the best.pth it was exported from",
               "digit.png": "it is not a PyTorch checkpoint (not a file torch.save wrote): pass a run's best.pth",
               "empty.pth": "it is empty"}
    for name, reason in reasons.items():
        with pytest.raises(ckpt.CheckpointError) as refused:
            ckpt.load_checkpoint(str(tmp_path / name))
        assert str(refused.value) == f"cannot load {str(tmp_path / name)!r}: {reason}"
    torch.save(sample_checkpoint(), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    ckpt.save_checkpoint(sample_checkpoint(), str(tmp_path / "zip.pth"))
    assert ckpt.load_checkpoint(str(tmp_path / "legacy.pth"))["classes"] == sample_checkpoint()["classes"]
    assert ckpt.load_checkpoint(str(tmp_path / "zip.pth"))["classes"] == sample_checkpoint()["classes"]


def test_a_run_folder_given_for_its_checkpoint_names_the_file_to_pass(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    with pytest.raises(ckpt.CheckpointError) as refused:
        ckpt.load_checkpoint(str(run))
    assert str(refused.value) == f"checkpoint {str(run)!r} is a folder, not a file"
    ckpt.save_checkpoint(sample_checkpoint(), str(run / "best.pth"))
    with pytest.raises(ckpt.CheckpointError) as refused:
        ckpt.load_checkpoint(str(run))
    assert str(refused.value) == f"checkpoint {str(run)!r} is a folder, not a file: pass {str(run / 'best.pth')!r}"


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


# ------------------------------------------------------------------------------------------------
# a checkpoint is data: it never chooses the code that runs, where anything is written or which files are read

EVIL = '''import pathlib
pathlib.Path("marker").write_text("imported")


def factory(num_classes, **kwargs):
    pathlib.Path("marker").write_text("called")
'''


def _cli_checkpoint(tmp_path: Path, **fields) -> Path:
    """A small smallcnn checkpoint with `fields` replaced, saved without a sidecar."""
    c = sample_checkpoint()
    c.update(fields)
    path = tmp_path / "best.pth"
    ckpt.save_checkpoint(c, str(path))
    return path


def test_a_factory_named_by_a_checkpoint_is_never_imported(tmp_path: Path) -> None:
    """`evil:factory` in the working folder would be imported and called by `python -m export.onnx`; it is refused
    in one line that names --model, and nothing is written."""
    (tmp_path / "evil.py").write_text(EVIL)
    path = _cli_checkpoint(tmp_path, arch="evil:factory")
    before = sorted(os.listdir(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "export.onnx", str(path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--model evil:factory" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "marker").exists() and sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("command", ["verify", "evaluate"])
def test_verify_and_evaluate_refuse_a_factory_they_were_not_given(command: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    from torchferry.distributed import evaluate
    from torchferry.export import verify

    (tmp_path / "evil.py").write_text(EVIL)
    (tmp_path / "model.onnx").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _cli_checkpoint(tmp_path, arch="evil:factory")
    before = sorted(os.listdir(tmp_path))
    argv = ["model.onnx", str(path)] if command == "verify" else [str(path), "--data", str(tmp_path)]
    assert (verify.main if command == "verify" else evaluate.main)(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--model evil:factory" in err and "Traceback" not in err
    assert not (tmp_path / "marker").exists() and sorted(os.listdir(tmp_path)) == before


def test_a_factory_named_on_the_command_line_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    from custom_model import build

    c = sample_checkpoint()
    c.update(arch="custom_model:build", state_dict=ckpt.clean_state_dict(build(3)))
    model = ckpt.model_from_checkpoint(c, factory="custom_model:build")
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 3)
    with pytest.raises(TorchferryError, match="--model 'other:f' is not the model of the checkpoint"):
        ckpt.model_from_checkpoint(c, factory="other:f")


def test_arch_kwargs_cannot_call_a_library_function(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`logging:basicConfig` with filename/filemode 'w' truncated a file; now it is refused and the file is intact."""
    from torchferry.export import onnx as export_onnx

    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    path = _cli_checkpoint(tmp_path, arch="logging:basicConfig",
                           arch_kwargs={"filename": str(victim), "filemode": "w", "force": True})
    before = sorted(os.listdir(tmp_path))
    assert export_onnx.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--model logging:basicConfig" in err and "Traceback" not in err
    assert victim.read_text() == "keep me" and sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("kwargs,message", [
    ({"width": 10**9}, "at most"), ({"width": [1, 2]}, "plain number"), ({"in_channels": 3}, "not arguments"),
    ({"width": 0}, "width must be an integer from 1 to 1024"), ({"dropout": 2.0}, "dropout must be in"),
])
def test_arch_kwargs_are_plain_scalars_the_builder_takes(kwargs: dict, message: str) -> None:
    c = sample_checkpoint()
    c["arch_kwargs"] = kwargs
    with pytest.raises(TorchferryError, match=message):
        ckpt.check_checkpoint(c, "c.pth")
        ckpt.model_from_checkpoint(c, factory=None)


def test_torchvision_arch_kwargs_are_checked_against_the_model_class() -> None:
    """resnet takes its model class's scalars (`zero_init_residual`); `image_size` is no ResNet argument; one
    that its builder refuses is one line."""
    from torchferry.distributed.models import build_model

    model = build_model("resnet18", 3)
    c = sample_checkpoint()
    c.update(arch="resnet18", state_dict=ckpt.clean_state_dict(model),
             preprocess={**c["preprocess"], "size": [32, 32], "resize": 32})
    assert ckpt.model_from_checkpoint(c, factory=None)(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(TorchferryError, match="not arguments of resnet18"):
        ckpt.model_from_checkpoint({**c, "arch_kwargs": {"image_size": 64}}, factory=None)
    assert ckpt.model_from_checkpoint({**c, "arch_kwargs": {"zero_init_residual": True}}, factory=None)
    with pytest.raises(ckpt.CheckpointError, match="cannot build resnet18 with arch_kwargs"):
        ckpt.model_from_checkpoint({**c, "arch_kwargs": {"width_per_group": 4096}}, factory=None)


def test_arch_kwargs_that_do_not_fit_the_weights_allocate_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model is first built on the meta device: a width the weights do not have is refused from shapes alone."""
    c = sample_checkpoint()
    c["arch_kwargs"] = {"width": 1024}
    built = []
    monkeypatch.setattr(ckpt.torch.nn.Module, "load_state_dict", lambda *a, **k: built.append(a))
    with pytest.raises(ckpt.CheckpointError, match=r"do not fit its smallcnn model \(\S+ is \[3, 128\], the model has"):
        ckpt.model_from_checkpoint(c, factory=None)
    assert built == []


def _malformed() -> dict[str, tuple[dict, str]]:
    good = sample_checkpoint()
    pre = good["preprocess"]
    return {
        "config data=5": ({"config": {"data": 5}}, "config key 'data' must be str"),
        "config a string": ({"config": "digits"}, "config must be a mapping"),
        "config unknown key": ({"config": {"evil": 1}}, "unknown training config keys"),
        "huge size": ({"preprocess": {**pre, "size": [100000, 100000]}}, "preprocess.size"),
        "size a string": ({"preprocess": {**pre, "size": "16"}}, "preprocess.size"),
        "huge resize": ({"preprocess": {**pre, "resize": 10**9}}, "preprocess.resize"),
        "2 channels": ({"preprocess": {**pre, "channels": 2}}, "preprocess.channels"),
        "short mean": ({"preprocess": {**pre, "mean": [0.5]}}, "preprocess.mean"),
        "zero std": ({"preprocess": {**pre, "std": [0.0, 0.5, 0.5]}}, "preprocess.std must be positive"),
        "nearest": ({"preprocess": {**pre, "interpolation": "nearest"}}, "preprocess.interpolation"),
        "preprocess a list": ({"preprocess": [16, 16]}, "preprocess must be a mapping"),
        "classes count": ({"classes": ["a", "b"]}, "classes lists 2 names for num_classes 3"),
        "classes numbers": ({"classes": [1, 2, 3]}, "classes must be a list"),
        "num_classes str": ({"num_classes": "3"}, "num_classes must be an integer"),
        "num_classes huge": ({"num_classes": 10**9}, "num_classes must be an integer"),
        "metrics a string": ({"metrics": "good"}, "metrics must map"),
        "val_acc 7": ({"metrics": {"val_acc": 7.0}}, "metrics.val_acc"),
        "epoch negative": ({"epoch": -1}, "epoch must be"),
        "versions a list": ({"versions": ["torch"]}, "versions must map"),
        "history junk": ({"history": [{"epoch": "x"}]}, "history must be"),
        "state_dict a string": ({"state_dict": "weights"}, "state_dict must map"),
        "wrong weights": ({"state_dict": {"w": torch.zeros(1)}}, "do not fit"),
        "arch not a name": ({"arch": "os.system('id')"}, "neither smallcnn"),
        "arch a number": ({"arch": 5}, "neither smallcnn"),
    }


@pytest.mark.parametrize("case", list(_malformed()))
def test_malformed_fields_exit_2_with_one_line_and_write_nothing(case: str, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    from torchferry.distributed import evaluate
    from torchferry.export import onnx as export_onnx

    fields, message = _malformed()[case]
    path = _cli_checkpoint(tmp_path, **fields)
    before = sorted(os.listdir(tmp_path))
    for main in (export_onnx.main, evaluate.main):
        assert main([str(path), "--data", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and message in err and "Traceback" not in err, err
        assert sorted(os.listdir(tmp_path)) == before


def test_build_checkpoint_is_what_training_and_loading_agree_on(tmp_path: Path) -> None:
    """One builder: the epoch checkpoint (with resume state) and a bare one both pass the loader's checks."""
    from torchferry.distributed.config import TrainConfig, resolve_defaults

    cfg = resolve_defaults(TrainConfig(model="smallcnn", image_size=16, resize_size=16, name="built"))
    model = build_model("smallcnn", 10, channels=int(cfg.channels or 1))
    metrics = {"val_acc": 0.5, "val_loss": 1.0, "train_loss": 1.2, "train_acc": 0.4, "lr": 0.1}
    bare = ckpt.build_checkpoint(model, cfg, [str(i) for i in range(10)], epoch=3, metrics=metrics)
    assert set(ckpt.REQUIRED_KEYS) <= set(bare) and not set(bare) & {"optimizer", "history"}
    assert bare["metrics"] == {k: metrics[k] for k in ckpt.METRICS}  # the contract's metrics, not the whole row
    assert bare["preprocess"]["size"] == [16, 16] and bare["config"] == cfg.to_dict()
    resumable = ckpt.build_checkpoint(model, cfg, [str(i) for i in range(10)], epoch=3, metrics=metrics,
                                      resume={"history": [], "optimizer": {}, "best_val_acc": 0.5})
    for name, checkpoint in (("bare.pth", bare), ("resumable.pth", resumable)):
        ckpt.save_checkpoint(checkpoint, str(tmp_path / name))
        loaded = ckpt.load_checkpoint(str(tmp_path / name))
        assert loaded["epoch"] == 3 and loaded.get("best_val_acc") == checkpoint.get("best_val_acc")
    assert isinstance(ckpt.model_from_checkpoint(loaded, factory=None), torch.nn.Module)


def test_files_from_before_tasks_are_image_files(small_checkpoint: dict, tmp_path: Path) -> None:
    """A checkpoint and an ONNX file without the `task` key (every file written before tasks existed) load,
    export with parity and serve as the image classifier they are."""
    import numpy as np
    import onnx

    from torchferry.contract import golden_inputs, sha256_file, sidecar_path, sidecar_text
    from torchferry.export.onnx import export_checkpoint
    from torchferry.serve.predictor import Predictor

    old = torch.load(small_checkpoint["checkpoint"], weights_only=True)
    assert old.pop("task") == "image"
    old["config"].pop("task", None)
    path = str(tmp_path / "old.pth")
    ckpt.save_checkpoint(old, path, sidecar=True)
    loaded = ckpt.load_checkpoint(path)
    assert loaded.get("task", "image") == "image" and loaded["classes"] == old["classes"]
    model_path = tmp_path / "old.onnx"
    report = export_checkpoint(path, str(model_path), data=str(small_checkpoint["data"]))
    assert report["passed"], report
    model = onnx.load(str(model_path))
    kept = [p for p in model.metadata_props if p.key != "task"]
    assert len(kept) == len(model.metadata_props) - 1  # the export wrote it; this file is as an older one was
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(model_path))
    with open(sidecar_path(str(model_path)), "wb") as f:
        f.write(sidecar_text(str(model_path), sha256_file(str(model_path))))
    predictor = Predictor(str(model_path))
    assert predictor.info.task == "image" and predictor.info.classes == old["classes"]
    predictor.prove()  # the golden outputs the export recorded
    x = golden_inputs([2, *predictor.info.input_shape[1:]])
    assert predictor.run(x).shape == (2, len(old["classes"])) and np.isfinite(predictor.run(x)).all()
