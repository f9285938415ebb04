"""The Open Inference Protocol v2 over REST (KServe v2 / Triton HTTP) for the served classifier.

Routes: `GET /v2`, `/v2/health/live`, `/v2/health/ready`, `/v2/models/<name>[/versions/<v>]`,
`.../ready`, `POST .../infer`. Extensions: `binary_tensor_data` (tensors after the JSON header, whose length
is in `Inference-Header-Content-Length`: what tritonclient sends and asks for by default) and
`classification` (`"parameters": {"classification": k}` on the `logits` output: BYTES `[N, k]` of
"logit:index:label").

The one input takes either an FP32 tensor `[N, C, H, W]` already preprocessed (`data` flat or nested, or
binary) or a BYTES tensor `[N]` of encoded images (JPEG, PNG, ...), decoded and preprocessed exactly as
`/predict` does them. In binary form BYTES elements are the raw file bytes; in JSON, where elements are
strings, each is the image's base64. Errors are `{"error": "..."}` with a 4xx status.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flask import Blueprint, Response, g, jsonify, request

from torchferry.serve.images import PixelBudget, prepare
from torchferry.serve.repository import ModelRepository, Served

PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["binary_tensor_data", "classification"]
_SHM_KEYS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


class V2Error(Exception):
    """A request refused with `{"error": message}` and an HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Limits:
    """The same limits as /predict: images (or tensor rows) per request, pixels per image, body bytes."""

    max_images: int
    max_pixels: int
    max_body: int
    budget: PixelBudget | None = None


