"""Decoding an Open Inference Protocol v2 inference request (serve/v2.py has the routes).

The body: Content-Encoding undone within the upload limit, the JSON request split from binary tensor data
(`Inference-Header-Content-Length`), the one input turned into the model's float32 [N, C, H, W] batch (an
FP32 tensor, flat or nested or binary, or BYTES encoded images preprocessed as `/predict` does them), and
the outputs asked for. Every problem is an HTTPError with a 4xx status that says what to fix.
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
from http import HTTPStatus
from typing import Any

import numpy as np

from torchferry.serve.errors import HTTPError
from torchferry.serve.repository import Served
from torchferry.serve.tasks import check_json_containers, json_containers_limit

_SHM_KEYS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
# One encoded image (data, preprocessing spec, name for messages) as the model's float32 [C, H, W].
PrepareImage = Callable[[bytes, dict[str, Any], str], np.ndarray]


def refused(status: int, message: str) -> HTTPError:
    """A refusal under /v2, whose body carries the message alone; its code is the status's name."""
    return HTTPError(status, HTTPStatus(status).phrase.lower().replace(" ", "_"), message)


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
        raise refused(415, f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or none")
    gzip_body = "gzip" in encoding
    out, rest = [], body
    size = members = 0
    while True:
        members += 1
        if members > MAX_GZIP_MEMBERS:
            raise refused(400, f"the gzip body holds more than {MAX_GZIP_MEMBERS} members")
        inflater = zlib.decompressobj(wbits=31 if gzip_body else 15)
        try:
            part = inflater.decompress(rest, limit + 1 - size)
        except zlib.error as exc:
            where = f" (member {members})" if members > 1 else ""
            raise refused(400, f"the {encoding} body does not decompress{where}: {exc}") from None
        size += len(part)
        out.append(part)
        if size > limit:
            raise refused(413, f"the body decompresses to more than the limit of {limit} bytes")
        if not inflater.eof:
            raise refused(400, f"the {encoding} body is truncated")
        rest = inflater.unused_data
        if not rest:
            return b"".join(out)
        if not gzip_body:
            raise refused(400, f"the deflate body has {len(rest)} bytes after its end")
        if not rest.startswith(b"\x1f\x8b"):
            raise refused(400, f"the gzip body has {len(rest)} bytes after its last member that are not a gzip member")


def _reject_constant(name: str) -> float:
    raise refused(400, f"{name} is not a number the request may carry")


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
            raise refused(
                400,
                f"Inference-Header-Content-Length {header_length!r} must be an integer from 0 to "
                f"the body's length ({len(body)})",
            )
        head, binary = body[:n], body[n:]
    if not head.strip():
        raise refused(400, "empty request: send the inference request JSON object")
    try:
        check_json_containers(head, json_containers_limit())
    except HTTPError as exc:
        raise refused(exc.status, exc.message) from None
    try:
        request = json.loads(head, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # the HTTPError of _reject_constant passes through
        raise refused(400, f"the inference request is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise refused(400, "the inference request must be a JSON object with 'inputs'")
    return request, binary


def _params(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):  # [] or 0 too: a client that sent something meant something
        raise refused(400, f"{where}: 'parameters' must be an object")
    if any(k in params for k in _SHM_KEYS):
        raise refused(400, f"{where}: shared memory is not supported by this server")
    return params


def _shape(inp: dict[str, Any], name: str) -> list[int]:
    shape = inp.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise refused(400, f"input {name!r}: 'shape' must be a list of non-negative integers")
    return shape


def flat_values(data: Any) -> list[Any]:
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
    inp: dict[str, Any], shape: list[int], raw: bytes | None, model_shape: list[Any], max_images: int
) -> np.ndarray:
    name = inp["name"]
    one = list(model_shape[1:])
    if len(shape) != len(model_shape) or shape[1:] != one:
        raise refused(400, f"input {name!r}: shape {shape} does not match the model's "
                      f"[{', '.join(map(str, [-1, *one]))}]")
    _batch_size(shape[0], max_images)
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != 4 * count:
            raise refused(400, f"input {name!r}: {len(raw)} bytes of binary data; FP32 {shape} takes {4 * count}")
        x = np.frombuffer(raw, dtype="<f4").astype(np.float32, copy=True).reshape(shape)
    else:
        values = flat_values(inp["data"])
        if len(values) != count:
            raise refused(400, f"input {name!r}: {len(values)} values for shape {shape}, which holds {count}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise refused(400, f"input {name!r}: FP32 data must be numbers")
        try:
            x = np.asarray(values, dtype=np.float32).reshape(shape)
        except OverflowError:  # a JSON integer beyond float's range (10**400) reaches numpy as a Python int
            raise refused(400, f"input {name!r}: a value is too large for FP32") from None
    if not np.isfinite(x).all():
        raise refused(400, f"input {name!r}: the tensor holds NaN or infinite values")
    return x


def _batch_size(n: int, max_items: int, noun: str = "images") -> None:
    if n < 1:
        raise refused(400, "the batch is empty: the first dimension must be at least 1")
    if n > max_items:
        raise refused(413, f"{n} {noun} in one request; the limit is {max_items}")


def bytes_elements(raw: bytes, count: int, name: str) -> list[bytes]:
    """BYTES binary data: each element a 4-byte little-endian length, then that many bytes."""
    out, offset = [], 0
    while offset < len(raw) and len(out) < count:
        if offset + 4 > len(raw):
            break
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise refused(400, f"input {name!r}: element {len(out)} claims {size} bytes beyond the binary data")
        out.append(raw[offset : offset + size])
        offset += size
    if len(out) != count or offset != len(raw):
        raise refused(400, f"input {name!r}: the binary data does not hold exactly {count} length-prefixed elements")
    return out


def bytes_input(inp: dict[str, Any], shape: list[int], raw: bytes | None, max_items: int, noun: str) -> list[Any]:
    """The N elements of a BYTES input of shape [N] or [N, 1], 1 <= N <= max_items (`noun` names them in messages):
    bytes from the binary tensor data, else the JSON values as sent (the task reads them)."""
    name = inp["name"]
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise refused(400, f"input {name!r}: BYTES {noun} take shape [N] or [N, 1], got {shape}")
    _batch_size(shape[0], max_items, noun)
    if raw is not None:
        return bytes_elements(raw, shape[0], name)
    values = flat_values(inp["data"])
    if len(values) != shape[0]:
        raise refused(400, f"input {name!r}: {len(values)} elements for shape {shape}")
    return values


def int64_input(inp: dict[str, Any], shape: list[int], raw: bytes | None, model_shape: list[int], high: int,
                max_items: int, noun: str = "texts") -> np.ndarray:
    """An INT64 tensor [N, *model_shape] of token ids, each from 0 to high - 1 (JSON data or binary); N counts
    `noun` in the 413 message."""
    name = inp["name"]
    want = [-1, *model_shape]
    if len(shape) != len(want) or shape[1:] != want[1:]:
        raise refused(400, f"input {name!r}: INT64 shape {shape}; the model takes {want}")
    _batch_size(shape[0], max_items, noun)
    if raw is None:
        values = flat_values(inp["data"])
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < high for v in values):
            raise refused(400, f"input {name!r}: INT64 data must be token ids from 0 to {high - 1}")
        raw = struct.pack(f"<{len(values)}q", *values)
    if len(raw) != 8 * math.prod(shape):
        raise refused(400, f"input {name!r}: {len(raw) // 8} INT64 values for shape {shape}")
    ids = np.frombuffer(raw, dtype="<i8").astype(np.int64).reshape(shape)
    if ids.min() < 0 or ids.max() >= high:
        raise refused(400, f"input {name!r}: INT64 data must be token ids from 0 to {high - 1}")
    return ids


def images_input(
    inp: dict[str, Any], shape: list[int], raw: bytes | None, spec: dict[str, Any], max_images: int,
    prepare_image: PrepareImage,
) -> np.ndarray:
    """BYTES [N] of encoded images as the model's float32 [N, C, H, W], each prepared as /predict does."""
    name = inp["name"]
    blobs = []
    for i, value in enumerate(bytes_input(inp, shape, raw, max_images, "images")):
        if isinstance(value, bytes):
            blobs.append(value)
            continue
        if not isinstance(value, str):
            raise refused(400, f"input {name!r}: element {i} must be a base64 string in JSON")
        try:
            blobs.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            raise refused(
                400,
                f"input {name!r}: element {i} is not base64 (JSON BYTES images are base64; "
                "send raw bytes with the binary tensor data extension)",
            ) from None
    # Refused images raise HTTPError (400/413/415) as on /predict; under /v2 the body takes the protocol's shape.
    return np.stack([prepare_image(b, spec, f"{name}[{i}]") for i, b in enumerate(blobs)])


def input_batch(request: dict[str, Any], binary: bytes, served: Served, max_images: int) -> np.ndarray:
    """The model's batch from the request's one input: the model's own FP32 tensor, or another datatype its task
    takes (`ServeTask.v2_input`: BYTES encoded images for an image classifier)."""
    predictor = served.predictor
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, dict) for i in inputs):
        raise refused(400, "'inputs' must be a non-empty list of tensor objects")
    if len(inputs) != 1:
        raise refused(400, f"{len(inputs)} inputs; the model takes one, {predictor.input_name!r}")
    inp = inputs[0]
    name = inp.get("name")
    if name != predictor.input_name:
        raise refused(400, f"unknown input {name!r}; the model's input is {predictor.input_name!r}")
    shape = _shape(inp, name)
    params = _params(inp, f"input {name!r}")
    size = params.get("binary_data_size")
    raw = None
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise refused(400, f"input {name!r}: binary_data_size must be a non-negative integer")
        if "data" in inp:
            raise refused(400, f"input {name!r}: give 'data' or binary_data_size, not both")
        if size != len(binary):
            raise refused(400, f"input {name!r}: binary_data_size is {size} but {len(binary)} bytes follow the JSON")
        raw = binary
    elif "data" not in inp:
        raise refused(400, f"input {name!r} has no 'data' and no binary_data_size")
    elif binary:
        raise refused(400, f"{len(binary)} bytes of binary data follow the JSON, but no input claims them")
    datatype = inp.get("datatype")
    info = predictor.info
    if datatype == "FP32" and predictor.task.v2_datatype == "FP32":
        return _fp32(inp, shape, raw, info.input_shape, max_images)
    if datatype in ("FP32", "BYTES", "INT64"):
        return predictor.task.v2_input(datatype, inp, shape, raw, info, max_images)
    raise refused(400, f"input {name!r}: datatype {str(datatype)[:20]!r}; send FP32 tensors (preprocessed) or "
                  "BYTES (encoded images)" if predictor.task.name == "image" else
                  f"input {name!r}: datatype {str(datatype)[:20]!r}; send {predictor.task.v2_datatype}")


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
        raise refused(400, "request parameter binary_data_output must be true or false")
    output_name = served.predictor.output_name
    outputs = request.get("outputs")
    if outputs is None:
        return [OutputRequest(output_name, 0, default_binary)]
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise refused(400, "'outputs' must be a list of objects")
    num_classes = len(served.predictor.info.classes)
    out, seen = [], set()
    for o in outputs:
        name = o.get("name")
        if name != output_name:
            raise refused(400, f"unknown output {name!r}; the model's output is {output_name!r}")
        if name in seen:
            raise refused(400, f"output {name!r} is requested twice")
        seen.add(name)
        p = _params(o, f"output {name!r}")
        k = p.get("classification", 0)
        if k and not served.predictor.task.classifier:
            raise refused(400, f"output {name!r}: classification is for classifiers; this model is a "
                          f"{served.predictor.task.name} regression")
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= num_classes:
            raise refused(400, f"output {name!r}: classification must be an integer from 1 to {num_classes}")
        binary = p.get("binary_data", default_binary)
        if not isinstance(binary, bool):
            raise refused(400, f"output {name!r}: binary_data must be true or false")
        out.append(OutputRequest(name, k, binary))
    return out
