"""The model-file contract has one home, `torchferry.contract`, and the packages import one way (docs/design.md)."""

from __future__ import annotations

import ast
import hashlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from torchferry import contract

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "torchferry"


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (functions included), as dotted names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _refused(path: Path, prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in _imports(path) if any(m == p or m.startswith(p + ".") for p in prefixes))


@pytest.mark.parametrize(("package", "refused"), [
    ("serve", ("torch", "torchvision", "ray", "onnx", "torchferry.distributed", "torchferry.export")),
    ("distributed", ("torchferry.export", "torchferry.serve")),
    ("export", ("torchferry.serve",)),
    ("inputs", ("torch", "torchvision", "ray", "onnx", "onnxruntime", "flask", "torchferry.distributed",
                "torchferry.export", "torchferry.serve")),
    ("batch", ("torch", "torchvision", "onnx", "torchferry.distributed", "torchferry.export")),
])
def test_packages_import_one_way(package: str, refused: tuple[str, ...]) -> None:
    files = sorted((PACKAGE / package).glob("*.py"))
    assert files
    for path in files:
        assert _refused(path, refused) == [], f"{path.relative_to(REPO)} imports what {package}/ may not"


def test_the_contract_imports_no_torchferry_package_nor_torch() -> None:
    imported = _imports(PACKAGE / "contract.py")
    assert {m.split(".")[0] for m in imported} <= {"__future__", "hashlib", "importlib", "json", "math", "os", "re",
                                                    "collections", "typing", "numpy"}, imported


def test_the_shared_torch_free_modules_import_only_the_contract_and_cli() -> None:
    """torchferry/cli.py, files.py and rayinit.py serve every package, so they import none of them (nor torch)."""
    for name in ("cli.py", "files.py", "rayinit.py"):
        ours = {m for m in _imports(PACKAGE / name) if m.startswith("torchferry") or m.split(".")[0] in (
            "torch", "torchvision", "onnx")}
        assert ours <= {"torchferry.contract", "torchferry.contract.TorchferryError", "torchferry.contract.error_line",
                        "torchferry.cli", "torchferry.cli.lead_line"}, (name, ours)


