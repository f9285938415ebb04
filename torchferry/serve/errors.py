"""The server's one HTTP error type and the JSON every error becomes.

Every refused request is JSON with its status: `{"error": {"code", "message"}}`, or the Open Inference
Protocol's `{"error": "message"}` under `/v2`. Nothing reaches a client as a stack trace: Flask's own errors
(404, 405, 413, ...) get the same shapes, and an unexpected exception is logged and answered 500.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

_logger = logging.getLogger("torchferry.serve")


class HTTPError(Exception):
    """A request the server refuses: the HTTP status, a short code, a message that says why, extra headers."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_response(status: int, code: str, message: str) -> tuple[Response, int]:
    """The error shape: {"error": {"code", "message"}}; under /v2 the protocol's {"error": "message"}."""
    if request.path == "/v2" or request.path.startswith("/v2/"):
        return jsonify({"error": message}), status
    return jsonify({"error": {"code": code, "message": message}}), status


def _refused(exc: HTTPError) -> tuple[Response, int]:
    response, status = error_response(exc.status, exc.code, exc.message)
    response.headers.update(exc.headers)
    return response, status


def _werkzeug_error(exc: HTTPException) -> tuple[Response, int]:
    code = (exc.name or "error").lower().replace(" ", "_")
    response, status = error_response(exc.code or 500, code, exc.description or exc.name)
    for key, value in exc.get_headers():  # e.g. a 405's Allow; the body is ours, and so its type
        if key.lower() != "content-type":
            response.headers[key] = value
    return response, status


def _unexpected(exc: Exception) -> tuple[Response, int]:
    _logger.exception("unhandled error on %s", request.path)
    return error_response(500, "internal_error", "the server failed to answer; the error is in its log")


def register_error_handlers(app: Flask) -> None:
    """Every error `app` meets answered as JSON: HTTPError, Flask's own HTTP errors, and the unexpected."""
    app.register_error_handler(HTTPError, _refused)
    app.register_error_handler(HTTPException, _werkzeug_error)
    app.register_error_handler(Exception, _unexpected)
