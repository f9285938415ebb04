"""What a task is to the server (torch-free): the metadata it needs, the graph it expects, how `/predict` and
`/v2` requests become the model's input and how its outputs are answered.

The predictor reads the model file's `task` (`torchferry.contract.task_of`: an image classifier when the file
records none) and keeps its `ServeTask`; the routes ask it, so they know no task. `serve_task(name)` finds it;
docs/design.md lists what each task provides.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from flask import request

from torchferry.contract import ContractError, classes_problem, preprocess_problems, registered
from torchferry.serve.errors import HTTPError

# One request's answer: the model's outputs → the per-row predictions of /predict.
Render = Callable[[np.ndarray], list[dict[str, Any]]]


class ServeTask:
    """The interface: every method raises until a task defines it."""

    name = ""
    input_type = "tensor(float)"  # the graph's input element type
    v2_datatype = "FP32"          # the /v2 datatype of that input
    classifier = True             # outputs one logit per class (top-k, /v2 classification)

    def read_spec(self, meta: dict[str, Any]) -> dict[str, Any]:
        """The task's part of the file's metadata, every value checked (ContractError says what is wrong)."""
        raise NotImplementedError

    def classes(self, spec: dict[str, Any]) -> list[str]:
        """The class names, in output order (none for a regression)."""
        return []

    def input_shape(self, spec: dict[str, Any]) -> list[int]:
        """One input's shape without the batch ([C, H, W], [F])."""
        raise NotImplementedError

    def output_columns(self, spec: dict[str, Any]) -> int:
        """The output's columns (one per class; one per target)."""
        raise NotImplementedError

    def predict_batch(self, info: Any, max_items: int, top_k: int) -> tuple[np.ndarray, Render]:
        """`POST /predict`: the request (Flask's) as the model's batch, and how to answer its outputs; every
        problem an HTTPError with a 4xx status."""
        raise NotImplementedError

    def v2_input(self, datatype: Any, inp: dict[str, Any], shape: list[int], raw: bytes | None, info: Any,
                 max_items: int) -> np.ndarray:
        """A /v2 input in another datatype than the model's own tensor (BYTES images, texts); a 400 when the
        task takes none."""
        from torchferry.serve.v2_request import refused

        raise refused(400, f"input {inp.get('name')!r}: datatype {str(datatype)[:20]!r}; send {self.v2_datatype} "
                      f"{['N', *self.input_shape(info.spec)]}")

    def v2_note(self, input_name: str, spec: dict[str, Any]) -> dict[str, Any]:
        """What /v2 model metadata adds about the input beyond the protocol's fields."""
        return {}


