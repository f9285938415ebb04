"""serve/v2.py: the Open Inference Protocol v2 routes, through Flask's test client and through the real
Triton client (tritonclient.http) against real server processes on 127.0.0.1."""

from __future__ import annotations

import base64
import gzip
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from helpers import png, png_bomb, pytorch_labels, val_images

from torchferry.serve.app import create_app
from torchferry.serve.images import decode, preprocess

NAME = "smallcnn"  # a single model file is named by its metadata's architecture unless --name says otherwise


RED, GREEN, BLUE = png((210, 30, 30)), png((30, 210, 30)), png((30, 30, 210))


def tensor(app, images: list[bytes]) -> np.ndarray:
    """The model's input for `images`, preprocessed as the server does it."""
    spec = app.extensions["torchferry"].active.predictor.info.preprocess
    return np.stack([preprocess(decode(b, 40_000_000), spec) for b in images])


def binary_request(request: dict, blobs: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """A request in the binary tensor data extension's form: JSON, then the tensors' bytes."""
    head = json.dumps(request).encode()
    return head + b"".join(blobs), {
        "Inference-Header-Content-Length": str(len(head)),
        "Content-Type": "application/octet-stream",
    }


def length_prefixed(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def split_response(r) -> tuple[dict, bytes]:
    n = r.headers.get("Inference-Header-Content-Length")
    if n is None:
        return r.json, b""
    return json.loads(r.data[: int(n)]), r.data[int(n) :]


def test_server_metadata_and_health(client) -> None:
    meta = client.get("/v2").json
    assert meta["name"] == "torchferry" and set(meta["extensions"]) == {"binary_tensor_data", "classification"}
    assert client.get("/v2/health/live").json == {"live": True}
    ready = client.get("/v2/health/ready")
    assert ready.status_code == 200 and ready.json == {"ready": True}


def test_model_metadata_follows_the_protocol(client) -> None:
    for url in (f"/v2/models/{NAME}", f"/v2/models/{NAME}/versions/1"):
        meta = client.get(url).json
        assert meta["name"] == NAME and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 16, 16]}]
        assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]
        assert meta["parameters"]["classes"] == ["blue", "green", "red"] and meta["parameters"]["version"] == "1"
    for url in (f"/v2/models/{NAME}/ready", f"/v2/models/{NAME}/versions/1/ready"):
        r = client.get(url)
        assert r.status_code == 200 and r.json["ready"] is True
    named = create_app({"MODEL": client.application.config["MODEL"], "MODEL_NAME": "colours", "LOAD_SYNC": True})
    assert named.test_client().get("/v2/models/colours").json["name"] == "colours"


def test_fp32_tensor_flat_nested_and_binary_give_the_models_logits(app, client) -> None:
    x = tensor(app, [RED, GREEN, BLUE])
    expected = app.extensions["torchferry"].active.predictor.run(x)
    inp = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    flat = client.post(f"/v2/models/{NAME}/infer", json={"id": "42", "inputs": [{**inp, "data": x.ravel().tolist()}]})
    nested = client.post(f"/v2/models/{NAME}/versions/1/infer", json={"inputs": [{**inp, "data": x.tolist()}]})
    body, headers = binary_request(
        {"inputs": [{**inp, "parameters": {"binary_data_size": x.nbytes}}], "parameters": {"binary_data_output": True}},
        [x.astype("<f4").tobytes()],
    )
    binary = client.post(f"/v2/models/{NAME}/infer", data=body, headers=headers)
    assert flat.status_code == nested.status_code == binary.status_code == 200, (flat.json, nested.json)
    assert flat.json["id"] == "42" and flat.json["model_name"] == NAME and flat.json["model_version"] == "1"
    for r in (flat, nested):
        out = r.json["outputs"][0]
        assert out["name"] == "logits" and out["datatype"] == "FP32" and out["shape"] == [3, 3]
        np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(3, 3), expected, rtol=1e-6)
    head, raw = split_response(binary)
    assert binary.headers["Content-Type"] == "application/octet-stream"
    assert head["outputs"][0]["parameters"]["binary_data_size"] == len(raw) == 36
    np.testing.assert_array_equal(np.frombuffer(raw, "<f4").reshape(3, 3), expected)


