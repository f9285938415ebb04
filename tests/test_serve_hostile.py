"""Hostile requests and hostile model files against the server (issue 13 §2, §4).

The corpus test runs every kind of hostile request against real server processes on 127.0.0.1 (`python -m
serve` and gunicorn with serve/gunicorn.conf.py and the Deployment's ConfigMap settings) with a real HTTP
client, while a prober checks /healthz, and measures the workers' peak RSS from /proc. The other tests build
one hostile file or setting each and check the refusal through Flask's test client or the command line.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import hostile
import numpy as np
import pytest
import requests
import yaml
from helpers import free_port, png_bomb
from PIL import Image

from torchferry.serve.app import create_app

REPO = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token"
# One request at the pixel cap (README "Security"): at most this much over the worker's idle RSS. Decoding
# takes at most 8 bytes a pixel (serve/images.py: 305 MiB at 40 MP), the body and its parsed copies the rest.
REQUEST_BUDGET_MB = 384
HEALTH_BOUND_S = 1.0


# ---------------------------------------------------------------------------------------------------------
# Hostile model files: proven whole before ready (§4)


def _readyz(path: str, token: str | None = None, header: str | None = None) -> tuple[int, dict]:
    app = create_app({"MODEL": path, "LOAD_SYNC": True, "AUTH_TOKEN": token})
    r = app.test_client().get("/readyz", headers={"Authorization": header} if header else {})
    return r.status_code, r.json


@pytest.mark.parametrize("kw,words", [
    ({"graph_classes": 10}, "names 3 classes"),                      # 3 names for 10 outputs
    ({"graph_size": 16}, "[N, 3, 32, 32]"),                          # preprocess 32×32 for a 16×16 input
    ({"graph_channels": 1}, "[N, 3, 32, 32]"),                       # 3 channels for a 1-channel input
    ({"golden": {"shape": [100_000, 3, 32, 32]}}, "from 1 to 8"),    # a golden batch that fills the memory
    ({"golden": {"shape": [2, 3, 16, 16]}}, "golden.shape"),
    ({"golden": {"logits": "x"}}, "golden.logits"),
    ({"golden": {"range": [0, "inf"]}}, "golden.range"),
    ({"golden": {"seed": -1}}, "golden.seed"),
    ({"preprocess": {"size": [100_000, 100_000], "resize": 8, "mean": [0.5] * 3, "std": [0.5] * 3,
                     "channels": 3}}, "preprocess.size"),
    ({"preprocess": {"size": [32, 32], "resize": 32, "mean": [0.5], "std": [0.5] * 3, "channels": 3}},
     "preprocess.mean"),
    ({"preprocess": {"size": [32, 32], "resize": 32, "mean": [0.5] * 3, "std": [0.0] * 3, "channels": 3}},
     "zero"),
    ({"preprocess": {"size": [32, 32], "resize": 32, "mean": [0.5] * 2, "std": [0.5] * 2, "channels": 2}},
     "channels"),
    ({"meta": {"classes": "abc"}}, "classes"),
    ({"meta": {"classes": []}}, "classes"),
    ({"meta": {"classes": ["c" * 1000] * 2001}}, "at most 2,000,000 characters together"),  # 2 MB every /metadata
    # What the server only shows: /metadata answered 500 on versions that are no mapping, a long name every answer
    ({"meta": {"versions": "x"}}, "metadata versions must map"),
    ({"meta": {"versions": {"torch": ["2"]}}}, "metadata versions must map"),
    ({"meta": {"name": "n" * 100_000}}, "metadata name must be a string of at most 200"),
    ({"meta": {"arch": {"a": 1}}}, "metadata arch"),
    ({"meta": {"val_acc": float("nan")}}, "metadata val_acc"),
])
def test_model_whose_metadata_disagrees_with_its_graph_is_never_ready(kw: dict, words: str, tmp_path: Path) -> None:
    status, body = _readyz(hostile.tiny_model(tmp_path / "model.onnx", **kw))
    assert status == 503 and words in body["reason"], body


def test_golden_inputs_beyond_the_exports_two_must_fit_a_requests_budget(tmp_path: Path) -> None:
    """A file asks for up to 8 golden inputs: a 1024 px model's 8 are 96 MiB (a 2048 px one's 384 MiB) before the
    model's own work on them, more than a request's 64 MiB; the export's 2 are always proven."""
    import onnxruntime as ort

    from torchferry.contract import golden_inputs

    two = hostile.tiny_model(tmp_path / "two.onnx", size=1024)
    assert _readyz(two)[0] == 200
    x = golden_inputs([8, 3, 1024, 1024])
    logits = ort.InferenceSession(two, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0].tolist()
    eight = hostile.tiny_model(tmp_path / "eight.onnx", size=1024, golden={"shape": [8, 3, 1024, 1024],
                                                                         "logits": logits})
    status, body = _readyz(eight)
    assert status == 503 and "golden.shape asks for 8 inputs of 12 MiB" in body["reason"], body
    app = create_app({"MODEL": eight, "LOAD_SYNC": True, "MAX_INPUT_BYTES": 2**30})  # the operator allows it
    assert app.test_client().get("/readyz").status_code == 200


