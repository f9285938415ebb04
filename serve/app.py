"""The Flask application: `create_app()` serves one ONNX classifier over HTTP (DESIGN.md's HTTP table).

Configuration comes from defaults, then environment variables (TORCHFERRY_*), then the `config` mapping.
Nothing happens at import; the model loads in a background thread so that `/healthz` answers at once and
`/readyz` turns 200 only after the model loaded, matched its sha256 and reproduced its golden outputs.
Every client error is JSON `{"error": {"code", "message"}}` with a 4xx status; nothing reaches a client
as a stack trace, and the app never runs in debug mode.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

import numpy as np
from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from serve.batcher import MicroBatcher
from serve.images import ImageError, decode, preprocess
from serve.predictor import ModelRefused, Predictor

_logger = logging.getLogger("serve")
_access = logging.getLogger("serve.access")

# name: (environment variable, type, default)
SETTINGS: dict[str, tuple[str, type, Any]] = {
    "MODEL": ("TORCHFERRY_MODEL", str, None),
    "MAX_UPLOAD_BYTES": ("TORCHFERRY_MAX_UPLOAD_BYTES", int, 16 * 1024 * 1024),
    "MAX_IMAGES": ("TORCHFERRY_MAX_IMAGES", int, 16),
    "MAX_PIXELS": ("TORCHFERRY_MAX_PIXELS", int, 40_000_000),
    "TOP_K": ("TORCHFERRY_TOP_K", int, 5),
    "ORT_THREADS": ("TORCHFERRY_ORT_THREADS", int, 0),
    "BATCH_WINDOW_MS": ("TORCHFERRY_BATCH_WINDOW_MS", float, 0.0),
    "MAX_BATCH": ("TORCHFERRY_MAX_BATCH", int, 32),
}


def settings_from_env(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Defaults overridden by TORCHFERRY_* environment variables; a malformed value is a clear error."""
    env = os.environ if environ is None else environ
    out = {}
    for name, (var, kind, default) in SETTINGS.items():
        raw = env.get(var)
        if raw is None or raw == "":
            out[name] = default
            continue
        try:
            out[name] = kind(raw)
        except ValueError:
            raise ValueError(f"{var}={raw!r} is not a valid {kind.__name__}") from None
    return out


