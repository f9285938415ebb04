"""serve/app.py through Flask's test client: routes, every documented bad input, readiness proof, metrics."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import bad_requests, jpeg, multipart, png, red, write_matmul_model, write_model_with_external_data
from PIL import Image

from torchferry.serve.app import create_app, settings_from_env
from torchferry.serve.batcher import MicroBatcher

REPO = Path(__file__).resolve().parents[1]


def test_factory_is_never_in_debug_mode(app, monkeypatch: pytest.MonkeyPatch, exported_model: dict) -> None:
    monkeypatch.setenv("FLASK_DEBUG", "1")
    assert app.debug is False and app.config["DEBUG"] is False
    assert create_app({"MODEL": str(exported_model["model"]), "LOAD_SYNC": True, "DEBUG": True}).debug is False


def test_predict_answers_with_labels_in_input_order(client) -> None:
    green = Image.new("RGB", (20, 20), (30, 210, 30))
    r = client.post("/predict?top_k=2", data=multipart([("a.png", png(red())), ("b.jpg", jpeg(green))]),
                    content_type="multipart/form-data")
    assert r.status_code == 200, r.json
    preds = r.json["predictions"]
    assert [p["label"] for p in preds] == ["red", "green"]
    assert len(preds[0]["top_k"]) == 2 and preds[0]["top_k"][0]["label"] == "red"
    assert 0 < preds[0]["score"] <= 1 and r.json["model"]["classes"] == 3
    raw = client.post("/predict", data=png(red()), content_type="image/png")
    assert raw.status_code == 200 and raw.json["predictions"][0]["label"] == "red"
    assert len(raw.json["predictions"][0]["top_k"]) == 3  # default top_k 5, capped at the class count


@pytest.mark.parametrize("case", list(bad_requests()))
def test_bad_input_gets_its_json_4xx_and_the_server_stays_alive(client, case: str) -> None:
    kwargs, status, code = bad_requests()[case]
    r = client.post("/predict", **kwargs)
    assert r.status_code == status, (case, r.data[:300])
    body = r.json
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    if code:
        assert body["error"]["code"] == code
    assert "Traceback" not in r.get_data(as_text=True)
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("case", ["16-bit gray png", "cmyk jpeg", "rotated exif jpeg", "animated gif", "rgba png",
                                  "palette png"])
def test_unusual_but_valid_images_are_classified(client, case: str) -> None:
    img = red()
    if case == "16-bit gray png":
        data = png(Image.fromarray(np.full((20, 20), 40000, np.uint16)))
    elif case == "cmyk jpeg":
        data = jpeg(img.convert("CMYK"))
    elif case == "rotated exif jpeg":
        exif = Image.Exif()
        exif[0x0112] = 6
        data = jpeg(img.resize((30, 20)), exif=exif)
    elif case == "animated gif":
        buf = io.BytesIO()
        img.save(buf, "GIF", save_all=True, append_images=[Image.new("RGB", (20, 20), (0, 0, 200))])
        data = buf.getvalue()
    elif case == "rgba png":
        data = png(img.convert("RGBA"))
    else:
        data = png(img.convert("P"))
    r = client.post("/predict", data=data, content_type="image/*")
    assert r.status_code == 200, r.json
    if case != "16-bit gray png":
        assert r.json["predictions"][0]["label"] == "red"
    assert client.get("/healthz").status_code == 200


def test_unknown_route_and_method_are_json(client) -> None:
    assert client.get("/nope").json["error"]["code"] == "not_found"
    r = client.get("/predict")
    assert r.status_code == 405 and r.json["error"]["code"] == "method_not_allowed"


def test_metadata_and_readiness(client, exported_model: dict) -> None:
    meta = client.get("/metadata").json
    assert meta["classes"] == ["blue", "green", "red"] and meta["input_shape"] == ["N", 3, 16, 16]
    assert meta["sha256"] == (Path(str(exported_model["model"]) + ".sha256")).read_text().split()[0]
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json["golden_max_abs_diff"] <= 1e-4


def test_metrics_count_what_was_sent(client) -> None:
    for _ in range(3):
        client.post("/predict", data=png(red()), content_type="image/png")
    client.post("/predict", data=b"x", content_type="text/plain")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'torchferry_requests_total{route="/predict",status="200"} 3.0' in text
    assert 'torchferry_requests_total{route="/predict",status="415"} 1.0' in text
    assert "torchferry_images_predicted_total 3.0" in text
    assert "torchferry_batch_size_count 3.0" in text and "torchferry_ready 1.0" in text


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst / "model.onnx")
    shutil.copy(str(src) + ".sha256", dst / "model.onnx.sha256")
    return dst / "model.onnx"


def test_altered_model_file_stays_not_ready(exported_model: dict, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    path = _copy_model(exported_model["model"], tmp_path / "m")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    client = create_app({"MODEL": str(path), "LOAD_SYNC": True}).test_client()
    r = client.get("/readyz")
    assert r.status_code == 503 and "sidecar" in r.json["reason"]
    assert '"event": "model_refused"' in caplog.text and "sidecar" in caplog.text
    assert client.post("/predict", data=png(red()), content_type="image/png").status_code == 503
    assert client.get("/healthz").status_code == 200


def test_model_whose_golden_outputs_do_not_reproduce_stays_not_ready(exported_model: dict, tmp_path: Path) -> None:
    proto = onnx.load(str(exported_model["model"]))
    for prop in proto.metadata_props:
        if prop.key == "golden":
            golden = json.loads(prop.value)
            golden["logits"][0][0] += 0.5
            prop.value = json.dumps(golden)
    onnx.save(proto, str(tmp_path / "model.onnx"))  # no sidecar: only the proof can catch it
    r = create_app({"MODEL": str(tmp_path / "model.onnx"), "LOAD_SYNC": True}).test_client().get("/readyz")
    assert r.status_code == 503 and "golden outputs do not reproduce" in r.json["reason"]


def test_model_with_external_data_is_refused(tmp_path: Path) -> None:
    path = write_model_with_external_data(tmp_path)
    r = create_app({"MODEL": str(path), "LOAD_SYNC": True}).test_client().get("/readyz")
    assert r.status_code == 503 and "external data" in r.json["reason"]


def test_a_model_onnx_runtime_cannot_read_is_refused_with_its_reason_not_its_cpp_location(tmp_path: Path) -> None:
    # A file from a newer onnx than the server's ONNX Runtime reads: ORT's message opens with its status and the
    # C++ function that raised it, 250 characters that used to push the reason past the one-line cut.
    path = write_matmul_model(tmp_path / "new.onnx", ir_version=99)
    r = create_app({"MODEL": str(path), "LOAD_SYNC": True}).test_client().get("/readyz")
    reason = r.json["reason"]
    assert r.status_code == 503 and "IR version: 99" in reason, reason
    assert "onnxruntime::" not in reason and "ONNXRuntimeError" not in reason and "\n" not in reason


def test_readyz_is_503_until_a_model_is_loaded() -> None:
    client = create_app({"MODEL": None, "LOAD_SYNC": True}).test_client()
    r = client.get("/readyz")
    assert r.status_code == 503 and "no model configured" in r.json["reason"]
    assert client.get("/metadata").status_code == 503 and client.get("/healthz").status_code == 200


def test_settings_come_from_the_environment() -> None:
    s = settings_from_env({"TORCHFERRY_MODEL": "/m.onnx", "TORCHFERRY_MAX_IMAGES": "4", "TORCHFERRY_TOP_K": "2"})
    assert (s["MODEL"], s["MAX_IMAGES"], s["TOP_K"], s["MAX_PIXELS"]) == ("/m.onnx", 4, 2, 40_000_000)
    with pytest.raises(ValueError, match="TORCHFERRY_MAX_IMAGES='many'"):
        settings_from_env({"TORCHFERRY_MAX_IMAGES": "many"})


def test_flags_and_environment_fill_the_same_typed_settings() -> None:
    from torchferry.serve.__main__ import get_args_parser
    from torchferry.serve.settings import ServeSettings

    args = get_args_parser().parse_args(["--max-images", "3", "--threads", "2", "--poll-seconds", "1.5"])
    s = ServeSettings.load(ServeSettings.flag_overrides(args),
                           environ={"TORCHFERRY_MAX_IMAGES": "9", "TORCHFERRY_TOP_K": "2"})
    assert (s.max_images, s.top_k, s.ort_threads, s.poll_seconds, s.max_batch) == (3, 2, 2, 1.5, 32)
    help_text = " ".join(get_args_parser().format_help().split())
    flagged = [spec for spec, _ in ServeSettings.table().values() if spec.flag]
    assert len(flagged) == 16 and all(f"{spec.flag} " in help_text and f"${spec.env}" in help_text for spec in flagged)


def test_a_taken_port_is_one_line_and_exit_2_before_the_model_loads(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    from torchferry.serve.__main__ import main

    model = tmp_path / "model.onnx"
    model.write_bytes(b"never read: the port is refused first")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code = main(["--model", str(model), "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err == (f"error: cannot listen on 127.0.0.1:{port}: Address already in use; another program holds the "
                   "port: stop it, or pass another --port\n")
    assert "model_refused" not in err and "authentication" not in err


def test_no_model_given_is_said_so(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchferry.serve.__main__ import main

    for name in ("TORCHFERRY_MODEL", "TORCHFERRY_MODEL_DIR"):
        monkeypatch.delenv(name, raising=False)
    assert main([]) == 2
    assert capsys.readouterr().err == ("error: no model given: pass --model model.onnx (or --model-dir DIR), or set "
                                       "TORCHFERRY_MODEL\n")


def test_a_run_folder_given_for_the_model_names_its_model_onnx(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    from torchferry.serve.__main__ import main
    from torchferry.serve.predictor import ModelRefused, read_model_file

    (tmp_path / "model.onnx").write_bytes(b"never read")
    assert main(["--model", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"error: model {str(tmp_path)!r} is a folder, not a file: pass "
                                       f"{str(tmp_path / 'model.onnx')!r} (--model-dir takes a folder of versions, "
                                       "DIR/<name>/<version>/model.onnx)\n")
    with pytest.raises(ModelRefused, match="is a folder, not a file: pass .*model.onnx"):
        read_model_file(str(tmp_path))  # serve.batch and gunicorn's workers


def test_serve_never_imports_torch() -> None:
    code = ("import sys; import torchferry.serve.app, torchferry.serve.__main__; torchferry.serve.app.create_app("
            "{'MODEL': '/nonexistent.onnx', 'LOAD_SYNC': True}); bad = [m for m in ('torch', 'torchvision', "
            "'torchferry.distributed', 'torchferry.export', 'distributed', 'export') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_micro_batcher_returns_each_callers_rows() -> None:
    calls = []

    def run(batch: np.ndarray) -> np.ndarray:
        calls.append(batch.shape[0])
        return batch.reshape(batch.shape[0], -1)[:, :2] * 10

    batcher = MicroBatcher(run, window_ms=50, max_batch=64)
    results: dict[int, np.ndarray] = {}

    def client(i: int) -> None:
        results[i] = batcher.submit(np.full((1, 1, 1, 2), i, np.float32))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    batcher.close()
    assert all(np.array_equal(results[i], [[10 * i, 10 * i]]) for i in range(12))
    assert sum(calls) == 12 and len(calls) < 12  # gathered into fewer ORT calls


def test_micro_batching_app_answers_like_the_plain_one(exported_model: dict) -> None:
    client = create_app({"MODEL": str(exported_model["model"]), "LOAD_SYNC": True, "BATCH_WINDOW_MS": 5}).test_client()
    r = client.post("/predict", data=png(red()), content_type="image/png")
    assert r.status_code == 200 and r.json["predictions"][0]["label"] == "red"
