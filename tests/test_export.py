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
from helpers import write_checkpoint, write_class_tree, write_model_with_external_data

from torchferry import contract
from torchferry.distributed import checkpoint as ckpt
from torchferry.export import metadata as meta
from torchferry.export import onnx as export_onnx
from torchferry.export import verify as export_verify


def run(capsys: pytest.CaptureFixture, module, args: list[str]) -> tuple[int, str, str]:
    code = module.main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def exported(small_checkpoint: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The fitted smallcnn checkpoint (no Ray), exported once with --optimize --quantize int8."""
    out = tmp_path_factory.mktemp("exported") / "model.onnx"
    report = export_onnx.export_checkpoint(str(small_checkpoint["checkpoint"]), str(out), optimize=True,
                                           quantize="int8", data=str(small_checkpoint["data"]))
    return {"report": report, "model": out, **small_checkpoint}


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
    assert set(contract.METADATA_KEYS) <= set(values)
    best = ckpt.load_checkpoint(str(exported["checkpoint"]))
    assert values["classes"] == best["classes"] and values["preprocess"] == best["preprocess"]
    assert values["checkpoint_sha256"] == ckpt.sha256_file(str(exported["checkpoint"]))
    assert values["val_acc"] == pytest.approx(best["metrics"]["val_acc"])


def test_golden_outputs_reproduce_without_torch(exported: dict) -> None:
    """What the server will do at start-up: rebuild the golden inputs with numpy, run ORT, compare."""
    golden = meta.read_metadata(onnx.load(str(exported["model"])))["golden"]
    x = contract.golden_inputs(golden["shape"], golden["seed"], *golden["range"])
    session = ort.InferenceSession(str(exported["model"]), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x})[0]
    assert np.abs(got - np.asarray(golden["logits"], dtype=np.float32)).max() <= golden["atol"]
    model = ckpt.model_from_checkpoint(ckpt.load_checkpoint(str(exported["checkpoint"])), factory=None)
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


@pytest.mark.slow  # two zoo models exported and proven at 64 px: ~20 s on 2 cores (smallcnn's export is fast)
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_models_export_with_parity(arch: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_class_tree(tmp_path / "data", 4)
    path = write_checkpoint(tmp_path / "best.pth", arch, tmp_path / "data", size=64)
    code, out, err = run(capsys, export_onnx, [str(path), "--data", str(tmp_path / "data")])
    assert code == 0, err
    report = json.loads((tmp_path / "model.onnx.verify.json").read_text())
    assert [c["batch"] for c in report["cases"]] == [1, 3, 32, 32]
    assert all(c["max_abs"] <= 1e-4 and c["top1_agreement"] == 1.0 for c in report["cases"]), report
    assert "validation images" in out and (tmp_path / "model.onnx").is_file()


def test_verify_cli_passes_then_catches_altered_weights(exported: dict, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, export_verify, [str(exported["model"]), str(exported["checkpoint"]),
                                               "--data", str(exported["data"]), "--report", str(tmp_path / "ok.json")])
    assert code == 0 and "random batch 32" in out
    altered = ckpt.load_checkpoint(str(exported["checkpoint"]))
    altered["state_dict"]["classifier.1.bias"] += 0.5
    ckpt.save_checkpoint(altered, str(tmp_path / "altered.pth"))
    code, out, err = run(capsys, export_verify, [str(exported["model"]), str(tmp_path / "altered.pth"),
                                                 "--report", str(tmp_path / "bad.json")])
    assert code == 1 and "does not match PyTorch" in err
    assert json.loads((tmp_path / "bad.failed.json").read_text())["passed"] is False


def test_verify_catches_altered_preprocess(exported: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    altered = ckpt.load_checkpoint(str(exported["checkpoint"]))
    altered["preprocess"]["mean"] = [0.5, 0.5, 0.5]
    ckpt.save_checkpoint(altered, str(tmp_path / "altered.pth"))
    code, out, _ = run(capsys, export_verify, [str(exported["model"]), str(tmp_path / "altered.pth"),
                                               "--no-real-images", "--report", str(tmp_path / "r.json")])
    assert code == 1 and "metadata mismatch: preprocess" in out
    assert not (tmp_path / "r.json").exists() and (tmp_path / "r.failed.json").is_file()


def test_a_wrong_export_is_never_left_as_model_onnx(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose export is wrong (batch 2 is special, and the exporter fixes the batch at the example's 2):
    verification catches it, and no model.onnx appears."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    write_class_tree(tmp_path / "data", 4)
    path = write_checkpoint(tmp_path / "best.pth", "custom_model:batch_two_special", tmp_path / "data", size=16)
    code, out, err = run(capsys, export_onnx, [str(path), "--model", "custom_model:batch_two_special"])
    assert code == 1, err
    assert "nothing written as" in err
    assert not (tmp_path / "model.onnx").exists() and not (tmp_path / "model.onnx.sha256").exists()
    assert json.loads((tmp_path / "model.onnx.verify.failed.json").read_text())["passed"] is False
    assert not (tmp_path / "model.onnx.verify.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model-")]


def test_dynamo_failure_falls_back_to_torchscript_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    write_class_tree(tmp_path / "data", 4)
    path = write_checkpoint(tmp_path / "best.pth", "custom_model:data_dependent", tmp_path / "data", size=16)
    code, out, err = run(capsys, export_onnx, [str(path), "--model", "custom_model:data_dependent"])
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


def test_verify_refuses_a_model_whose_weights_are_in_another_file(small_checkpoint: dict, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """export.verify read a model's external data from its folder (ONNX Runtime only keeps it inside): a file that
    is data made it read any file beside it, of any size. Refused, as the server refuses it."""
    model = write_model_with_external_data(tmp_path)
    code = export_verify.main([str(model), str(small_checkpoint["checkpoint"])])
    err = capsys.readouterr().err
    assert code == 2 and "references external data files" in err and "Traceback" not in err, err


def test_external_data_is_detected(tmp_path: Path) -> None:
    proto = onnx.load(str(write_model_with_external_data(tmp_path)), load_external_data=False)
    assert meta.external_data_tensors(proto) == ["w"]


@pytest.fixture
def small_export(tmp_path: Path, capsys: pytest.CaptureFixture) -> dict:
    """A random-weight smallcnn checkpoint with its data, exported by the CLI with --optimize --quantize int8."""
    write_class_tree(tmp_path / "data", 4)
    path = write_checkpoint(tmp_path / "best.pth", "smallcnn", tmp_path / "data", size=16)
    code, _, err = run(capsys, export_onnx, [str(path), "--optimize", "--quantize", "int8", "--data",
                                             str(tmp_path / "data")])
    assert code == 0, err
    return {"checkpoint": path, "data": tmp_path / "data", "dir": tmp_path}


def test_verifying_the_wrong_checkpoint_keeps_the_proof_of_the_good_export(small_export: dict,
                                                                          capsys: pytest.CaptureFixture) -> None:
    d = small_export["dir"]
    proof = (d / "model.onnx.verify.json").read_bytes()
    assert json.loads(proof)["passed"] is True
    other = write_checkpoint(d / "other.pth", "smallcnn", small_export["data"], size=16, seed=1)
    code, _, err = run(capsys, export_verify, [str(d / "model.onnx"), str(other)])
    assert code == 1 and "does not match PyTorch" in err and "model.onnx.verify.failed.json" in err
    assert (d / "model.onnx.verify.json").read_bytes() == proof  # the good export's proof is untouched
    assert json.loads((d / "model.onnx.verify.failed.json").read_text())["passed"] is False
    code, _, err = run(capsys, export_verify, [str(d / "model.onnx"), str(small_export["checkpoint"])])
    assert code == 0, err
    assert json.loads((d / "model.onnx.verify.json").read_text())["passed"] is True


@pytest.mark.parametrize("name", ["model.onnx", "model.opt.onnx", "model.int8.onnx"])
def test_every_exported_variant_has_a_sidecar_and_golden_outputs_the_server_proves(
        small_export: dict, name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    from torchferry.serve.predictor import ModelRefused, Predictor

    d = small_export["dir"]
    path = d / name
    assert Path(str(path) + ".sha256").read_text().split()[0] == ckpt.sha256_file(str(path))
    golden = meta.read_metadata(onnx.load(str(path)))["golden"]
    assert {"logits", "atol", "rtol", "seed", "shape"} <= set(golden)
    Predictor(str(path)).prove()
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temp files left
    altered = tmp_path_factory.mktemp("altered") / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    altered.write_bytes(bytes(data))
    (altered.parent / (name + ".sha256")).write_text(Path(str(path) + ".sha256").read_text())
    with pytest.raises(ModelRefused, match="sidecar"):
        Predictor(str(altered))


def _huge_logits_checkpoint(tmp_path: Path) -> Path:
    """A smallcnn whose final layer is scaled so that its logits are near ±1e8 (like inception_v3 after an epoch):
    weights giving terms near 1e7 on top of biases of ±1e8, so float32 rounding differs in absolute terms but
    never by much relative to any logit."""
    write_class_tree(tmp_path / "data", 4)
    path = write_checkpoint(tmp_path / "plain.pth", "smallcnn", tmp_path / "data", size=16)
    c = ckpt.load_checkpoint(str(path))
    model = ckpt.model_from_checkpoint(c, factory=None)
    with torch.inference_mode():
        scale = 1e7 / float(model(torch.from_numpy(contract.golden_inputs([contract.GOLDEN_BATCH, 3, 16, 16]))).abs().max())
    c["state_dict"]["classifier.1.weight"] *= scale
    bias = c["state_dict"]["classifier.1.bias"]
    c["state_dict"]["classifier.1.bias"] = bias * scale + 1e8 * torch.tensor([(-1.0) ** i for i in range(len(bias))])
    ckpt.save_checkpoint(c, str(tmp_path / "huge.pth"), sidecar=True)
    return tmp_path / "huge.pth"


def test_huge_logits_pass_by_rtol_and_fail_without_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _huge_logits_checkpoint(tmp_path)
    code, _, err = run(capsys, export_onnx, [str(path), "--no-real-images", "-o", str(tmp_path / "a.onnx")])
    assert code == 0, err
    report = json.loads((tmp_path / "a.onnx.verify.json").read_text())
    assert report["rtol"] == export_verify.DEFAULT_RTOL
    assert max(c["max_abs"] for c in report["cases"]) > export_verify.DEFAULT_ATOL  # passes by rtol alone
    golden = meta.read_metadata(onnx.load(str(tmp_path / "a.onnx")))["golden"]
    assert golden["atol"] == export_verify.DEFAULT_ATOL and golden["rtol"] == export_verify.DEFAULT_RTOL
    assert np.abs(np.asarray(golden["logits"])).max() > 1e7
    code, _, err = run(capsys, export_onnx, [str(path), "--no-real-images", "--rtol", "0",
                                               "-o", str(tmp_path / "b.onnx")])
    assert code == 1
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--rtol 0" in errors[0] and "--atol" in errors[0] and "large logits" in errors[0]
    assert not (tmp_path / "b.onnx").exists()


def test_tolerance_is_absolute_plus_relative_to_the_reference() -> None:
    ref = np.array([[1e8, 0.0]], np.float32)
    got = np.array([[1e8 + 512, 5e-5]], np.float32)
    assert export_verify.tolerance_ratio(got, ref, atol=1e-4, rtol=1e-5) <= 1.0
    assert export_verify.tolerance_ratio(got, ref, atol=1e-4, rtol=0.0) > 1.0
    assert export_verify.tolerance_ratio(got, ref, atol=0.0, rtol=1e-5) == np.inf  # 5e-5 off a zero logit
    assert export_verify.tolerance_ratio(ref, ref, atol=0.0, rtol=0.0) == 0.0


@pytest.mark.parametrize("flags", [["--rtol", "-1"], ["--atol", "inf"], ["--rtol", "nan"]])
def test_bad_tolerances_exit_2(flags: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_class_tree(tmp_path / "data", 4)
    path = write_checkpoint(tmp_path / "best.pth", "smallcnn", tmp_path / "data", size=16)
    code, _, err = run(capsys, export_onnx, [str(path), *flags])
    assert code == 2 and err.startswith("error: --") and "Traceback" not in err
    assert not (tmp_path / "model.onnx").exists()
