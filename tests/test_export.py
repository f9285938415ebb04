"""`python -m export.onnx` and `python -m export.verify`: ONNX proven equal to PyTorch, or nothing kept."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import write_checkpoint, write_class_tree

from distributed import checkpoint as ckpt
from export import metadata as meta
from export import onnx as export_onnx
from export import verify as export_verify


def run(capsys: pytest.CaptureFixture, module, args: list[str]) -> tuple[int, str, str]:
    code = module.main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def exported(trained_run: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The training tests' smallcnn checkpoint, exported once with --optimize --quantize int8."""
    assert trained_run["code"] == 0
    out = tmp_path_factory.mktemp("exported") / "model.onnx"
    report = export_onnx.export_checkpoint(str(trained_run["run_dir"] / "best.pth"), str(out), optimize=True,
                                           quantize="int8")
    return {"report": report, "model": out, "checkpoint": trained_run["run_dir"] / "best.pth"}


def test_trained_checkpoint_exports_and_verifies(exported: dict) -> None:
    report, model = exported["report"], exported["model"]
    assert report["passed"] and report["exporter"] == "dynamo"
    by_case = {c["case"]: c for c in report["cases"]}
    assert {"random batch 1", "random batch 3", "random batch 32", "validation images"} <= set(by_case)
    assert all(c["max_abs"] <= 1e-4 and c["top1_agreement"] == 1.0 for c in report["cases"])
    assert by_case["validation images"]["images"] == 24
    assert (Path(str(model) + ".sha256").read_text().split()[0] == ckpt.sha256_file(str(model)) == report["sha256"])
    assert json.loads(Path(str(model) + ".verify.json").read_text())["passed"] is True
    assert not [p for p in model.parent.iterdir() if p.name.startswith(".")]  # no temp files


def test_model_is_self_describing_and_self_contained(exported: dict) -> None:
    proto = onnx.load(str(exported["model"]))
    onnx.checker.check_model(proto, full_check=True)
    assert meta.external_data_tensors(proto) == []
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    values = meta.read_metadata(proto)
    assert set(meta.KEYS) <= set(values)
    best = ckpt.load_checkpoint(str(exported["checkpoint"]))
    assert values["classes"] == best["classes"] and values["preprocess"] == best["preprocess"]
    assert values["checkpoint_sha256"] == ckpt.sha256_file(str(exported["checkpoint"]))
    assert values["val_acc"] == pytest.approx(best["metrics"]["val_acc"])


def test_golden_outputs_reproduce_without_torch(exported: dict) -> None:
    """What the server will do at start-up: rebuild the golden inputs with numpy, run ORT, compare."""
    golden = meta.read_metadata(onnx.load(str(exported["model"])))["golden"]
    x = meta.golden_inputs(*golden["shape"][1:])
    session = ort.InferenceSession(str(exported["model"]), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x})[0]
    assert np.abs(got - np.asarray(golden["logits"], dtype=np.float32)).max() <= golden["atol"]
    model = ckpt.model_from_checkpoint(ckpt.load_checkpoint(str(exported["checkpoint"])))
    with torch.inference_mode():
        assert np.allclose(model(torch.from_numpy(x)).numpy(), golden["logits"], atol=1e-6)