def test_bytes_images_in_binary_and_base64_are_classified_like_predict(client) -> None:
    images = [RED, GREEN, BLUE, RED]
    predict = client.post(
        "/predict",
        data={f"f{i}": (io.BytesIO(b), f"{i}.png") for i, b in enumerate(images)},
        content_type="multipart/form-data",
    ).json["predictions"]
    labels = [p["label"] for p in predict]
    assert labels == ["red", "green", "blue", "red"]
    outputs = [{"name": "logits", "parameters": {"classification": 2}}]
    as_json = client.post(
        f"/v2/models/{NAME}/infer",
        json={
            "inputs": [
                {
                    "name": "input",
                    "shape": [4],
                    "datatype": "BYTES",
                    "data": [base64.b64encode(b).decode() for b in images],
                }
            ],
            "outputs": outputs,
        },
    )
    raw = length_prefixed(images)
    body, headers = binary_request(
        {
            "inputs": [
                {"name": "input", "shape": [4, 1], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}
            ],
            "outputs": [{"name": "logits", "parameters": {"classification": 2, "binary_data": True}}],
        },
        [raw],
    )
    as_binary = client.post(f"/v2/models/{NAME}/infer", data=body, headers=headers)
    assert as_json.status_code == 200 and as_binary.status_code == 200, (as_json.json, as_binary.data[:300])
    out = as_json.json["outputs"][0]
    assert out["datatype"] == "BYTES" and out["shape"] == [4, 2]
    rows = [out["data"][i : i + 2] for i in range(0, 8, 2)]
    assert [r[0].split(":")[2] for r in rows] == labels
    value, index, label = rows[0][0].split(":")
    assert float(value) > float(rows[0][1].split(":")[0]) and ["blue", "green", "red"][int(index)] == label
    head, blob = split_response(as_binary)
    assert head["outputs"][0]["parameters"]["binary_data_size"] == len(blob)
    strings, offset = [], 0
    while offset < len(blob):
        (n,) = struct.unpack_from("<I", blob, offset)
        strings.append(blob[offset + 4 : offset + 4 + n].decode())
        offset += 4 + n
    assert strings == out["data"]


def test_json_labelled_as_a_form_is_read_as_json_as_curl_sends_it(client) -> None:
    body = json.dumps(_images([base64.b64encode(BLUE).decode()]))
    r = client.post(f"/v2/models/{NAME}/infer", data=body, content_type="application/x-www-form-urlencoded")
    assert r.status_code == 200 and r.json["outputs"][0]["shape"] == [1, 3]
    r = client.post(f"/v2/models/{NAME}/infer", data=RED, content_type="image/png")
    assert r.status_code == 415 and "/predict" in r.json["error"]


def test_gzip_request_body_is_accepted(client) -> None:
    body = json.dumps(
        {
            "inputs": [
                {"name": "input", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(GREEN).decode()]}
            ],
            "outputs": [{"name": "logits", "parameters": {"classification": 1}}],
        }
    ).encode()
    r = client.post(
        f"/v2/models/{NAME}/infer",
        data=gzip.compress(body),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert r.status_code == 200 and r.json["outputs"][0]["data"][0].endswith(":green")


def _fp32(shape: list[int], data) -> dict:
    return {"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": data}]}


def _images(items: list[str], shape: list[int] | None = None) -> dict:
    return {"inputs": [{"name": "input", "shape": shape or [len(items)], "datatype": "BYTES", "data": items}]}