def test_the_server_owns_the_golden_tolerance(tmp_path: Path) -> None:
    good = hostile.tiny_model(tmp_path / "good.onnx")
    assert _readyz(good)[0] == 200
    expected = np.asarray(json.loads(next(p.value for p in __import__("onnx").load(good).metadata_props
                                          if p.key == "golden"))["logits"])
    off = (expected + 0.5).tolist()
    # A file cannot loosen the bound: "inf", huge, negative, NaN or a string are ignored.
    for atol in ("inf", 1e9, -1, "NaN", "loose"):
        status, body = _readyz(hostile.tiny_model(tmp_path / "m.onnx", golden={"logits": off, "atol": atol,
                                                                               "rtol": 1e9}))
        assert status == 503 and "golden outputs do not reproduce" in body["reason"], atol
    # Within the server's bound (atol 1e-3 + rtol 1e-4 × |x|) a file without stricter values is ready ...
    near = (expected + 5e-4).tolist()
    assert _readyz(hostile.tiny_model(tmp_path / "m.onnx", golden={"logits": near, "atol": "inf"}))[0] == 200
    # ... and a file that asks for a stricter atol is held to it.
    status, body = _readyz(hostile.tiny_model(tmp_path / "m.onnx", golden={"logits": near, "atol": 1e-5}))
    assert status == 503 and "atol 1e-05" in body["reason"]
    # rtol: a relative error of 5e-5 on logits of size ~1 passes the server's rtol with atol 0, not rtol 1e-6.
    rel = (expected * (1 + 5e-5)).tolist()
    assert _readyz(hostile.tiny_model(tmp_path / "m.onnx", golden={"logits": rel, "atol": 0.0}))[0] == 200
    status, body = _readyz(hostile.tiny_model(tmp_path / "m.onnx", golden={"logits": rel, "atol": 0.0,
                                                                           "rtol": 1e-6}))
    assert status == 503 and "rtol 1e-06" in body["reason"]


def test_readyz_shows_paths_only_to_callers_with_the_token(tmp_path: Path) -> None:
    (tmp_path / "secret-place").mkdir()
    folder = str(tmp_path / "secret-place")
    path = hostile.tiny_model(tmp_path / "secret-place" / "model.onnx", graph_classes=10)
    status, body = _readyz(path)
    assert status == 503 and "names 3 classes" in body["reason"] and folder not in json.dumps(body)
    status, body = _readyz(path, token=TOKEN)  # no token sent
    assert status == 503 and folder not in json.dumps(body)
    status, body = _readyz(path, token=TOKEN, header="Bearer wrong")
    assert status == 503 and folder not in json.dumps(body)
    missing = str(tmp_path / "secret-place" / "nothing.onnx")
    status, body = _readyz(missing, token=TOKEN)
    assert status == 503 and "nothing.onnx" in body["reason"] and folder not in body["reason"]
    status, body = _readyz(missing, token=TOKEN, header=f"Bearer {TOKEN}")
    assert status == 503 and missing in body["reason"]


def test_a_model_with_large_inputs_takes_fewer_images_per_request(tmp_path: Path, caplog) -> None:
    """The file chooses its input's size (a 2048 px side: 48 MiB of floats an image), the operator how much a request
    may take (TORCHFERRY_MAX_INPUT_BYTES, 64 MiB): 16 tiny PNGs once cost such a model 1.25 GiB a request. Measured
    with tracemalloc (numpy's buffers are traced): refused before any decoding, and one image within the budget."""
    import tracemalloc

    path = hostile.tiny_model(tmp_path / "model.onnx", size=2048)
    app = create_app({"MODEL": path, "LOAD_SYNC": True, "BATCH_WINDOW_MS": 1})
    client = app.test_client()
    assert app.extensions["torchferry.state"].repo.active.batcher.max_batch == 1  # a micro-batch: as a request
    assert '"items_per_request": 1' in caplog.text  # the operator is told at load
    tiny = hostile.save(Image.new("RGB", (20, 20), (200, 10, 10)), "PNG")
    v2 = _v2([{"name": "input", "shape": [2], "datatype": "BYTES", "data": [{"b64": base64.b64encode(tiny).decode()}]
               * 2}])
    tracemalloc.start()
    try:
        r = client.post("/predict", data={f"f{i}": (io.BytesIO(tiny), f"{i}.png") for i in range(16)},
                        content_type="multipart/form-data")
        assert r.status_code == 413 and r.json["error"]["code"] == "too_many_images", r.json
        assert client.post("/v2/models/tiny/infer", data=v2, content_type="application/json").status_code == 413
        assert tracemalloc.get_traced_memory()[1] < 16 * 2**20
        tracemalloc.reset_peak()
        r = client.post("/predict", data=tiny, content_type="image/png")
        peak = tracemalloc.get_traced_memory()[1]
        assert r.status_code == 200 and peak < REQUEST_BUDGET_MB * 2**20, peak
    finally:
        tracemalloc.stop()
    assert client.get("/metadata").json["max_items_per_request"] == 1