def test_int8_is_reported_beside_fp32_not_swapped_in(exported: dict) -> None:
    q = exported["report"]["int8"]
    assert q["method"] == "static" and q["calibration_images"] > 0 and q["validation_images"] == 24
    assert 0.0 <= q["int8_top1"] <= 1.0 and q["top1_delta_pp"] == pytest.approx(100 * (q["int8_top1"] - q["fp32_top1"]),
                                                                                   abs=1e-3)
    int8 = onnx.load(q["path"])
    assert any(n.op_type == "QuantizeLinear" for n in int8.graph.node)
    assert meta.read_metadata(int8)["golden"]["source"] == "onnxruntime-int8-static"
    assert ckpt.sha256_file(str(exported["model"])) == exported["report"]["sha256"]  # fp32 untouched
    optimized = ort.InferenceSession(exported["report"]["optimized"], providers=["CPUExecutionProvider"])
    assert optimized.run(None, {"input": np.zeros((1, 3, 16, 16), np.float32)})[0].shape == (1, 3)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_models_export_with_parity(arch: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_class_tree(tmp_path / "data", 4)
    path = write_checkpoint(tmp_path / "best.pth", arch, tmp_path / "data", size=64)
    code, out, err = run(capsys, export_onnx, [str(path)])
    assert code == 0, err
    report = json.loads((tmp_path / "model.onnx.verify.json").read_text())
    assert [c["batch"] for c in report["cases"]] == [1, 3, 32, 32]
    assert all(c["max_abs"] <= 1e-4 and c["top1_agreement"] == 1.0 for c in report["cases"]), report
    assert "validation images" in out and (tmp_path / "model.onnx").is_file()


def test_verify_cli_passes_then_catches_altered_weights(exported: dict, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, export_verify, [str(exported["model"]), str(exported["checkpoint"]),
                                               "--report", str(tmp_path / "ok.json")])
    assert code == 0 and "random batch 32" in out
    altered = ckpt.load_checkpoint(str(exported["checkpoint"]))
    altered["state_dict"]["classifier.1.bias"] += 0.5
    ckpt.save_checkpoint(altered, str(tmp_path / "altered.pth"))
    code, out, err = run(capsys, export_verify, [str(exported["model"]), str(tmp_path / "altered.pth"),
                                                 "--report", str(tmp_path / "bad.json")])
    assert code == 1 and "does not match PyTorch" in err
    assert json.loads((tmp_path / "bad.json").read_text())["passed"] is False


def test_verify_catches_altered_preprocess(exported: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    altered = ckpt.load_checkpoint(str(exported["checkpoint"]))
    altered["preprocess"]["mean"] = [0.5, 0.5, 0.5]
    ckpt.save_checkpoint(altered, str(tmp_path / "altered.pth"))
    code, out, _ = run(capsys, export_verify, [str(exported["model"]), str(tmp_path / "altered.pth"),
                                               "--no-real-images", "--report", str(tmp_path / "r.json")])
    assert code == 1 and "metadata mismatch: preprocess" in out


def test_a_wrong_export_is_never_left_as_model_onnx(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose export is wrong (batch 2 is special, and the exporter fixes the batch at the example's 2):
    verification catches it, and no model.onnx appears."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    write_class_tree(tmp_path / "data", 4)
    path = write_checkpoint(tmp_path / "best.pth", "custom_model:batch_two_special", tmp_path / "data", size=16)
    code, out, err = run(capsys, export_onnx, [str(path)])
    assert code == 1, err
    assert "nothing written as" in err
    assert not (tmp_path / "model.onnx").exists() and not (tmp_path / "model.onnx.sha256").exists()
    assert json.loads((tmp_path / "model.onnx.verify.json").read_text())["passed"] is False
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model-")]


def test_dynamo_failure_falls_back_to_torchscript_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    write_class_tree(tmp_path / "data", 4)
    path = write_checkpoint(tmp_path / "best.pth", "custom_model:data_dependent", tmp_path / "data", size=16)
    code, out, err = run(capsys, export_onnx, [str(path)])
    assert code == 0, err
    assert "the dynamo exporter failed" in caplog.text and "falling back to the TorchScript exporter" in caplog.text
    assert "exporter torchscript" in out
    assert meta.read_metadata(onnx.load(str(tmp_path / "model.onnx")))["exporter"] == "torchscript"


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _bad_checkpoints(tmp: Path) -> dict[str, Path]:
    write_class_tree(tmp / "data", 4)
    good = write_checkpoint(tmp / "good.pth", "smallcnn", tmp / "data", size=16)
    (tmp / "bytes.pth").write_bytes(os.urandom(512))
    (tmp / "trunc.pth").write_bytes(good.read_bytes()[:3000])
    c = ckpt.load_checkpoint(str(good))
    c["format"] = "torchferry.checkpoint/9"
    ckpt.save_checkpoint(c, str(tmp / "future.pth"))
    c["format"] = ckpt.FORMAT
    c["config"] = {"x": _Payload()}
    torch.save(c, tmp / "pickle.pth")
    return {"missing": tmp / "missing.pth", "not a checkpoint": tmp / "bytes.pth", "truncated": tmp / "trunc.pth",
            "unknown format": tmp / "future.pth", "pickled object": tmp / "pickle.pth"}


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"), ("not a checkpoint", "cannot load"), ("truncated", "cannot load"),
    ("unknown format", "torchferry.checkpoint/9"), ("pickled object", "weights_only refuses"),
])
def test_bad_checkpoints_exit_2_and_write_nothing(case: str, message: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = _bad_checkpoints(tmp_path)[case]
    before = sorted(os.listdir(tmp_path))
    code, _, err = run(capsys, export_onnx, [str(path)])
    assert code == 2
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == before and not (tmp_path / "pwned").exists()


def test_external_data_is_detected(tmp_path: Path) -> None:
    proto = onnx.load(str(write_model_with_external_data(tmp_path)), load_external_data=False)
    assert meta.external_data_tensors(proto) == ["w"]


def write_model_with_external_data(tmp: Path) -> Path:
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["input", "w"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 4])], [w])
    model = helper.make_model(graph)
    onnx.save_model(model, str(tmp / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    return tmp / "ext.onnx"