# Members in one gzip body: RFC 1952 allows several, concatenated; each costs a decompressor.
MAX_GZIP_MEMBERS = 64


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The request body after its Content-Encoding (gzip, deflate), never inflated beyond `limit` bytes.

    A gzip body may hold several members (RFC 1952 §2.2, what `cat a.gz b.gz` makes): they are decoded in
    turn, up to MAX_GZIP_MEMBERS, as `gzip.decompress` does; bytes after the last member that start no
    member are refused, as is anything after a deflate stream.
    """
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise V2Error(415, f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or none")
    gzip_body = "gzip" in encoding
    out, rest = [], body
    size = members = 0
    while True:
        members += 1
        if members > MAX_GZIP_MEMBERS:
            raise V2Error(400, f"the gzip body holds more than {MAX_GZIP_MEMBERS} members")
        inflater = zlib.decompressobj(wbits=31 if gzip_body else 15)
        try:
            part = inflater.decompress(rest, limit + 1 - size)
        except zlib.error as exc:
            where = f" (member {members})" if members > 1 else ""
            raise V2Error(400, f"the {encoding} body does not decompress{where}: {exc}") from None
        size += len(part)
        out.append(part)
        if size > limit:
            raise V2Error(413, f"the body decompresses to more than the limit of {limit} bytes")
        if not inflater.eof:
            raise V2Error(400, f"the {encoding} body is truncated")
        rest = inflater.unused_data
        if not rest:
            return b"".join(out)
        if not gzip_body:
            raise V2Error(400, f"the deflate body has {len(rest)} bytes after its end")
        if not rest.startswith(b"\x1f\x8b"):
            raise V2Error(400, f"the gzip body has {len(rest)} bytes after its last member that are not a gzip member")


def _reason(repo: ModelRepository, text: str | None = None) -> str:
    """Why the model (or a version) is not ready: paths only for a caller with the token (g.authenticated)."""
    text = repo.reason if text is None else text
    return text if g.get("authenticated") else repo.public(text)


def _reject_constant(name: str) -> float:
    raise V2Error(400, f"{name} is not a number the request may carry")


def split_request(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON inference request and the binary tensor data after it."""
    if header_length is None:
        head, binary = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 <= n <= len(body):
            raise V2Error(
                400,
                f"Inference-Header-Content-Length {header_length!r} must be an integer from 0 to "
                f"the body's length ({len(body)})",
            )
        head, binary = body[:n], body[n:]
    if not head.strip():
        raise V2Error(400, "empty request: send the inference request JSON object")
    try:
        request = json.loads(head, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # V2Error from _reject_constant passes through
        raise V2Error(400, f"the inference request is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise V2Error(400, "the inference request must be a JSON object with 'inputs'")
    return request, binary


def _params(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):  # [] or 0 too: a client that sent something meant something
        raise V2Error(400, f"{where}: 'parameters' must be an object")
    if any(k in params for k in _SHM_KEYS):
        raise V2Error(400, f"{where}: shared memory is not supported by this server")
    return params


def _shape(inp: dict[str, Any], name: str) -> list[int]:
    shape = inp.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise V2Error(400, f"input {name!r}: 'shape' must be a list of non-negative integers")
    return shape


def _flatten(data: Any) -> list[Any]:
    """Tensor data flat or nested (row-major), as the protocol allows, as one flat list."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:  # iterative: a deeply nested body cannot exhaust the recursion limit
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _fp32(
    inp: dict[str, Any], shape: list[int], raw: bytes | None, model_shape: list[int], limits: Limits
) -> np.ndarray:
    name = inp["name"]
    c, h, w = model_shape[1:]
    if len(shape) != 4 or shape[1:] != [c, h, w]:
        raise V2Error(400, f"input {name!r}: shape {shape} does not match the model's [-1, {c}, {h}, {w}]")
    _batch_size(shape[0], limits)
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != 4 * count:
            raise V2Error(400, f"input {name!r}: {len(raw)} bytes of binary data; FP32 {shape} takes {4 * count}")
        x = np.frombuffer(raw, dtype="<f4").astype(np.float32, copy=True).reshape(shape)
    else:
        values = _flatten(inp["data"])
        if len(values) != count:
            raise V2Error(400, f"input {name!r}: {len(values)} values for shape {shape}, which holds {count}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise V2Error(400, f"input {name!r}: FP32 data must be numbers")
        try:
            x = np.asarray(values, dtype=np.float32).reshape(shape)
        except OverflowError:  # a JSON integer beyond float's range (10**400) reaches numpy as a Python int
            raise V2Error(400, f"input {name!r}: a value is too large for FP32") from None
    if not np.isfinite(x).all():
        raise V2Error(400, f"input {name!r}: the tensor holds NaN or infinite values")
    return x


def _batch_size(n: int, limits: Limits) -> None:
    if n < 1:
        raise V2Error(400, "the batch is empty: the first dimension must be at least 1")
    if n > limits.max_images:
        raise V2Error(413, f"{n} images in one request; the limit is {limits.max_images}")


def _bytes_elements(raw: bytes, count: int, name: str) -> list[bytes]:
    """BYTES binary data: each element a 4-byte little-endian length, then that many bytes."""
    out, offset = [], 0
    while offset < len(raw) and len(out) < count:
        if offset + 4 > len(raw):
            break
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise V2Error(400, f"input {name!r}: element {len(out)} claims {size} bytes beyond the binary data")
        out.append(raw[offset : offset + size])
        offset += size
    if len(out) != count or offset != len(raw):
        raise V2Error(400, f"input {name!r}: the binary data does not hold exactly {count} length-prefixed elements")
    return out


def _images(
    inp: dict[str, Any], shape: list[int], raw: bytes | None, spec: dict[str, Any], limits: Limits
) -> np.ndarray:
    name = inp["name"]
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise V2Error(400, f"input {name!r}: BYTES images take shape [N] or [N, 1], got {shape}")
    _batch_size(shape[0], limits)
    if raw is not None:
        blobs = _bytes_elements(raw, shape[0], name)
    else:
        values = _flatten(inp["data"])
        if len(values) != shape[0]:
            raise V2Error(400, f"input {name!r}: {len(values)} elements for shape {shape}")
        blobs = []
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise V2Error(400, f"input {name!r}: element {i} must be a base64 string in JSON")
            try:
                blobs.append(base64.b64decode(value, validate=True))
            except (binascii.Error, ValueError):
                raise V2Error(
                    400,
                    f"input {name!r}: element {i} is not base64 (JSON BYTES images are base64; "
                    "send raw bytes with the binary tensor data extension)",
                ) from None
    # decode() raises ImageError (400/413/415) with the same codes as /predict; the app turns it into v2's shape.
    return np.stack([prepare(b, spec, limits.max_pixels, f"{name}[{i}]", limits.budget) for i, b in enumerate(blobs)])


def input_batch(request: dict[str, Any], binary: bytes, served: Served, limits: Limits) -> np.ndarray:
    """The model's float32 [N, C, H, W] batch from the request's one input (FP32 tensor or BYTES images)."""
    predictor = served.predictor
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, dict) for i in inputs):
        raise V2Error(400, "'inputs' must be a non-empty list of tensor objects")
    if len(inputs) != 1:
        raise V2Error(400, f"{len(inputs)} inputs; the model takes one, {predictor.input_name!r}")
    inp = inputs[0]
    name = inp.get("name")
    if name != predictor.input_name:
        raise V2Error(400, f"unknown input {name!r}; the model's input is {predictor.input_name!r}")
    shape = _shape(inp, name)
    params = _params(inp, f"input {name!r}")
    size = params.get("binary_data_size")
    raw = None
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise V2Error(400, f"input {name!r}: binary_data_size must be a non-negative integer")
        if "data" in inp:
            raise V2Error(400, f"input {name!r}: give 'data' or binary_data_size, not both")
        if size != len(binary):
            raise V2Error(400, f"input {name!r}: binary_data_size is {size} but {len(binary)} bytes follow the JSON")
        raw = binary
    elif "data" not in inp:
        raise V2Error(400, f"input {name!r} has no 'data' and no binary_data_size")
    elif binary:
        raise V2Error(400, f"{len(binary)} bytes of binary data follow the JSON, but no input claims them")
    datatype = inp.get("datatype")
    info = predictor.info
    if datatype == "FP32":
        return _fp32(inp, shape, raw, info.input_shape, limits)
    if datatype == "BYTES":
        return _images(inp, shape, raw, info.preprocess, limits)
    raise V2Error(
        400, f"input {name!r}: datatype {datatype!r}; send FP32 tensors (preprocessed) or BYTES (encoded images)"
    )


@dataclass
class OutputRequest:
    """One requested output: its name, classification count (0: the raw tensor), binary or JSON."""

    name: str
    classification: int
    binary: bool


def requested_outputs(request: dict[str, Any], served: Served) -> list[OutputRequest]:
    """What the request asks for; by default every output, binary when `binary_data_output` says so."""
    params = _params(request, "request")
    default_binary = params.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise V2Error(400, "request parameter binary_data_output must be true or false")
    output_name = served.predictor.output_name
    outputs = request.get("outputs")
    if outputs is None:
        return [OutputRequest(output_name, 0, default_binary)]
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise V2Error(400, "'outputs' must be a list of objects")
    num_classes = len(served.predictor.info.classes)
    out, seen = [], set()
    for o in outputs:
        name = o.get("name")
        if name != output_name:
            raise V2Error(400, f"unknown output {name!r}; the model's output is {output_name!r}")
        if name in seen:
            raise V2Error(400, f"output {name!r} is requested twice")
        seen.add(name)
        p = _params(o, f"output {name!r}")
        k = p.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= num_classes:
            raise V2Error(400, f"output {name!r}: classification must be an integer from 1 to {num_classes}")
        binary = p.get("binary_data", default_binary)
        if not isinstance(binary, bool):
            raise V2Error(400, f"output {name!r}: binary_data must be true or false")
        out.append(OutputRequest(name, k, binary))
    return out


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
    info = served.predictor.info
    _, c, h, w = info.input_shape
    return {
        "name": served.name,
        "versions": [served.version],
        "platform": PLATFORM,
        "inputs": [{"name": served.predictor.input_name, "datatype": "FP32", "shape": [-1, c, h, w]}],
        "outputs": [{"name": served.predictor.output_name, "datatype": "FP32", "shape": [-1, len(info.classes)]}],
        # Beyond the spec's fields (clients ignore them): what answers, what was refused, how to send images.
        "parameters": {
            "version": served.version,
            "sha256": info.sha256,
            "classes": info.classes,
            "image_input": f"{served.predictor.input_name!r} also takes BYTES [-1] of encoded images "
            "(raw with binary_tensor_data, base64 in JSON)",
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


def _served(repo: ModelRepository, name: str, version: str | None) -> Served:
    served = repo.active
    if served is None:
        raise V2Error(503, f"the model is not ready: {_reason(repo)}")
    if name != served.name:
        raise V2Error(404, f"unknown model {name!r}; this server serves {served.name!r}")
    if version is not None and version != served.version:
        state = repo.versions.get(version)
        detail = f" (version {version} is {state['state']}: {_reason(repo, state['reason'])})" if state else ""
        raise V2Error(
            404, f"model {name!r} version {version!r} is not served; version {served.version} answers{detail}"
        )
    return served


# Bodies meant for /predict. Any other type is read as the JSON request, as Triton does: `curl -d` labels
# JSON application/x-www-form-urlencoded, and tritonclient sends no type at all.
_NOT_A_TENSOR_BODY = ("multipart/", "image/")


def v2_blueprint(repo: ModelRepository, limits: Limits, count_images: Callable[[int], None]) -> Blueprint:
    """The /v2 routes over `repo`'s served model; `count_images(n)` records a batch in the metrics."""
    bp = Blueprint("v2", __name__, url_prefix="/v2")

    @bp.get("")
    def server_metadata():
        return jsonify({"name": "torchferry", "version": server_version(), "extensions": EXTENSIONS})

    @bp.get("/health/live")
    def live():
        return jsonify({"live": True})

    @bp.get("/health/ready")
    def ready():
        if repo.active is None:
            return jsonify({"ready": False, "error": _reason(repo)}), 503
        return jsonify({"ready": True})

    @bp.get("/models/<name>")
    @bp.get("/models/<name>/versions/<version>")
    def metadata(name: str, version: str | None = None):
        versions = repo.versions if g.get("authenticated") else repo.public_versions()
        return jsonify(model_metadata(_served(repo, name, version), versions))

    @bp.get("/models/<name>/ready")
    @bp.get("/models/<name>/versions/<version>/ready")
    def model_ready(name: str, version: str | None = None):
        served = _served(repo, name, version)
        return jsonify({"name": served.name, "version": served.version, "ready": True})

    @bp.post("/models/<name>/infer")
    @bp.post("/models/<name>/versions/<version>/infer")
    def infer(name: str, version: str | None = None):
        served = _served(repo, name, version)
        mimetype = request.mimetype or ""
        if mimetype.startswith(_NOT_A_TENSOR_BODY):
            raise V2Error(
                415,
                f"Content-Type {mimetype!r}: send the inference request JSON (application/json), "
                "followed by binary tensors with Inference-Header-Content-Length; images go in a BYTES "
                "input, or to /predict",
            )
        body = decompress(request.get_data(cache=False), request.headers.get("Content-Encoding"), limits.max_body)
        req, binary = split_request(body, request.headers.get("Inference-Header-Content-Length"))
        if "id" in req and not isinstance(req["id"], str):
            raise V2Error(400, "'id' must be a string")
        outputs = requested_outputs(req, served)
        batch = input_batch(req, binary, served, limits)
        logits = served.run(batch)
        count_images(int(batch.shape[0]))
        payload, headers = encode_response(req, served, logits, outputs)
        return Response(payload, status=200, headers=headers)

    return bp