def _memory_hungry(path: Path, size: int = 32, elements: int = 0, relu_first: bool = False) -> str:
    """hostile.tiny_model's file with its logits passed through `+ 0 * sum(ConstantOfShape([elements]))` (a few
    hundred bytes that ask for 4 × `elements` bytes on every run, its golden record still right) and/or, with
    `relu_first`, a Relu on the input first (an intermediate tensor as large as a request's inputs)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(hostile.tiny_model(path, size=size))
    graph = graph_nodes = model.graph
    if relu_first:  # the golden logits recomputed through it
        import onnxruntime as ort

        from torchferry.serve.predictor import golden_inputs

        graph_nodes.node[0].input[0] = "relu"
        graph_nodes.node.insert(0, helper.make_node("Relu", ["input"], ["relu"]))
        prop = next(p for p in model.metadata_props if p.key == "golden")
        record = json.loads(prop.value)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        x = golden_inputs(record["shape"], record["seed"], *record["range"])
        record["logits"] = session.run(None, {"input": x})[0].tolist()
        prop.value = json.dumps(record)
    if elements:
        graph.node[-1].output[0] = "plain"
        graph.node.extend([
            helper.make_node("Constant", [], ["shape"], value=helper.make_tensor("s", TensorProto.INT64, [1],
                                                                                 [elements])),
            helper.make_node("ConstantOfShape", ["shape"], ["big"],
                             value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])),
            helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
            helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", TensorProto.FLOAT, [], [0.0])),
            helper.make_node("Mul", ["total", "zero"], ["nothing"]),
            helper.make_node("Add", ["plain", "nothing"], ["logits"])])
    onnx.save(model, path)
    return str(path)


@pytest.mark.parametrize("elements", [500_000_000, 200_000_000])  # 2 GB when run; 800 MB, which ORT would fold
def test_a_model_cannot_make_onnx_runtime_allocate_past_its_memory_cap(elements: int, tmp_path: Path) -> None:
    """A model file chooses its graph: a few hundred bytes of ConstantOfShape asked ONNX Runtime for 2 GB on its
    proof and on every request (ru_maxrss: 2.0 GiB, served), or, under constant folding's 1 GiB per-node limit,
    800 MB once at load (1.6 GiB peak, then served). ONNX Runtime's tensors now come from one arena of at most
    TORCHFERRY_ORT_MEMORY_BYTES per process, with no folding: the file is refused, its reason naming the setting,
    and the process stays small (its peak RSS, measured in a process of its own, as the arena is the process's)."""
    path = _memory_hungry(tmp_path / "model.onnx", elements=elements)
    # VmHWM, the process's own peak: ru_maxrss would start from the forking parent's (this test process's) RSS.
    code = ("from torchferry.serve.predictor import ModelRefused, Predictor\n"
            f"p = Predictor({path!r}, 1, memory_cap=64 * 2**20)\n"
            "try:\n    p.prove()\nexcept ModelRefused as exc:\n    print('refused:', exc)\n"
            "hwm = next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:'))\n"
            "print('maxrss_mib', int(hwm.split()[1]) // 1024)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    refusal = next(ln for ln in out.stdout.splitlines() if ln.startswith("refused:"))
    assert "64 MiB" in refusal and "TORCHFERRY_ORT_MEMORY_BYTES" in refusal
    assert int(out.stdout.split("maxrss_mib")[1]) < 1024, out.stdout + out.stderr[-3000:]  # 2,000 MiB asked for


def test_a_request_past_the_memory_cap_is_a_503_and_the_server_answers_the_next(tmp_path: Path) -> None:
    """The requests in flight share the cap: one whose tensors would not fit is answered 503 with Retry-After (its
    inputs are fine: a retry, or fewer of them, is served), not a worker killed for its memory; the server goes on."""
    from helpers import start_dev, stop, wait_ready

    path = _memory_hungry(tmp_path / "model.onnx", size=256, relu_first=True)  # a Relu of 16 images: 12 MiB
    port = free_port()
    proc = start_dev(Path(path), port, tmp_path, env={"TORCHFERRY_ORT_MEMORY_BYTES": str(4 * 2**20)})
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc)
        image = hostile.save(Image.new("RGB", (256, 256), (200, 10, 10)), "PNG")
        many = requests.post(f"{base}/predict", files={f"f{i}": (f"{i}.png", image) for i in range(16)}, timeout=60)
        assert many.status_code == 503 and many.headers["Retry-After"] == "1", many.text
        assert many.json()["error"]["code"] == "model_memory_exhausted"
        assert "TORCHFERRY_ORT_MEMORY_BYTES" in many.json()["error"]["message"]
        one = requests.post(f"{base}/predict", data=image, headers={"Content-Type": "image/png"}, timeout=60)
        assert one.status_code == 200 and one.json()["predictions"][0]["label"].startswith("c")
    finally:
        stop(proc)


# ---------------------------------------------------------------------------------------------------------
# Settings that cannot work stop the server at start (§2)


@pytest.mark.parametrize("var,value", [
    ("TORCHFERRY_TOP_K", "0"), ("TORCHFERRY_TOP_K", "-3"), ("TORCHFERRY_MAX_IMAGES", "0"),
    ("TORCHFERRY_MAX_PIXELS", "0"), ("TORCHFERRY_MAX_UPLOAD_BYTES", "-1"), ("TORCHFERRY_MAX_BATCH", "0"),
    ("TORCHFERRY_MAX_INPUT_BYTES", "0"), ("TORCHFERRY_ORT_MEMORY_BYTES", "-1"),
    ("TORCHFERRY_ORT_THREADS", "-1"), ("TORCHFERRY_BATCH_WINDOW_MS", "nan"), ("TORCHFERRY_BATCH_WINDOW_MS", "-5"),
    ("TORCHFERRY_POLL_SECONDS", "inf"), ("TORCHFERRY_POLL_SECONDS", "-1"), ("TORCHFERRY_AUTH_TOKEN", "jeton-café"),
])
def test_setting_that_cannot_work_is_refused_at_start(var: str, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=var):
        create_app({"MODEL": None, "LOAD_SYNC": True})


@pytest.mark.parametrize("env", [{"TORCHFERRY_TOP_K": "0"}, {"TORCHFERRY_AUTH_TOKEN": "jeton-café"}])
def test_dev_server_exits_2_with_one_line_on_a_setting_that_cannot_work(env: dict, tmp_path: Path) -> None:
    model = hostile.tiny_model(tmp_path / "model.onnx")
    out = subprocess.run([sys.executable, "-m", "serve", "--model", model, "--port", "1"], cwd=REPO, check=False,
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and next(iter(env)) in lines[0] and "Traceback" not in out.stderr


@pytest.mark.parametrize("env", [{"TORCHFERRY_TOP_K": "0"}, {"TORCHFERRY_AUTH_TOKEN": "jeton-café"},
                                 {"TORCHFERRY_MAX_PIXELS": "0"}, {"TORCHFERRY_WORKERS": "0"},
                                 {"TORCHFERRY_GRACEFUL_TIMEOUT": "soon"}])
def test_gunicorn_exits_2_with_one_line_before_any_worker_starts(env: dict, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "gunicorn", "-c", str(REPO / "torchferry" / "serve" / "gunicorn.conf.py")],
                         cwd=REPO, check=False, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TORCHFERRY_BIND": f"127.0.0.1:{free_port()}",
                              "TORCHFERRY_MODEL": hostile.tiny_model(tmp_path / "m.onnx"), **env})
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith(f"error: {next(iter(env))}")