class ServingState:
    """The predictor of this process, its readiness, and the micro-batcher when enabled."""

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.predictor: Predictor | None = None
        self.batcher: MicroBatcher | None = None
        self.ready = False
        self.reason = "loading the model"
        self.proof: dict[str, Any] = {}

    def load(self) -> None:
        """Load, check and prove the model; on failure stay not-ready with the reason (logged)."""
        path = self.config.get("MODEL")
        try:
            if not path:
                raise ModelRefused("no model configured: set TORCHFERRY_MODEL or pass --model")
            t0 = time.perf_counter()
            predictor = Predictor(path, int(self.config["ORT_THREADS"]))
            diff = predictor.prove()  # also the warm-up inference
            self.proof = {"golden_max_abs_diff": diff, "load_seconds": round(time.perf_counter() - t0, 3)}
            self.predictor = predictor
            if float(self.config["BATCH_WINDOW_MS"]) > 0:
                self.batcher = MicroBatcher(predictor.run, float(self.config["BATCH_WINDOW_MS"]),
                                            int(self.config["MAX_BATCH"]))
            self.ready, self.reason = True, "ready"
            _logger.info(json.dumps({"event": "model_ready", "model": predictor.info.path,
                                     "sha256": predictor.info.sha256, **self.proof}))
        except ModelRefused as exc:
            self.reason = str(exc)
            _logger.error(json.dumps({"event": "model_refused", "model": path, "reason": self.reason}))
        except Exception as exc:  # noqa: BLE001 - any load failure keeps the pod not-ready, with the reason
            self.reason = f"cannot load the model: {type(exc).__name__}: {exc}"
            _logger.exception("model load failed")

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits, through the micro-batcher when enabled."""
        assert self.predictor is not None
        if self.batcher is not None:
            return self.batcher.submit(batch)
        return self.predictor.run(batch)


class ClientError(Exception):
    """A request the server refuses with a JSON 4xx."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(status: int, code: str, message: str) -> tuple[Response, int]:
    """The one error shape: {"error": {"code", "message"}}."""
    return jsonify({"error": {"code": code, "message": message}}), status


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
    app = Flask("serve")
    app.config.from_mapping(settings_from_env())
    if config:
        app.config.update(config)
    app.config.update(
        DEBUG=False, TESTING=bool(app.config.get("TESTING")), PROPAGATE_EXCEPTIONS=False,
        MAX_CONTENT_LENGTH=int(app.config["MAX_UPLOAD_BYTES"]),
        # Multipart limits (CVE-2023-25577, CVE-2024-49767): few parts, little memory for non-file fields.
        MAX_FORM_PARTS=int(app.config["MAX_IMAGES"]) + 8, MAX_FORM_MEMORY_SIZE=64 * 1024,
    )
    app.debug = False
    # Pillow's own bomb check runs inside Image.open, before ours: give it our cap (never below its default).
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = max(int(app.config["MAX_PIXELS"]), Image.MAX_IMAGE_PIXELS or 0)
    state = ServingState(app.config)
    metrics = _metrics(app)
    app.extensions["torchferry"] = state
    if app.config.get("LOAD_SYNC"):
        state.load()
    else:
        threading.Thread(target=state.load, name="torchferry-load", daemon=True).start()

    @app.before_request
    def _start_timer() -> None:
        g.start = time.perf_counter()
        g.images = 0

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

    @app.errorhandler(ImageError)
    def _image_error(exc: ImageError):
        return error_response(exc.status, exc.code, exc.message)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        return error_response(exc.code or 500, code, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        _logger.exception("unhandled error on %s", request.path)
        return error_response(500, "internal_error", "the server failed to answer; the error is in its log")

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz():
        metrics["ready"].set(1 if state.ready else 0)
        if state.ready:
            return jsonify({"status": "ready", **state.proof})
        return jsonify({"status": "not_ready", "reason": state.reason}), 503

    @app.get("/metadata")
    def metadata():
        if state.predictor is None:
            raise ClientError(503, "not_ready", state.reason)
        info = state.predictor.info
        meta = info.metadata
        return jsonify({"classes": info.classes, "input_shape": info.input_shape, "input": "input",
                        "output": "logits", "preprocess": info.preprocess, "sha256": info.sha256,
                        "arch": meta.get("arch"), "val_acc": meta.get("val_acc"),
                        "checkpoint_sha256": meta.get("checkpoint_sha256"), "exporter": meta.get("exporter"),
                        "versions": {**(meta.get("versions") or {}),
                                     "torchferry": meta.get("torchferry_version")},
                        "ready": state.ready, "proof": state.proof})

    @app.get("/metrics")
    def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

        metrics["ready"].set(1 if state.ready else 0)
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = metrics["registry"]
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)

    @app.post("/predict")
    def predict():
        if not state.ready or state.predictor is None:
            raise ClientError(503, "not_ready", state.reason)
        predictor = state.predictor
        k = _top_k(int(app.config["TOP_K"]), len(predictor.info.classes))
        images = _collect_images(int(app.config["MAX_IMAGES"]))
        spec, max_pixels = predictor.info.preprocess, int(app.config["MAX_PIXELS"])
        batch = np.stack([preprocess(decode(data, max_pixels, name), spec) for name, data in images])
        g.images = len(images)
        logits = state.run(batch)
        metrics["images"].inc(len(images))
        metrics["batch"].observe(len(images))
        return jsonify({"predictions": predictor.top_k(logits, k),
                        "model": {"sha256": predictor.info.sha256, "arch": predictor.info.metadata.get("arch"),
                                  "classes": len(predictor.info.classes)}})

    return app