def test_batch_loads_without_torch() -> None:
    code = ("import sys, torchferry.batch.command, torchferry.batch.run; "
            "bad = [m for m in ('torch', 'onnx', 'torchferry.distributed', 'torchferry.export') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_serve_and_export_read_the_contract_from_its_one_home() -> None:
    """The contract's values are not restated: each package imports them from torchferry.contract."""
    for path in (PACKAGE / "serve" / "predictor.py", PACKAGE / "serve" / "images.py",
                 PACKAGE / "distributed" / "checkpoint.py", PACKAGE / "export" / "metadata.py"):
        assert any(m == "torchferry.contract" for m in _imports(path)), path
    for path in PACKAGE.rglob("*.py"):
        if path.name == "contract.py":
            continue
        text = path.read_text()
        for literal in ("20261126", '"torchferry.checkpoint/1"', '"I;16B"', "// 257", "/ 257"):
            assert literal not in text, f"{path.relative_to(REPO)} restates the contract's {literal}"


def test_contract_loads_without_torch() -> None:
    code = ("import sys, torchferry.contract, torchferry.serve.predictor; "
            "bad = [m for m in ('torch', 'onnx', 'torchferry.distributed', 'torchferry.export') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_metadata_round_trips_through_its_encoding() -> None:
    values = {"arch": "smallcnn", "classes": ["a", "b"], "preprocess": {"size": [8, 8]}, "val_acc": 0.5}
    encoded = contract.encode_metadata(values)
    assert encoded["arch"] == "smallcnn" and encoded["classes"] == '["a","b"]'
    assert contract.decode_metadata(encoded) == values


def test_golden_record_rebuilds_its_inputs_and_keeps_the_stricter_bound() -> None:
    x = contract.golden_inputs([2, 1, 4, 4])
    assert x.dtype == np.float32 and x.shape == (2, 1, 4, 4) and -2.0 <= x.min() and x.max() < 2.0
    record = contract.golden_record(np.ones((2, 3)), [2, 1, 4, 4], "test", atol=1e-5, rtol=1.0)
    inputs, logits, atol, rtol = contract.read_golden(record, [1, 4, 4], 3)
    assert np.array_equal(inputs, x) and logits.shape == (2, 3)
    assert (atol, rtol) == (1e-5, contract.GOLDEN_RTOL)  # a file may tighten the proof, never loosen it


@pytest.mark.parametrize(("change", "words"), [
    ({"shape": [2, 3, 4, 4]}, "golden.shape must be"),
    ({"shape": [100, 1, 4, 4]}, "batch must be an integer from 1 to 8"),
    ({"seed": -1}, "golden.seed"),
    ({"range": [1.0, 1.0]}, "low < high"),
    ({"logits": [[1.0, 2.0]]}, "golden.logits must be 2 rows of 3"),
])
def test_a_bad_golden_record_is_refused(change: dict, words: str) -> None:
    record = {**contract.golden_record(np.ones((2, 3)), [2, 1, 4, 4], "test", atol=1e-5), **change}
    with pytest.raises(contract.ContractError, match=words):
        contract.read_golden(record, [1, 4, 4], 3)


def test_checkpoint_and_server_refuse_the_same_preprocessing() -> None:
    """One set of bounds: a spec the training side would refuse is refused by the server too (it once took 4096)."""
    from torchferry.serve.predictor import ModelRefused, check_preprocess

    good = contract.preprocess_spec(size=32, resize=36, mean=[0.5], std=[0.5], channels=1)
    assert list(contract.preprocess_problems(good)) == [] and check_preprocess(good) == good
    for bad in ({**good, "size": [contract.MAX_IMAGE_SIDE + 1] * 2}, {**good, "std": [-1.0]},
                {**good, "interpolation": "nearest"}):
        problems = list(contract.preprocess_problems(bad))
        assert problems
        with pytest.raises(ModelRefused, match="metadata " + problems[0].split(" ")[0]):
            check_preprocess(bad)


def test_sidecar_is_sha256sum_format(tmp_path: Path) -> None:
    from torchferry.distributed.checkpoint import write_sidecar

    path = tmp_path / "model.onnx"
    path.write_bytes(b"weights")
    assert contract.recorded_sha256(str(path)) is None
    write_sidecar(str(path), contract.sha256_file(str(path)))
    digest = hashlib.sha256(b"weights").hexdigest()
    assert (tmp_path / "model.onnx.sha256").read_text() == f"{digest}  model.onnx\n"
    assert contract.recorded_sha256(str(path)) == digest


def test_sixteen_bit_gray_is_scaled_alike_in_training_and_serving(tmp_path: Path) -> None:
    from torchferry.distributed.data import load_image
    from torchferry.serve.images import decode, to_model_mode

    values = np.array([[0, 128, 129, 385, 386, 32767, 65406, 65535]] * 4, dtype=np.uint16)
    assert contract.eight_bit(values)[0].tolist() == [0, 0, 1, 1, 2, 127, 254, 255]
    assert contract.eight_bit(np.array([-5, 70000]))[0:2].tolist() == [0, 255]  # 32-bit "I" values clip
    buffer = io.BytesIO()
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    image.save(buffer, format="PNG")
    (tmp_path / "gray16.png").write_bytes(buffer.getvalue())
    trained = np.asarray(load_image(str(tmp_path / "gray16.png"), 1))
    served = np.asarray(to_model_mode(decode(buffer.getvalue(), 10_000), 1))
    assert np.array_equal(trained, served) and trained[0].tolist() == [0, 0, 1, 1, 2, 127, 254, 255]


def test_an_error_is_quoted_by_its_first_line_without_onnx_runtimes_cpp_location() -> None:
    from torchferry.contract import error_line

    ort = ("[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/onnxruntime/core/graph/model.cc:202 onnxruntime::Model::"
           "Model(onnx::ModelProto&&, const onnxruntime::PathString&, const onnxruntime::ModelOptions&) Unsupported "
           "model IR version: 14, max supported IR version: 13\n")
    assert error_line(RuntimeError(ort)) == "Unsupported model IR version: 14, max supported IR version: 13"
    assert error_line(RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : Load model failed (a) b")) == (
        "Load model failed (a) b")
    assert error_line(OSError("\n  first (kept as it is)\nsecond")) == "first (kept as it is)"
    assert error_line(ValueError("")) == "ValueError" and len(error_line(ValueError("x" * 999))) == 300