def test_top_k_flag_zero_exits_2(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "serve", "--model", hostile.tiny_model(tmp_path / "m.onnx"),
                          "--top-k", "0", "--port", "1"], cwd=REPO, check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "TORCHFERRY_TOP_K" in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------------------------------------------------
# Request bodies (§2): multi-member gzip; the corpus below covers the rest against real servers


def _v2_fp32(rows: int = 1, size: int = 32) -> bytes:
    x = np.zeros((rows, 3, size, size), np.float32)
    return json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()


def test_multi_member_gzip_body_is_decoded_whole(tmp_path: Path) -> None:
    client = create_app({"MODEL": hostile.tiny_model(tmp_path / "m.onnx"), "LOAD_SYNC": True}).test_client()
    body = _v2_fp32()
    half = len(body) // 2
    r = client.post("/v2/models/tiny/infer", data=hostile.gzip_members(body[:half], body[half:]),
                    headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert r.status_code == 200, r.json
    r = client.post("/v2/models/tiny/infer", data=gzip.compress(body) + b"junk after the member",
                    headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert r.status_code == 400 and "not a gzip member" in r.json["error"]
    r = client.post("/v2/models/tiny/infer", data=hostile.gzip_members(*([b" "] * 100), body),
                    headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert r.status_code == 400 and "more than 64 members" in r.json["error"]


# ---------------------------------------------------------------------------------------------------------
# The corpus: every kind of hostile request against the dev server and gunicorn


def production_env() -> dict[str, str]:
    """The Deployment's settings: k8s/serve/configmap.yaml, plus a token as the Secret gives one."""
    data = yaml.safe_load((REPO / "k8s" / "serve" / "configmap.yaml").read_text())["data"]
    return {**{k: str(v) for k, v in data.items()}, "TORCHFERRY_AUTH_TOKEN": TOKEN}


def _multipart(parts: list[tuple[str, str, bytes]], boundary: str = "hostileBOUNDARY") -> tuple[bytes, str]:
    out = b""
    for field, filename, data in parts:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _v2(inputs: list[dict], **extra) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def _empty_objects(size: int, field: bytes = b"inputs") -> bytes:
    """A JSON body of `size` bytes that is mostly `{},`: parsed, each costs ~70 bytes (16 MiB took 404 MiB)."""
    head = b'{"' + field + b'": ['
    return head + b"{}," * ((size - len(head) - 4) // 3) + b"{}]}"


def test_a_body_of_many_json_containers_is_refused_before_parsing(tmp_path: Path) -> None:
    """Measured with tracemalloc: 16 MiB of `{}` on /v2 (any model) or a text model's /predict is a 413 within a
    few MiB, where parsing it took 404 MiB, past a request's budget; brackets inside strings are not counted."""
    import tracemalloc

    from helpers import write_text_onnx

    image = create_app({"MODEL": hostile.tiny_model(tmp_path / "m.onnx"), "LOAD_SYNC": True}).test_client()
    text = create_app({"MODEL": str(write_text_onnx(tmp_path / "t.onnx", ["<pad>", "<unk>", "a"], ["x", "y"])),
                       "LOAD_SYNC": True}).test_client()
    tracemalloc.start()
    try:
        for client, url, field in ((image, "/v2/models/tiny/infer", b"inputs"), (text, "/predict", b"texts")):
            r = client.post(url, data=_empty_objects(16 * 2**20 - 64, field), content_type="application/json")
            assert r.status_code == 413 and "objects and arrays" in r.get_data(as_text=True), r.get_data()[:200]
        assert tracemalloc.get_traced_memory()[1] < 96 * 2**20
    finally:
        tracemalloc.stop()
    brackets = _v2([{"name": "input", "shape": [1], "datatype": "BYTES", "data": ["[{" * 2**20]}])  # in a string
    r = image.post("/v2/models/tiny/infer", data=brackets, content_type="application/json")
    assert r.status_code == 400 and "objects and arrays" not in r.json["error"], r.json
    assert text.post("/predict", json={"texts": ["[{" * 100, '"{"']}).status_code == 200


def _jpeg_header(width: int, height: int) -> bytes:
    """A baseline JPEG whose frame header claims width × height."""
    data = bytearray(hostile.save(Image.new("RGB", (16, 16)), "JPEG"))
    at = data.find(b"\xff\xc0")
    data[at + 5:at + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def _png_with(chunk: bytes) -> bytes:
    base = hostile.save(Image.new("L", (4, 4)), "PNG")
    return base[:33] + chunk + base[33:]


def corpus() -> list[dict]:
    """(name, method, path, headers, body, expected status, expected code or None for 200) per hostile kind."""
    png, jpg = {"Content-Type": "image/png"}, {"Content-Type": "image/jpeg"}
    js, gz = {"Content-Type": "application/json"}, {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    infer = "/v2/models/tiny/infer"
    small = hostile.save(Image.new("RGB", (20, 20), (200, 30, 30)), "PNG")
    fp32 = _v2_fp32()
    b64 = base64.b64encode
    many_files, many_ct = _multipart([("f", f"{i}.png", small) for i in range(17)])
    parts, parts_ct = _multipart([("f", "a.png", small)] + [("x", "", b"1")] * 40)
    one, _ = _multipart([("f", "a.png", small)])
    zbomb = gzip.compress(b"\0" * (20 * 2**20))
    ztext = png_chunk_ztxt(b"\0" * (64 * 2**20))
    cases = [
        # images on /predict
        ("empty body", "POST", "/predict", png, b"", 400, "empty_image"),
        ("garbage", "POST", "/predict", png, b"\x00\x01garbage" * 50, 400, "not_an_image"),
        ("a PDF", "POST", "/predict", {"Content-Type": "image/jpeg"}, b"%PDF-1.4\n%hostile", 400, "not_an_image"),
        ("JSON sent as an image", "POST", "/predict", png, b'{"a": 1}', 400, "not_an_image"),
        ("truncated JPEG", "POST", "/predict", jpg,
         hostile.save(hostile.gray_noise(64, 64).convert("RGB"), "JPEG")[:700], 400, "corrupt_image"),
        ("truncated PNG", "POST", "/predict", png, hostile.save(hostile.gray_noise(64, 64), "PNG")[:300], 400, None),
        ("PNG with a bad CRC", "POST", "/predict", png, small[:29] + b"\x00\x00\x00\x00" + small[33:], 400, None),
        ("ICO (not allow-listed)", "POST", "/predict", png, hostile.save(Image.new("RGB", (16, 16)), "ICO"), 400,
         "not_an_image"),
        ("PNG header bomb 20000²", "POST", "/predict", png, png_bomb(), 413, "too_many_pixels"),
        ("PNG header bomb 7000²", "POST", "/predict", png, png_bomb(7000, 7000), 413, "too_many_pixels"),
        ("JPEG header bomb", "POST", "/predict", jpg, _jpeg_header(65000, 65000), 413, "too_many_pixels"),
        ("GIF screen bomb", "POST", "/predict", png, gif_bomb(), 413, "too_many_pixels"),
        ("BMP header bomb", "POST", "/predict", png, bmp_bomb(), 413, "too_many_pixels"),
        ("TIFF header bomb", "POST", "/predict", png, hostile.tiff_pages(1, 60_000, 60_000), 413, "too_many_pixels"),
        ("PNG of zero width", "POST", "/predict", png, png_bomb(0, 5), 400, None),
        ("40,000,000 × 1 strip", "POST", "/predict", png, hostile.png_strip(40_000_000, 1), 413, "too_many_pixels"),
        ("1 × 40,000,000 strip", "POST", "/predict", png, hostile.png_strip(1, 40_000_000), 413, "too_many_pixels"),
        ("PNG of 1.2 M empty chunks", "POST", "/predict", png, hostile.png_many_chunks(1_200_000), 400,
         "too_many_chunks"),
        ("PNG zTXt bomb", "POST", "/predict", png, _png_with(ztext), 400, None),
        ("premultiplied gray TIFF", "POST", "/predict", png, hostile.tiff_premultiplied_gray(), 415,
         "unsupported_image_mode"),
        # answered: hostile in shape, bounded in cost
        ("1,000,000 × 1 strip", "POST", "/predict", png, hostile.png_strip(1_000_000, 1), 200, None),
        ("TIFF of 40,000 pages", "POST", "/predict", png, hostile.tiff_pages(40_000), 200, None),
        ("GIF of 500,000 frames", "POST", "/predict", png, hostile.gif_frames(500_000), 200, None),
        ("16-bit gray 40 MP", "POST", "/predict", png, hostile.png_gray16(6325, 6324), 200, None),
        ("RGBA 40 MP", "POST", "/predict", png, hostile.png_rgba(6325, 6324), 200, None),
        ("CIELab TIFF", "POST", "/predict", png, hostile.tiff_lab(), 200, None),
        ("MPO (phone JPEG)", "POST", "/predict", jpg, hostile.mpo(), 200, None),
        # the request around the images
        ("no Content-Type", "POST", "/predict", {}, small, 415, "unsupported_media_type"),
        ("text/plain", "POST", "/predict", {"Content-Type": "text/plain"}, small, 415, "unsupported_media_type"),
        ("multipart without files", "POST", "/predict", {"Content-Type": "multipart/form-data; boundary=x"},
         b"--x\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--x--\r\n", 400, "no_image"),
        ("17 files", "POST", "/predict", {"Content-Type": many_ct}, many_files, 413, "too_many_images"),
        ("41 form parts", "POST", "/predict", {"Content-Type": parts_ct}, parts, 413, None),
        ("multipart without boundary", "POST", "/predict", {"Content-Type": "multipart/form-data"}, one, 400, None),
        ("top_k=0", "POST", "/predict?top_k=0", png, small, 400, "bad_top_k"),
        ("top_k=-1", "POST", "/predict?top_k=-1", png, small, 400, "bad_top_k"),
        ("top_k=abc", "POST", "/predict?top_k=abc", png, small, 400, "bad_top_k"),
        ("top_k past the classes", "POST", "/predict?top_k=4", png, small, 400, "bad_top_k"),
        ("top_k of 400 digits", "POST", "/predict?top_k=" + "9" * 400, png, small, 400, "bad_top_k"),
        ("GET /predict", "GET", "/predict", {}, b"", 405, "method_not_allowed"),
        ("PUT /predict", "PUT", "/predict", png, small, 405, "method_not_allowed"),
        ("path traversal", "GET", "/static/..%2f..%2fetc%2fpasswd", {}, b"", 404, "not_found"),
        ("unknown route", "GET", "/admin", {}, b"", 404, "not_found"),
        ("POST /metrics", "POST", "/metrics", png, small, 405, "method_not_allowed"),
        # authentication
        ("no token", "POST", "/predict", {**png, "Authorization": None}, small, 401, "unauthorized"),
        ("wrong token", "POST", "/predict", {**png, "Authorization": "Bearer nope"}, small, 401, "unauthorized"),
        ("Basic instead of Bearer", "GET", "/metadata", {"Authorization": "Basic dXNlcjpwdw=="}, b"", 401,
         "unauthorized"),
        ("latin-1 token", "GET", "/metadata", {"Authorization": "Bearer caf\xe9".encode("latin-1")}, b"", 401,
         "unauthorized"),
        # the Open Inference Protocol
        ("v2: not JSON", "POST", infer, js, b"{not json", 400, "v2"),
        ("v2: JSON nested 100,000 deep", "POST", infer, js, b"[" * 100_000, 400, "v2"),
        ("v2: 15 MiB of empty JSON objects", "POST", infer, js, _empty_objects(15 * 2**20), 413, "v2"),
        ("v2: NaN constant", "POST", infer, js, b'{"inputs": NaN}', 400, "v2"),
        ("v2: integer past float range", "POST", infer, js, b'{"inputs": [], "id": ' + b"9" * 400 + b"}", 400, "v2"),
        ("v2: inputs not a list", "POST", infer, js, b'{"inputs": 5}', 400, "v2"),
        ("v2: negative shape", "POST", infer, js, _v2([{"name": "input", "shape": [-1, 3, 32, 32],
                                                         "datatype": "FP32", "data": []}]), 400, "v2"),
        ("v2: wrong datatype", "POST", infer, js, _v2([{"name": "input", "shape": [1], "datatype": "INT64",
                                                         "data": [1]}]), 400, "v2"),
        ("v2: data shorter than shape", "POST", infer, js, _v2([{"name": "input", "shape": [1, 3, 32, 32],
                                                                  "datatype": "FP32", "data": [0.0]}]), 400, "v2"),
        ("v2: wrong image size", "POST", infer, js, _v2([{"name": "input", "shape": [1, 3, 16, 16],
                                                           "datatype": "FP32", "data": [0.0] * 768}]), 400, "v2"),
        ("v2: 17 rows", "POST", infer, js, _v2([{"name": "input", "shape": [17, 3, 32, 32], "datatype": "FP32",
                                                  "parameters": {"binary_data_size": 0}}]), 413, "v2"),
        ("v2: unknown input", "POST", infer, js, _v2([{"name": "x", "shape": [1], "datatype": "FP32",
                                                        "data": [1.0]}]), 400, "v2"),
        ("v2: parameters not an object", "POST", infer, js, _v2([{"name": "input", "shape": [1, 3, 32, 32],
                                                                   "datatype": "FP32", "parameters": [],
                                                                   "data": [0.0] * 3072}]), 400, "v2"),
        ("v2: shared memory", "POST", infer, js, _v2([{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                                        "parameters": {"shared_memory_region": "x"}}]), 400, "v2"),
        ("v2: id not a string", "POST", infer, js, json.dumps({**json.loads(fp32), "id": 5}).encode(), 400, "v2"),
        ("v2: unknown output", "POST", infer, js, _v2(json.loads(fp32)["inputs"], outputs=[{"name": "nope"}]), 400,
         "v2"),
        ("v2: bad header length", "POST", infer, {**js, "Inference-Header-Content-Length": "-4"}, fp32, 400, "v2"),
        ("v2: binary size lies", "POST", infer, {**js, "Inference-Header-Content-Length": str(len(fp32) + 0)},
         fp32 + b"\0" * 12, 400, "v2"),
        ("v2: BYTES not base64", "POST", infer, js, _v2([{"name": "input", "shape": [1], "datatype": "BYTES",
                                                           "data": ["***"]}]), 400, "v2"),
        ("v2: BYTES pixel bomb", "POST", infer, js, _v2([{"name": "input", "shape": [1], "datatype": "BYTES",
                                                           "data": [b64(png_bomb()).decode()]}]), 413, "v2"),
        ("v2: BYTES premultiplied TIFF", "POST", infer, js, _v2([{"name": "input", "shape": [1], "datatype": "BYTES",
                                                                   "data": [b64(hostile.tiff_premultiplied_gray())
                                                                            .decode()]}]), 415, "v2"),
        ("v2: BYTES PNG of 1.2 M chunks", "POST", infer, js, _v2([{"name": "input", "shape": [1],
                                                                    "datatype": "BYTES", "data": [b64(
                                                                        hostile.png_many_chunks(200_000)).decode()]}]),
         400, "v2"),
        ("v2: unknown model", "POST", "/v2/models/other/infer", js, fp32, 404, "v2"),
        ("v2: unknown version", "GET", "/v2/models/tiny/versions/7", {}, b"", 404, "v2"),
        ("v2: image body", "POST", infer, png, small, 415, "v2"),
        ("v2: gzip bomb", "POST", infer, gz, zbomb, 413, "v2"),
        ("v2: truncated gzip", "POST", infer, gz, gzip.compress(fp32)[:-30], 400, "v2"),
        ("v2: gzip with trailing junk", "POST", infer, gz, gzip.compress(fp32) + b"junk", 400, "v2"),
        ("v2: 100 gzip members", "POST", infer, gz, hostile.gzip_members(*([b" "] * 100), fp32), 400, "v2"),
        ("v2: deflate with trailing junk", "POST", infer, {**js, "Content-Encoding": "deflate"},
         zlib.compress(fp32) + b"junk", 400, "v2"),
        ("v2: brotli", "POST", infer, {**js, "Content-Encoding": "br"}, fp32, 415, "v2"),
        ("v2: two gzip members", "POST", infer, gz, hostile.gzip_members(fp32[:100], fp32[100:]), 200, None),
    ]
    keys = ("name", "method", "path", "headers", "body", "status", "code")
    return [dict(zip(keys, case)) for case in cases]


def png_chunk_ztxt(text: bytes) -> bytes:
    return hostile.png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(text, 9))


def gif_bomb() -> bytes:
    data = bytearray(hostile.save(Image.new("L", (4, 4)), "GIF"))
    data[6:10] = (65535).to_bytes(2, "little") * 2  # logical screen
    at = data.find(b"\x2c")
    data[at + 5:at + 9] = (65535).to_bytes(2, "little") * 2  # the image itself
    return bytes(data)


def bmp_bomb() -> bytes:
    data = bytearray(hostile.save(Image.new("RGB", (4, 4)), "BMP"))
    data[18:26] = (50_000).to_bytes(4, "little") * 2
    return bytes(data)


def _raw(port: int, head: bytes, body: bytes = b"", timeout: float = 60) -> tuple[int, bytes]:
    """Send bytes as they are (chunked bodies, lying lengths); the status and the body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + body)
        data = b""
        while True:
            try:
                part = s.recv(65536)
            except ConnectionResetError:
                break
            if not part:
                break
            data += part
            if b"\r\n\r\n" in data:
                headers, _, rest = data.partition(b"\r\n\r\n")
                length = [int(h.split(b":")[1]) for h in headers.split(b"\r\n") if
                          h.lower().startswith(b"content-length:")]
                if length and len(rest) >= length[0]:
                    break
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


def _chunked(limit: int) -> bytes:
    chunk = b"\0" * (1 << 20)
    out, sent = b"", 0
    while sent <= limit:  # one byte past the limit
        piece = chunk[: min(len(chunk), limit + 1 - sent)]
        out += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        sent += len(piece)
    return out + b"0\r\n\r\n"


class HealthProbe(threading.Thread):
    """GET /healthz every 0.05 s until stopped; records each answer's status and seconds (timeout 30 s)."""

    def __init__(self, base: str):
        super().__init__(daemon=True)
        self.base, self.results, self._stop_event = base, [], threading.Event()

    def run(self) -> None:
        session = requests.Session()
        while not self._stop_event.is_set():
            t0 = time.perf_counter()
            try:
                status = session.get(f"{self.base}/healthz", timeout=30).status_code
            except requests.RequestException as exc:
                status = type(exc).__name__
            self.results.append((status, time.perf_counter() - t0))
            self._stop_event.wait(0.05)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=60)


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _workers(proc: subprocess.Popen, server: str) -> list[int]:
    import psutil

    if server == "dev":
        return [proc.pid]
    return sorted(c.pid for c in psutil.Process(proc.pid).children())


def _check_answer(case: dict, status: int, body: bytes, content_type: str) -> str | None:
    """None when the answer is what the case expects, else what is wrong."""
    if status >= 500 or status != case["status"]:
        return f"{case['name']}: {status} (expected {case['status']}): {body[:300]!r}"
    if status == 200:
        return None
    if "json" not in content_type:
        return f"{case['name']}: {status} is not JSON ({content_type}): {body[:200]!r}"
    payload = json.loads(body)
    if case["code"] == "v2" or case["path"].startswith("/v2"):
        ok = isinstance(payload.get("error"), str) and payload["error"]
    else:
        err = payload.get("error") or {}
        ok = isinstance(err.get("code"), str) and isinstance(err.get("message"), str) and (
            case["code"] is None or err["code"] == case["code"])
    return None if ok else f"{case['name']}: {status} without the expected error shape: {payload}"


@pytest.mark.slow
@pytest.mark.parametrize("server", ["dev", "gunicorn"])
def test_hostile_corpus_against_a_real_server(server: str, tmp_path: Path, live_server) -> None:
    cases = corpus()
    assert len({c["name"] for c in cases if c["status"] != 200}) >= 60
    model = hostile.tiny_model(tmp_path / "model.onnx", sidecar=True)
    limit = int(production_env()["TORCHFERRY_MAX_UPLOAD_BYTES"])
    live = live_server(server, Path(model), env=production_env())  # the Deployment's settings, a token
    port, base, proc = live.port, live.base, live.proc
    probe = None
    try:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        session = requests.Session()
        warm = session.post(f"{base}/predict", data=hostile.save(Image.new("RGB", (300, 200)), "JPEG"),
                            headers={**auth, "Content-Type": "image/jpeg"}, timeout=60)
        assert warm.status_code == 200, warm.text
        workers = _workers(proc, server)
        idle = {pid: _status(pid, "VmRSS") for pid in workers}
        probe = HealthProbe(base)
        probe.start()
        problems = []
        for case in cases:
            headers = {**auth, **case["headers"]}
            headers = {k: v for k, v in headers.items() if v is not None}
            r = session.request(case["method"], base + case["path"], data=case["body"], headers=headers, timeout=120)
            problem = _check_answer(case, r.status_code, r.content, r.headers.get("Content-Type", ""))
            if problem:
                problems.append(problem)
        # Bodies past the limit: with a Content-Length (refused on the header), and chunked.
        head = (f"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: image/png\r\n"
                f"Content-Length: {limit + 1}\r\nConnection: close\r\n\r\n").encode()
        status, body = _raw(port, head)
        if status != 413 or json.loads(body)["error"]["code"] != "request_entity_too_large":
            problems.append(f"Content-Length past the limit: {status} {body[:200]!r}")
        head = (f"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: image/png\r\n"
                "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()
        status, body = _raw(port, head, _chunked(limit))
        if status != 413 or json.loads(body)["error"]["code"] != "request_entity_too_large":
            problems.append(f"chunked body past the limit: {status} {body[:200]!r}")
        small = hostile.save(Image.new("RGB", (20, 20), (200, 30, 30)), "PNG")
        chunked_small = f"{len(small):x}\r\n".encode() + small + b"\r\n0\r\n\r\n"
        status, body = _raw(port, head, chunked_small)
        if status != 200:
            problems.append(f"a small chunked image: {status} {body[:200]!r}")
        probe.stop()
        assert not problems, "\n".join(problems)
        assert proc.poll() is None and _workers(proc, server) == workers, "a worker died or was replaced"
        slow = [(s, round(t, 2)) for s, t in probe.results if s != 200 or t >= HEALTH_BOUND_S]
        # At least a few probes ran while the corpus did (a quiet machine sends it in about 2 s).
        assert len(probe.results) >= 5 and not slow, f"/healthz answers: {slow}"
        peaks = {pid: (_status(pid, "VmHWM") - idle[pid]) / 2**20 for pid in workers}
        print(f"{server}: {len(cases) + 3} requests; worker peak RSS over idle (MiB): "
              f"{ {pid: round(mb) for pid, mb in peaks.items()} }; /healthz: {len(probe.results)} probes, slowest "
              f"{max(t for _, t in probe.results):.3f} s")
        for pid, over in peaks.items():
            assert over <= REQUEST_BUDGET_MB, f"worker {pid} peaked {over:.0f} MB over idle"
    finally:
        if probe is not None and probe.is_alive():
            probe.stop()
