"""The server's own routes (`/healthz`, `/readyz`, `/metadata`, `/metrics`, `POST /predict`) and what runs
around every request of the app: its timer, the bearer token, a chunked body's limit, its metrics and its
one JSON access line. The Open Inference Protocol routes are in serve/v2.py.
"""

from __future__ import annotations

import io
import json
import time

from flask import Blueprint, Response, g, jsonify, request

from torchferry.serve import accesslog
from torchferry.serve.auth import EXEMPT_PATHS, BearerAuth
from torchferry.serve.errors import HTTPError
from torchferry.serve.repository import Served
from torchferry.serve.state import count_images, reason_for_caller, state, versions_for_caller

bp = Blueprint("torchferry", __name__)


@bp.before_app_request
def _before_request() -> None:
    """What runs before every route, in order: the timer, the bearer token, a chunked body's limit. One hook, not
    three: Flask checks each hook for a coroutine and looks up the app's state for each, on every request."""
    g.start = time.perf_counter()
    server = state()
    if server.auth.enabled:
        _authenticate(server.auth)
    read_chunked_body(server.settings.max_upload_bytes)


def _authenticate(auth: BearerAuth) -> None:
    header = request.headers.get("Authorization")
    if request.path in EXEMPT_PATHS:  # probes answer anyone; a valid token still shows whole reasons
        g.authenticated = header is not None and auth.check(header) is None
        return
    problem = auth.check(header)
    if problem is not None:
        raise HTTPError(401, "unauthorized", problem[1], {"WWW-Authenticate": auth.challenge(problem[0])})
    g.authenticated = True


@bp.after_app_request
def _observe(response: Response) -> Response:
    route = request.url_rule.rule if request.url_rule else "unmatched"
    seconds = time.perf_counter() - g.get("start", time.perf_counter())
    state().metrics.observe_request(route, response.status_code, seconds)
    if accesslog.enabled():
        accesslog.line((request.method, route, response.status_code, seconds, g.get("images", 0),
                        request.content_length or 0))
    return response


def read_chunked_body(limit: int) -> None:
    """A body sent without Content-Length (chunked): read up to `limit` + 1 bytes; past the limit it is a 413.

    Werkzeug would stop reading at the limit and hand on a cut body (then refused as a truncated image);
    here the body is read whole or refused, and the request carries it with its length, as if it had been
    sent with a Content-Length.
    """
    env = request.environ
    if request.content_length is not None or "wsgi.input_terminated" not in env:
        return
    if "chunked" not in env.get("HTTP_TRANSFER_ENCODING", "").lower():
        return
    stream, parts, size = env["wsgi.input"], [], 0
    while size <= limit:
        part = stream.read(min(64 * 1024, limit + 1 - size))
        if not part:
            break
        parts.append(part)
        size += len(part)
    if size > limit:
        raise HTTPError(413, "request_entity_too_large", f"the body is larger than the limit of {limit} bytes")
    body = b"".join(parts)
    env["wsgi.input"], env["CONTENT_LENGTH"] = io.BytesIO(body), str(len(body))
    del env["wsgi.input_terminated"], env["HTTP_TRANSFER_ENCODING"]


def serving() -> Served:
    """The model that answers this request (read once: a swap mid-request does not touch it), or a 503."""
    served = state().repo.active
    if served is None:
        raise HTTPError(503, "not_ready", reason_for_caller())
    return served


@bp.get("/healthz")
def healthz():
    served = state().repo.active  # where ONNX Runtime runs the model: the device asked for, the providers got
    return jsonify({"status": "ok", "device": state().repo.device,
                    "providers": served.predictor.providers if served else None})


@bp.get("/readyz")
def readyz():
    served = state().repo.active
    state().metrics.set_ready(served is not None)
    if served:
        return jsonify({"status": "ready", "model": served.name, "version": served.version, **served.proof})
    return jsonify({"status": "not_ready", "reason": reason_for_caller()}), 503


@bp.get("/metadata")
def metadata():
    served = serving()
    info = served.predictor.info
    meta = info.metadata
    return jsonify({"name": served.name, "version": served.version, "model_versions": versions_for_caller(),
                    "task": info.task, **{k: v for k, v in info.spec.items() if k not in ("classes", "preprocess") and not k.startswith("_")},
                    "classes": info.classes, "input_shape": info.input_shape, "input": served.predictor.input_name,
                    "output": served.predictor.output_name, "preprocess": info.preprocess, "sha256": info.sha256,
                    "arch": meta.get("arch"), "val_acc": meta.get("val_acc"),
                    "checkpoint_sha256": meta.get("checkpoint_sha256"), "exporter": meta.get("exporter"),
                    "versions": {**(meta.get("versions") or {}), "torchferry": meta.get("torchferry_version")},
                    "max_items_per_request": served.max_items,
                    "ready": True, "proof": served.proof})


@bp.get("/metrics")
def prometheus():
    state().metrics.set_ready(state().repo.ready)
    body, content_type = state().metrics.exposition()
    return Response(body, mimetype=content_type)


@bp.post("/predict")
def predict():
    served, settings = serving(), state().settings
    predictor = served.predictor
    batch, render = predictor.task.predict_batch(predictor.info, served.max_items, settings.top_k)
    g.images = len(batch)
    outputs = served.run(batch)
    count_images(len(batch))
    # What jsonify writes, less its sort of every key (the answer keeps the order docs/design.md gives): inside a
    # request under load, jsonify took 43 µs of the answer's path.
    body = json.dumps({"predictions": render(outputs), "model": served.answer_model}, separators=(",", ":"))
    return Response(body + "\n", mimetype="application/json")
