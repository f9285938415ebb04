"""The Flask application: `create_app()` serves one ONNX classifier over HTTP (DESIGN.md's HTTP table).

Configuration comes from defaults, then environment variables (TORCHFERRY_*), then the `config` mapping.
Nothing happens at import; the model loads in a background thread so that `/healthz` answers at once and
`/readyz` turns 200 only after the model loaded, matched its sha256 and reproduced its golden outputs.
Under gunicorn (`create_app({"LOAD_FIRST": True})`, serve/gunicorn.conf.py) the first load runs before the
factory returns, so a worker accepts no connection before its model is proven: a worker that starts or
restarts (after the OOM killer, say) never answers 503 beside ready ones. In both, the same thread later
swaps in newer versions (serve/repository.py) when asked (SIGHUP) or on a poll, in the background.
`/predict` and the Open Inference Protocol routes under `/v2` (serve/v2.py) answer from the same model.
Every client error is JSON with a 4xx status: `{"error": {"code", "message"}}`, or the protocol's
`{"error": "..."}` under `/v2`; nothing reaches a client as a stack trace, and the app never runs in
debug mode. With a token configured (serve/auth.py) every route but the probes needs it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from typing import Any

import numpy as np
from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from torchferry.serve.auth import EXEMPT_PATHS, BearerAuth
from torchferry.serve.images import ImageError, PixelBudget, prepare
from torchferry.serve.repository import ModelRepository, Served
from torchferry.serve.settings import ServeSettings, settings_from_env  # noqa: F401 - settings_from_env re-exported
from torchferry.serve.v2 import Limits, V2Error, v2_blueprint

_logger = logging.getLogger("torchferry.serve")
_access = logging.getLogger("torchferry.serve.access")

class ClientError(Exception):
    """A request the server refuses with a JSON 4xx."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(status: int, code: str, message: str) -> tuple[Response, int]:
    """The error shape: {"error": {"code", "message"}}; under /v2 the protocol's {"error": "message"}."""
    if request.path == "/v2" or request.path.startswith("/v2/"):
        return jsonify({"error": message}), status
    return jsonify({"error": {"code": code, "message": message}}), status


def reason_for_caller(repo: ModelRepository) -> str:
    """Why the model is not ready: whole for a caller with the token, without file system paths for others."""
    return repo.reason if g.get("authenticated") else repo.public(repo.reason)


def serving(repo: ModelRepository) -> Served:
    """The model that answers this request (read once: a swap mid-request does not touch it), or a 503."""
    served = repo.active
    if served is None:
        raise ClientError(503, "not_ready", reason_for_caller(repo))
    return served


def _metrics(app: Flask) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    registry = CollectorRegistry(auto_describe=True)
    return {
        "registry": registry,
        "requests": Counter("torchferry_requests_total", "HTTP requests by route and status", ["route", "status"],
                            registry=registry),
        "latency": Histogram("torchferry_request_seconds", "request latency by route", ["route"], registry=registry,
                             buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)),
        "images": Counter("torchferry_images_predicted_total", "images classified", registry=registry),
        "batch": Histogram("torchferry_batch_size", "images per ONNX Runtime call from /predict", registry=registry,
                           buckets=(1, 2, 4, 8, 16, 32, 64)),
        "ready": Gauge("torchferry_ready", "1 when the model is loaded and proven", registry=registry,
                       multiprocess_mode="livemax"),
    }


def _collect_images(max_images: int) -> list[tuple[str, bytes]]:
    mimetype = request.mimetype or ""
    if mimetype == "multipart/form-data":
        files = [(f.filename or key, f) for key, f in request.files.items(multi=True)]
        if not files:
            raise ClientError(400, "no_image", "the multipart body holds no file fields")
        if len(files) > max_images:
            raise ClientError(413, "too_many_images", f"{len(files)} images in one request; the limit is {max_images}")
        return [(name, f.read()) for name, f in files]
    if mimetype.startswith("image/"):
        return [("body", request.get_data(cache=False))]
    raise ClientError(415, "unsupported_media_type", f"Content-Type {mimetype or 'missing'!r}: send "
                      "multipart/form-data with image files, or a raw body with an image/* type")


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
        raise ClientError(413, "request_entity_too_large", f"the body is larger than the limit of {limit} bytes")
    body = b"".join(parts)
    env["wsgi.input"], env["CONTENT_LENGTH"] = io.BytesIO(body), str(len(body))
    del env["wsgi.input_terminated"], env["HTTP_TRANSFER_ENCODING"]