class ImageServeTask(ServeTask):
    """An image classifier: encoded images (or preprocessed FP32 [N, C, H, W]) in, top-k classes out."""

    name = "image"

    def read_spec(self, meta: dict[str, Any]) -> dict[str, Any]:
        checked_classes(meta, "preprocess")
        for problem in preprocess_problems(meta["preprocess"]):
            raise ContractError(f"metadata {problem}")
        return {"classes": list(meta["classes"]), "preprocess": dict(meta["preprocess"])}

    def classes(self, spec: dict[str, Any]) -> list[str]:
        return spec["classes"]

    def input_shape(self, spec: dict[str, Any]) -> list[int]:
        pre = spec["preprocess"]
        return [int(pre["channels"]), *(int(v) for v in pre["size"])]

    def output_columns(self, spec: dict[str, Any]) -> int:
        return len(spec["classes"])

    def predict_batch(self, info: Any, max_items: int, top_k: int) -> tuple[np.ndarray, Render]:
        from torchferry.serve.state import state

        k = top_k_param(top_k, len(info.classes))
        images = _collect_images(max_items)
        batch = np.stack([state().prepare(data, info.preprocess, name) for name, data in images])
        return batch, lambda logits: top_k_answers(logits, info.classes, k)

    def v2_input(self, datatype: Any, inp: dict[str, Any], shape: list[int], raw: bytes | None, info: Any,
                 max_items: int) -> np.ndarray:
        from torchferry.serve.state import state
        from torchferry.serve.v2_request import images_input

        if datatype != "BYTES":
            return super().v2_input(datatype, inp, shape, raw, info, max_items)
        return images_input(inp, shape, raw, info.preprocess, max_items, state().prepare)

    def v2_note(self, input_name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {"image_input": f"{input_name!r} also takes BYTES [-1] of encoded images (raw with "
                "binary_tensor_data, base64 in JSON)"}


# A JSON string, escapes included: what is left out when the containers of a body are counted.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def json_containers_limit() -> int:
    """The objects and arrays a JSON body may hold: one per 16 bytes of the upload limit (a parsed `{}` costs ~70
    bytes for its 3 of text: 16 MiB of them took 404 MiB to parse), at least 65,536."""
    from flask import has_app_context

    from torchferry.serve.settings import ServeSettings
    from torchferry.serve.state import state

    upload = state().settings.max_upload_bytes if has_app_context() else ServeSettings.max_upload_bytes
    return max(65_536, upload // 16)


def check_json_containers(body: bytes, limit: int) -> None:
    """HTTPError 413 when `body` holds more than `limit` JSON objects and arrays, counted before it is parsed
    (brackets inside strings left out, which only a body with many brackets is scanned for)."""
    if body.count(b"{") + body.count(b"[") <= limit:
        return
    stripped = _JSON_STRING.sub(b"", body)
    count = stripped.count(b"{") + stripped.count(b"[")
    if count > limit:
        raise HTTPError(413, "too_many_json_values", f"the JSON body holds {count} objects and arrays; the limit "
                        f"is {limit}")


def _reject_constant(name: str) -> float:
    raise HTTPError(400, "bad_json", f"{name} is not a number a request may carry")


def json_field(body: bytes, field: str, *, code: str, empty: str, example: str) -> Any:
    """The value of `field` in a `/predict` body that must be a UTF-8 JSON object with that field alone (no NaN
    or Infinity, nesting no deeper than the parser allows); else an HTTPError: 400 `empty` for an empty body,
    `not_utf8`, `bad_json`, or `code` for another shape, the message showing `example`."""
    if not body.strip():
        raise HTTPError(400, empty, f"empty body: send JSON {example}")
    check_json_containers(body, json_containers_limit())
    try:
        decoded = body.decode("utf-8")  # bytes would let json.loads guess UTF-16 or UTF-32
    except UnicodeDecodeError as exc:
        raise HTTPError(400, "not_utf8", f"the body is not UTF-8 (byte {exc.start}): {exc.reason}") from None
    try:
        obj = json.loads(decoded, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # the HTTPError of _reject_constant passes through
        raise HTTPError(400, "bad_json", f"the body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(obj, dict) or field not in obj:
        raise HTTPError(400, code, f"send a JSON object {example}")
    extra = sorted(k for k in obj if k != field)
    if extra:
        raise HTTPError(400, code, f"unknown field(s) {extra[:5]!r}; the request holds {field!r} alone"[:300])
    return obj[field]


def checked_classes(meta: dict[str, Any], *keys: str) -> list[str]:
    """A classifier's `classes` from its metadata, checked, once `classes` and `keys` are seen to be there."""
    for key in ("classes", *keys):
        if key not in meta:
            raise ContractError(f"it lacks the '{key}' metadata of a torchferry export")
    problem = classes_problem(meta["classes"])
    if problem:
        raise ContractError(f"metadata {problem}")
    return list(meta["classes"])


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, stable for large logits."""
    z = logits.astype(np.float64)  # a copy: the steps below work in place on it
    z -= np.maximum.reduce(z, axis=1, keepdims=True)  # the ufuncs themselves: what z.max and z.sum call
    np.exp(z, out=z)
    z /= np.add.reduce(z, axis=1, keepdims=True)
    return z


def top_k_answers(logits: np.ndarray, classes: list[str], k: int) -> list[dict[str, Any]]:
    """Per row: the best label, its index and score, and the top `k` labels with scores."""
    probs = softmax(logits)
    k = min(k, probs.shape[1])
    results = []
    # Python lists from here: a handful of numbers per row, where numpy's per-call cost would dominate.
    for row, order in zip(probs.tolist(), np.argsort(-probs, axis=1, kind="stable")[:, :k].tolist()):
        top = [{"label": classes[i], "score": row[i]} for i in order]
        results.append({"label": top[0]["label"], "index": order[0], "score": top[0]["score"], "top_k": top})
    return results


def _collect_images(max_images: int) -> list[tuple[str, bytes]]:
    mimetype = request.mimetype or ""
    if mimetype == "multipart/form-data":
        files = [(f.filename or key, f) for key, f in request.files.items(multi=True)]
        if not files:
            raise HTTPError(400, "no_image", "the multipart body holds no file fields")
        if len(files) > max_images:
            raise HTTPError(413, "too_many_images", f"{len(files)} images in one request; the limit is {max_images}")
        return [(name, f.read()) for name, f in files]
    if mimetype.startswith("image/"):
        return [("body", request.get_data(cache=False))]
    raise HTTPError(415, "unsupported_media_type", f"Content-Type {mimetype or 'missing'!r}: send "
                    "multipart/form-data with image files, or a raw body with an image/* type")


def top_k_param(default: int, num_classes: int) -> int:
    # Most requests have no query at all: then the query's parse is skipped.
    raw = request.args.get("top_k") if request.environ.get("QUERY_STRING") else None
    if raw is None:
        return min(default, num_classes)
    try:
        k = int(raw)
    except ValueError:
        k = 0
    if not 1 <= k <= num_classes:
        raise HTTPError(400, "bad_top_k", f"top_k must be an integer from 1 to {num_classes}, got {raw!r}")
    return k


# name → "module:class"; the image task is here, the others in their own modules.
SERVE_TASKS = {
    "image": "torchferry.serve.tasks:ImageServeTask",
    "tabular": "torchferry.serve.tabular:TabularServeTask",
    "text": "torchferry.serve.text:TextServeTask",
}


def serve_task(name: str) -> ServeTask:
    """The ServeTask called `name`; ContractError when this server serves no such task."""
    cls = registered(SERVE_TASKS[name]) if name in SERVE_TASKS else None
    if cls is None:
        raise ContractError(f"task {str(name)[:40]!r} is not one this server serves ({', '.join(SERVE_TASKS)})")
    return cls()
