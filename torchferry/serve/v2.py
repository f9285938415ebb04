"""The Open Inference Protocol v2 over REST (KServe v2 / Triton HTTP) for the served classifier.

Routes: `GET /v2`, `/v2/health/live`, `/v2/health/ready`, `/v2/models/<name>[/versions/<v>]`,
`.../ready`, `POST .../infer`. Extensions: `binary_tensor_data` (tensors after the JSON header, whose length
is in `Inference-Header-Content-Length`: what tritonclient sends and asks for by default) and
`classification` (`"parameters": {"classification": k}` on the `logits` output: BYTES `[N, k]` of
"logit:index:label").

The one input takes either an FP32 tensor `[N, C, H, W]` already preprocessed (`data` flat or nested, or
binary) or a BYTES tensor `[N]` of encoded images (JPEG, PNG, ...), decoded and preprocessed exactly as
`/predict` does them (serve/v2_request.py decodes requests). In binary form BYTES elements are the raw file
bytes; in JSON, where elements are strings, each is the image's base64. Errors are `{"error": "..."}` with a
4xx status.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
from flask import Blueprint, Response, jsonify, request

from torchferry.serve.repository import Served
from torchferry.serve.state import count_images, reason_for_caller, state, versions_for_caller
from torchferry.serve.v2_request import (
    OutputRequest,
    decompress,
    input_batch,
    refused,
    requested_outputs,
    split_request,
)

PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["binary_tensor_data", "classification"]
# Bodies meant for /predict. Any other type is read as the JSON request, as Triton does: `curl -d` labels
# JSON application/x-www-form-urlencoded, and tritonclient sends no type at all.
_NOT_A_TENSOR_BODY = ("multipart/", "image/")

bp = Blueprint("v2", __name__, url_prefix="/v2")


def classification(logits: np.ndarray, k: int, classes: list[str]) -> list[list[str]]:
    """Per row, the top-k as "value:index:label" strings, highest logit first (ties: lower index first)."""
    rows = []
    for row in logits:
        order = np.argsort(-row, kind="stable")[:k]
        rows.append([f"{np.float32(row[i])!s}:{int(i)}:{classes[i]}" for i in order])  # shortest float32 text
    return rows


def _bytes_payload(values: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in (v.encode("utf-8") for v in values))


def encode_response(
    request: dict[str, Any], served: Served, logits: np.ndarray, outputs: list[OutputRequest]
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: plain JSON, or JSON then binary tensors with the header length."""
    response: dict[str, Any] = {"model_name": served.name, "model_version": served.version, "outputs": []}
    if "id" in request:
        response["id"] = request["id"]
    blobs = []
    for o in outputs:
        if o.classification:
            rows = classification(logits, o.classification, served.predictor.info.classes)
            tensor: dict[str, Any] = {"name": o.name, "datatype": "BYTES", "shape": [len(rows), o.classification]}
            flat = [s for row in rows for s in row]
            payload = _bytes_payload(flat) if o.binary else None
            data: Any = flat
        else:
            tensor = {"name": o.name, "datatype": "FP32", "shape": list(logits.shape)}
            arr = np.ascontiguousarray(logits, dtype="<f4")
            payload = arr.tobytes() if o.binary else None
            data = arr.reshape(-1).tolist()
        if payload is not None:
            tensor["parameters"] = {"binary_data_size": len(payload)}
            blobs.append(payload)
        else:
            tensor["data"] = data
        response["outputs"].append(tensor)
    head = json.dumps(response, separators=(",", ":")).encode()
    if not blobs:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(blobs), {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(head)),
    }


def model_metadata(served: Served, versions: dict[str, dict[str, str]]) -> dict[str, Any]:
    """$metadata_model_response: name, the version that answers, platform, tensors (-1: the dynamic batch)."""
    predictor = served.predictor
    info, task = predictor.info, predictor.task
    return {
        "name": served.name,
        "versions": [served.version],
        "platform": PLATFORM,
        "inputs": [{"name": predictor.input_name, "datatype": task.v2_datatype, "shape": [-1, *info.shape]}],
        "outputs": [{"name": predictor.output_name, "datatype": "FP32",
                     "shape": [-1, task.output_columns(info.spec)]}],
        # Beyond the spec's fields (clients ignore them): what answers, what was refused, how to send inputs.
        "parameters": {
            "version": served.version,
            "sha256": info.sha256,
            "task": info.task,
            **({"classes": info.classes} if task.classifier else {}),
            **task.v2_note(predictor.input_name, info.spec),
            "model_versions": versions,
        },
    }


def server_version() -> str:
    """torchferry's version when installed as a package; the serve image copies serve/ alone."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchferry")
    except PackageNotFoundError:
        return "unknown"


def _served(name: str, version: str | None) -> Served:
    """The model that answers `name` (and `version`, when given), or a 503 or 404 that says why not."""
    repo = state().repo
    served = repo.active
    if served is None:
        raise refused(503, f"the model is not ready: {reason_for_caller()}")
    if name != served.name:
        raise refused(404, f"unknown model {name!r}; this server serves {served.name!r}")
    if version is not None and version != served.version:
        s = repo.versions.get(version)
        detail = f" (version {version} is {s['state']}: {reason_for_caller(s['reason'])})" if s else ""
        raise refused(404, f"model {name!r} version {version!r} is not served; "
                      f"version {served.version} answers{detail}")
    return served


@bp.get("")
def server_metadata():
    return jsonify({"name": "torchferry", "version": server_version(), "extensions": EXTENSIONS})


@bp.get("/health/live")
def live():
    return jsonify({"live": True})


@bp.get("/health/ready")
def ready():
    if state().repo.active is None:
        return jsonify({"ready": False, "error": reason_for_caller()}), 503
    return jsonify({"ready": True})


@bp.get("/models/<name>")
@bp.get("/models/<name>/versions/<version>")
def metadata(name: str, version: str | None = None):
    return jsonify(model_metadata(_served(name, version), versions_for_caller()))


@bp.get("/models/<name>/ready")
@bp.get("/models/<name>/versions/<version>/ready")
def model_ready(name: str, version: str | None = None):
    served = _served(name, version)
    return jsonify({"name": served.name, "version": served.version, "ready": True})


@bp.post("/models/<name>/infer")
@bp.post("/models/<name>/versions/<version>/infer")
def infer(name: str, version: str | None = None):
    served, settings = _served(name, version), state().settings
    mimetype = request.mimetype or ""
    if mimetype.startswith(_NOT_A_TENSOR_BODY):
        raise refused(415, f"Content-Type {mimetype!r}: send the inference request JSON (application/json), "
                      "followed by binary tensors with Inference-Header-Content-Length; images go in a BYTES "
                      "input, or to /predict")
    body = decompress(request.get_data(cache=False), request.headers.get("Content-Encoding"),
                      settings.max_upload_bytes)
    req, binary = split_request(body, request.headers.get("Inference-Header-Content-Length"))
    if "id" in req and not isinstance(req["id"], str):
        raise refused(400, "'id' must be a string")
    outputs = requested_outputs(req, served)
    batch = input_batch(req, binary, served, served.max_items)
    logits = served.run(batch)
    count_images(int(batch.shape[0]))
    payload, headers = encode_response(req, served, logits, outputs)
    return Response(payload, status=200, headers=headers)