def _top_k(default: int, num_classes: int) -> int:
    raw = request.args.get("top_k")
    if raw is None:
        return min(default, num_classes)
    try:
        k = int(raw)
    except ValueError:
        k = 0
    if not 1 <= k <= num_classes:
        raise ClientError(400, "bad_top_k", f"top_k must be an integer from 1 to {num_classes}, got {raw!r}")
    return k


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """The serving app; `config` overrides environment variables, which override defaults."""
    settings = ServeSettings.load(config)
    app = Flask("torchferry.serve")
    app.config.from_mapping(config or {}, **settings.as_config())  # the settings as cast and checked
    app.config.update(
        DEBUG=False, TESTING=bool(app.config.get("TESTING")), PROPAGATE_EXCEPTIONS=False,
        MAX_CONTENT_LENGTH=settings.max_upload_bytes,
        # Multipart limits (CVE-2023-25577, CVE-2024-49767): few parts, little memory for non-file fields.
        MAX_FORM_PARTS=settings.max_images + 8, MAX_FORM_MEMORY_SIZE=64 * 1024,
    )
    app.debug = False
    # Pillow's own bomb check runs inside Image.open, before ours: give it our cap (never below its default).
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = max(settings.max_pixels, Image.MAX_IMAGE_PIXELS or 0)
    # One image at the pixel cap decodes at a time per process (serve/images.py): the memory budget holds
    # whatever the number of threads.
    budget = PixelBudget(settings.max_pixels)
    repo = ModelRepository(settings)
    auth = BearerAuth(settings.auth_token, settings.auth_token_file)
    metrics = _metrics(app)
    app.extensions["torchferry"] = repo
    if app.config.get("LOAD_FIRST"):  # gunicorn: a worker takes no connection before its model is proven
        repo.refresh()
        repo.start(initial_load=False)
    elif app.config.get("LOAD_SYNC"):  # tests: no watcher thread unless polling
        repo.refresh()
        if settings.poll_seconds > 0:
            repo.start(initial_load=False)
    else:
        repo.start()

    @app.before_request
    def _start_timer() -> None:
        g.start = time.perf_counter()
        g.images = 0

    @app.before_request
    def _authenticate() -> tuple[Response, int] | None:
        if not auth.enabled:
            return None
        header = request.headers.get("Authorization")
        if request.path in EXEMPT_PATHS:  # probes answer anyone; a valid token still shows whole reasons
            g.authenticated = header is not None and auth.check(header) is None
            return None
        problem = auth.check(header)
        if problem is None:
            g.authenticated = True
            return None
        response, status = error_response(401, "unauthorized", problem[1])
        response.headers["WWW-Authenticate"] = auth.challenge(problem[0])
        return response, status

    @app.before_request
    def _bounded_chunked_body() -> None:
        read_chunked_body(settings.max_upload_bytes)

    @app.after_request
    def _observe(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule else "unmatched"
        seconds = time.perf_counter() - g.get("start", time.perf_counter())
        metrics["requests"].labels(route, str(response.status_code)).inc()
        metrics["latency"].labels(route).observe(seconds)
        _access.info(json.dumps({"method": request.method, "route": route, "status": response.status_code,
                                 "ms": round(1000 * seconds, 2), "images": g.get("images", 0),
                                 "bytes": request.content_length or 0}))
        return response

    @app.errorhandler(ClientError)
    def _client_error(exc: ClientError):
        return error_response(exc.status, exc.code, exc.message)

    @app.errorhandler(V2Error)
    def _v2_error(exc: V2Error):
        return error_response(exc.status, "bad_request", exc.message)

    @app.errorhandler(ImageError)
    def _image_error(exc: ImageError):
        return error_response(exc.status, exc.code, exc.message)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        response, status = error_response(exc.code or 500, code, exc.description or exc.name)
        for key, value in exc.get_headers():  # e.g. a 405's Allow; the body is ours, and so its type
            if key.lower() != "content-type":
                response.headers[key] = value
        return response, status

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        _logger.exception("unhandled error on %s", request.path)
        return error_response(500, "internal_error", "the server failed to answer; the error is in its log")

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz():
        served = repo.active
        metrics["ready"].set(1 if served else 0)
        if served:
            return jsonify({"status": "ready", "model": served.name, "version": served.version, **served.proof})
        return jsonify({"status": "not_ready", "reason": reason_for_caller(repo)}), 503

    @app.get("/metadata")
    def metadata():
        served = serving(repo)
        info = served.predictor.info
        meta = info.metadata
        versions = repo.versions if g.get("authenticated") else repo.public_versions()
        return jsonify({"name": served.name, "version": served.version, "model_versions": versions,
                        "classes": info.classes, "input_shape": info.input_shape, "input": served.predictor.input_name,
                        "output": served.predictor.output_name, "preprocess": info.preprocess, "sha256": info.sha256,
                        "arch": meta.get("arch"), "val_acc": meta.get("val_acc"),
                        "checkpoint_sha256": meta.get("checkpoint_sha256"), "exporter": meta.get("exporter"),
                        "versions": {**(meta.get("versions") or {}),
                                     "torchferry": meta.get("torchferry_version")},
                        "ready": True, "proof": served.proof})

    @app.get("/metrics")
    def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

        metrics["ready"].set(1 if repo.ready else 0)
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = metrics["registry"]
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)

    @app.post("/predict")
    def predict():
        served = serving(repo)
        predictor = served.predictor
        k = _top_k(settings.top_k, len(predictor.info.classes))
        images = _collect_images(settings.max_images)
        spec, max_pixels = predictor.info.preprocess, settings.max_pixels
        batch = np.stack([prepare(data, spec, max_pixels, name, budget) for name, data in images])
        g.images = len(images)
        logits = served.run(batch)
        count_images(len(images))
        return jsonify({"predictions": predictor.top_k(logits, k),
                        "model": {"name": served.name, "version": served.version, "sha256": predictor.info.sha256,
                                  "arch": predictor.info.metadata.get("arch"), "classes": len(predictor.info.classes)}})

    def count_images(n: int) -> None:
        g.images = n
        metrics["images"].inc(n)
        metrics["batch"].observe(n)

    limits = Limits(max_images=settings.max_images, max_pixels=settings.max_pixels,
                    max_body=settings.max_upload_bytes, budget=budget)
    app.register_blueprint(v2_blueprint(repo, limits, count_images))
    return app