def _bad_v2_requests() -> dict[str, tuple[dict, int]]:
    """name: (test-client kwargs for POST /v2/models/smallcnn/infer, expected status)."""
    zeros = [0.0] * 768
    b64 = base64.b64encode
    header = json.dumps(_fp32([1, 3, 16, 16], zeros)).encode()
    raw = length_prefixed([RED])
    bad_prefix = struct.pack("<I", 10_000) + RED
    binary_images = {
        "inputs": [
            {"name": "input", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(bad_prefix)}}
        ]
    }
    return {
        "not json": ({"data": b"{nope", "content_type": "application/json"}, 400),
        "json array": ({"json": [1, 2]}, 400),
        "empty body": ({"data": b"", "content_type": "application/json"}, 400),
        "no inputs": ({"json": {"inputs": []}}, 400),
        "two inputs": ({"json": {"inputs": [_fp32([1, 3, 16, 16], zeros)["inputs"][0]] * 2}}, 400),
        "unknown input": ({"json": {"inputs": [{**_fp32([1, 3, 16, 16], zeros)["inputs"][0], "name": "x"}]}}, 400),
        "wrong shape": ({"json": _fp32([1, 3, 32, 32], [0.0] * 3072)}, 400),
        "wrong datatype": (
            {"json": {"inputs": [{**_fp32([1, 3, 16, 16], zeros)["inputs"][0], "datatype": "INT64"}]}},
            400,
        ),
        "too few values": ({"json": _fp32([1, 3, 16, 16], zeros[:-1])}, 400),
        "strings as FP32": ({"json": _fp32([1, 3, 16, 16], ["a"] * 768)}, 400),
        # a JSON integer past float64's range reaches numpy as a Python int: OverflowError, not a 500
        "integer too large for FP32": ({"data": json.dumps(_fp32([1, 3, 16, 16], [10**400] * 768)).encode(),
                                        "content_type": "application/json"}, 400),
        "parameters not an object": ({"json": {**_fp32([1, 3, 16, 16], zeros), "parameters": []}}, 400),
        "input parameters not an object": (
            {"json": {"inputs": [{**_fp32([1, 3, 16, 16], zeros)["inputs"][0], "parameters": 0}]}},
            400,
        ),
        "NaN": (
            {
                "data": json.dumps(_fp32([1, 3, 16, 16], [float("nan")] * 768)).encode(),
                "content_type": "application/json",
            },
            400,
        ),
        "ragged nesting": ({"json": _fp32([2, 3, 16, 16], [zeros, zeros[:10]])}, 400),
        "17 rows": ({"json": _fp32([17, 3, 16, 16], [0.0] * 768 * 17)}, 413),
        "17 images": ({"json": _images([b64(RED).decode()] * 17)}, 413),
        "empty batch": ({"json": _images([])}, 400),
        "not base64": ({"json": _images(["not base64!"])}, 400),
        "not an image": ({"json": _images([b64(b"junk" * 100).decode()])}, 400),
        "pixel bomb": ({"json": _images([b64(png_bomb()).decode()])}, 413),
        "shape [1, 2] of images": ({"json": _images([b64(RED).decode()] * 2, [1, 2])}, 400),
        "classification out of range": (
            {
                "json": {
                    **_images([b64(RED).decode()]),
                    "outputs": [{"name": "logits", "parameters": {"classification": 9}}],
                }
            },
            400,
        ),
        "unknown output": ({"json": {**_images([b64(RED).decode()]), "outputs": [{"name": "probs"}]}}, 400),
        "shared memory": (
            {
                "json": {
                    **_images([b64(RED).decode()]),
                    "outputs": [
                        {"name": "logits", "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 12}}
                    ],
                }
            },
            400,
        ),
        "id not a string": ({"json": {**_images([b64(RED).decode()]), "id": 7}}, 400),
        "header length past the body": ({"data": header, "headers": {"Inference-Header-Content-Length": "99999"}}, 400),
        "binary without a claim": (
            {"data": header + b"\0" * 8, "headers": {"Inference-Header-Content-Length": str(len(header))}},
            400,
        ),
        "binary size mismatch": (
            dict(
                zip(
                    ("data", "headers"),
                    binary_request(
                        {
                            "inputs": [
                                {
                                    "name": "input",
                                    "shape": [1],
                                    "datatype": "BYTES",
                                    "parameters": {"binary_data_size": len(raw) + 4},
                                }
                            ]
                        },
                        [raw],
                    ),
                )
            ),
            400,
        ),
        "length prefix past the data": (
            dict(zip(("data", "headers"), binary_request(binary_images, [bad_prefix]))),
            400,
        ),
        "30 MB body": ({"data": b"{" * (30 * 1024 * 1024), "content_type": "application/json"}, 413),
        "gzip bomb": (
            {
                "data": gzip.compress(b" " * (40 * 1024 * 1024)),
                "headers": {"Content-Encoding": "gzip"},
                "content_type": "application/json",
            },
            413,
        ),
        "brotli body": ({"data": b"x", "headers": {"Content-Encoding": "br"}, "content_type": "application/json"}, 415),
        "multipart body": ({"data": {"f": (io.BytesIO(RED), "a.png")}, "content_type": "multipart/form-data"}, 415),
    }


@pytest.mark.parametrize("case", list(_bad_v2_requests()))
def test_bad_infer_request_gets_the_protocols_error(client, case: str) -> None:
    kwargs, status = _bad_v2_requests()[case]
    r = client.post(f"/v2/models/{NAME}/infer", **kwargs)
    assert r.status_code == status, (case, r.data[:300])
    assert set(r.json) == {"error"} and isinstance(r.json["error"], str) and r.json["error"]
    assert client.get("/v2/health/live").status_code == 200


def test_unknown_model_version_and_route_are_404_and_wrong_method_405(client) -> None:
    for url in (
        "/v2/models/other",
        "/v2/models/other/infer",
        f"/v2/models/{NAME}/versions/2",
        f"/v2/models/{NAME}/versions/2/ready",
        "/v2/nothing",
    ):
        r = client.post(url, json={}) if url.endswith("infer") else client.get(url)
        assert r.status_code == 404 and isinstance(r.json["error"], str), url
    r = client.get(f"/v2/models/{NAME}/infer")
    assert r.status_code == 405 and isinstance(r.json["error"], str)
    assert "POST" in r.headers["Allow"] and r.mimetype == "application/json"  # RFC 9110: a 405 says what is allowed


def test_not_ready_is_503_with_the_reason(tmp_path: Path) -> None:
    client = create_app({"MODEL": str(tmp_path / "none.onnx"), "LOAD_SYNC": True}).test_client()
    r = client.get("/v2/health/ready")
    assert r.status_code == 503 and r.json["ready"] is False and "does not exist" in r.json["error"]
    assert client.post(f"/v2/models/{NAME}/infer", json={}).status_code == 503
    assert client.get("/v2/health/live").status_code == 200


def test_infer_counts_images_in_the_metrics(client) -> None:
    client.post(f"/v2/models/{NAME}/infer", json=_images([base64.b64encode(RED).decode()] * 3))
    text = client.get("/metrics").get_data(as_text=True)
    assert 'torchferry_requests_total{route="/v2/models/<name>/infer",status="200"} 1.0' in text
    assert "torchferry_images_predicted_total 3.0" in text


# --- the real Triton client against real server processes ---------------------------------------------------------


@pytest.fixture(scope="module")
def pytorch_truth(exported_model: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Validation images (PNG and JPEG) and the labels the PyTorch checkpoint gives them."""
    paths = val_images(exported_model["data"], tmp_path_factory.mktemp("v2-images"))[:16]
    return {"paths": paths, "labels": pytorch_labels(exported_model["checkpoint"], paths)}


@pytest.mark.parametrize("server", ["dev", pytest.param("gunicorn", marks=pytest.mark.slow)])
def test_tritonclient_gets_the_labels_pytorch_predicts(
    server: str, exported_model: dict, pytorch_truth: dict, tmp_path: Path, live_server
) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    token = None
    if server == "dev":
        live = live_server("dev", args=["--model", str(exported_model["model"]), "--name", "colours"])
    else:  # with a token, read from a file as a Kubernetes Secret mounts it
        (tmp_path / "token").write_text("live-token-42\n")
        live = live_server(
            "gunicorn",
            exported_model["model"],
            env={"TORCHFERRY_MODEL_NAME": "colours", "TORCHFERRY_AUTH_TOKEN_FILE": str(tmp_path / "token")},
        )
        token = "live-token-42"
    port, base = live.port, live.base

    def headers() -> dict[str, str] | None:  # a fresh dict per call: tritonclient adds its own headers to it
        return {"Authorization": f"Bearer {token}"} if token else None

    paths, expected = pytorch_truth["paths"], pytorch_truth["labels"]
    if token:
        check_auth_live(base, paths[0].read_bytes())
    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
    assert (
        client.is_server_live() and client.is_server_ready() and client.is_model_ready("colours", headers=headers())
    )
    meta = client.get_model_metadata("colours", headers=headers())
    assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    assert meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 3, 16, 16]}
    assert "classification" in client.get_server_metadata(headers=headers())["extensions"]
    spec = meta["parameters"]
    assert spec["classes"] == ["blue", "green", "red"]
    pre = exported_model_preprocess(exported_model)
    for batch in (1, 8):
        for binary in (True, False):
            blobs = [p.read_bytes() for p in paths[:batch]]
            images = httpclient.InferInput("input", [batch], "BYTES")
            if binary:
                images.set_data_from_numpy(np.array(blobs, dtype=np.object_))
            else:  # JSON carries strings: the images' base64
                images.set_data_from_numpy(
                    np.array([base64.b64encode(b) for b in blobs], dtype=np.object_), binary_data=False
                )
            wanted = httpclient.InferRequestedOutput("logits", binary_data=binary, class_count=1)
            result = client.infer("colours", [images], outputs=[wanted], headers=headers())
            top1 = [row[0] for row in result.as_numpy("logits")]  # bytes from binary outputs, str from JSON
            labels = [(t.decode() if isinstance(t, bytes) else t).split(":")[2] for t in top1]
            assert labels == expected[:batch], (batch, binary)
            assert result.get_response()["model_version"] == "1"

            x = np.stack([preprocess(decode(b, 40_000_000), pre) for b in blobs])
            tensor_in = httpclient.InferInput("input", list(x.shape), "FP32")
            tensor_in.set_data_from_numpy(x, binary_data=binary)
            # No outputs named: all of them, in binary.
            result = client.infer("colours", [tensor_in], model_version="1", headers=headers())
            logits = result.as_numpy("logits")
            assert logits.shape == (batch, 3)
            assert [spec["classes"][i] for i in logits.argmax(1)] == expected[:batch], (batch, binary)
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.infer("nope", [tensor_in], headers=headers())
    if token:
        with pytest.raises(InferenceServerException, match="bearer token is not valid"):
            client.infer("colours", [tensor_in], headers={"Authorization": "Bearer wrong"})
    client.close()


def check_auth_live(base: str, image: bytes) -> None:
    """No token: 401 on predict, infer and metadata, 200 on the probes; a wrong token 401; the right one 200."""
    import requests

    infer = {
        "inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(image).decode()]}]
    }
    calls = {
        "predict": lambda h: requests.post(
            f"{base}/predict", data=image, timeout=30, headers={"Content-Type": "image/png", **h}
        ),
        "infer": lambda h: requests.post(f"{base}/v2/models/colours/infer", json=infer, headers=h, timeout=30),
        "metadata": lambda h: requests.get(f"{base}/metadata", headers=h, timeout=30),
        "v2 metadata": lambda h: requests.get(f"{base}/v2/models/colours", headers=h, timeout=30),
    }
    for name, call in calls.items():
        assert call({}).status_code == 401, name
        assert call({"Authorization": "Bearer wrong"}).status_code == 401, name
        assert call({"Authorization": "Bearer live-token-42"}).status_code == 200, name
    for probe in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
        assert requests.get(f"{base}{probe}", timeout=30).status_code == 200, probe


def exported_model_preprocess(exported_model: dict) -> dict:
    """The preprocessing spec stored in the exported model's metadata."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(exported_model["model"])).metadata_props}
    return json.loads(props["preprocess"])
