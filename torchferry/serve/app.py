"""The Flask application: `create_app()` serves one ONNX classifier over HTTP (the HTTP API of docs/design.md).

Settings come from defaults, then environment variables (TORCHFERRY_*), then the `config` mapping, cast and
checked once (serve/settings.py). Nothing happens at import; the model loads in a background thread so that
`/healthz` answers at once and `/readyz` turns 200 only after the model loaded, matched its sha256 and
reproduced its golden outputs. Under gunicorn (`create_app({"LOAD_FIRST": True})`, torchferry/serve/gunicorn.conf.py)
the first load runs before the factory returns, so a worker accepts no connection before its model is proven:
a worker that starts or restarts (after the OOM killer, say) never answers 503 beside ready ones. In both,
the same thread later swaps in newer versions (serve/repository.py) when asked (SIGHUP) or on a poll, in the
background. `/predict` and the other routes of serve/routes.py and the Open Inference Protocol routes under
`/v2` (serve/v2.py) answer from the same model. Every client error is JSON with a 4xx status
(serve/errors.py); nothing reaches a client as a stack trace, and the app never runs in debug mode. With a
token configured (serve/auth.py) every route but the probes needs it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any, NoReturn

from flask import Flask

from torchferry.serve import routes, v2
from torchferry.serve.auth import BearerAuth
from torchferry.serve.device import REFUSAL_MARK_ENV, DeviceRefused
from torchferry.serve.errors import register_error_handlers
from torchferry.serve.images import PixelBudget
from torchferry.serve.metrics import Metrics
from torchferry.serve.repository import ModelRepository
from torchferry.serve.settings import ServeSettings, settings_from_env  # noqa: F401 - settings_from_env re-exported
from torchferry.serve.state import EXTENSION, ServerState

WORKER_BOOT_ERROR = 3  # gunicorn.arbiter.Arbiter.WORKER_BOOT_ERROR
REFUSED_WAIT_S = 3.0  # past the master's reaction to the first one's exit (its loop wakes each second)


def _configure(app: Flask, settings: ServeSettings, config: dict[str, Any]) -> None:
    """Flask's config: the settings as cast and checked, the request limits, never debug."""
    app.config.from_mapping(config, **settings.as_config())
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


def _start_loading(app: Flask, repo: ModelRepository, settings: ServeSettings) -> None:
    if app.config.get("LOAD_FIRST"):  # gunicorn: a worker takes no connection before its model is proven
        repo.refresh()
        if not repo.ready and repo.device_problem:  # the GPU asked for cannot run it: no server at all
            raise DeviceRefused(repo.device_problem)
        repo.start(initial_load=False)
    elif app.config.get("LOAD_SYNC"):  # tests: no watcher thread unless polling
        repo.refresh()
        if settings.poll_seconds > 0:
            repo.start(initial_load=False)
    else:
        repo.start()


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """The serving app; `config` overrides environment variables, which override defaults. With LOAD_FIRST, a
    device that cannot run the model (serve/device.py) raises DeviceRefused instead of serving nothing."""
    settings = ServeSettings.load(config)
    app = Flask("torchferry.serve")
    _configure(app, settings, config or {})
    repo = ModelRepository(settings)
    auth = BearerAuth(settings.auth_token, settings.auth_token_file)
    app.extensions[EXTENSION] = ServerState(settings, repo, auth, Metrics(), PixelBudget(settings.max_pixels))
    app.extensions["torchferry"] = repo
    _start_loading(app, repo, settings)
    register_error_handlers(app)
    app.register_blueprint(routes.bp)
    app.register_blueprint(v2.bp)
    return app


def gunicorn_app() -> Flask:
    """The app of a gunicorn worker (torchferry/serve/gunicorn.conf.py): its model loaded and proven first. A device
    that cannot run it ends the worker with one line and gunicorn's boot-error status, on which the master stops
    the server rather than start worker after worker. The worker ends with os._exit: with onnxruntime-gpu, the
    interpreter's normal exit after a failed CUDA start aborts in ONNX Runtime's teardown (SIGABRT, which gunicorn
    answers with a new worker, forever)."""
    try:
        return create_app({"LOAD_FIRST": True})
    except DeviceRefused as exc:
        _end_refused_worker(str(exc))


def _end_refused_worker(problem: str) -> NoReturn:
    """The first worker to refuse says why and exits with the boot-error status. The others, which fail alike,
    wait (at most REFUSED_WAIT_S) for the master's SIGTERM and exit 0: gunicorn 27 raises its HaltServer again,
    with a traceback and exit 1, when it reaps a second boot error while it halts."""
    mark = os.environ.get(REFUSAL_MARK_ENV)
    if mark and not _first_to_refuse(mark):
        signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))
        time.sleep(REFUSED_WAIT_S)
        os._exit(0)
    print(f"error: {problem}", file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(WORKER_BOOT_ERROR)


def _first_to_refuse(mark: str) -> bool:
    """True for the one process that creates `mark` (and when it cannot be created at all)."""
    try:
        os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    except OSError:
        return True
    return True
