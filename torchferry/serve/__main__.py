"""`python -m serve --model model.onnx | --model-dir DIR [--host 127.0.0.1] [--port 8080]`: the development server.

Production runs the same app under gunicorn: `gunicorn -c torchferry/serve/gunicorn.conf.py` (see that file). In both,
SIGHUP makes the server look for a new model version and swap it in once proven, without a restart.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from torchferry.cli import Parser
from torchferry.serve.app import create_app
from torchferry.serve.device import DeviceRefused, check_available, is_gpu
from torchferry.serve.settings import ServeSettings


def get_args_parser() -> argparse.ArgumentParser:
    """The development server's command line; every setting flag also has a TORCHFERRY_* variable."""
    p = Parser(prog="python -m serve", description="Serve a torchferry ONNX model over HTTP "
                                "(development server; production: gunicorn -c torchferry/serve/gunicorn.conf.py).")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    ServeSettings.add_flags(p)
    return p


def _model_problem(settings: ServeSettings) -> str | None:
    """Why the configured model source cannot be served, or None."""
    if settings.model and settings.model_dir:
        return "pass --model (one file) or --model-dir (versioned folder), not both"
    if settings.model_dir:
        return None if os.path.isdir(settings.model_dir) else f"model folder {settings.model_dir!r} does not exist"
    if not settings.model or not os.path.isfile(settings.model):
        return f"model {settings.model!r} does not exist; pass --model or set TORCHFERRY_MODEL"
    return None


def _fail(problem: str, status: int) -> int:
    print(f"error: {problem}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    """Run the development server; exit 2 when the model file is missing or a setting cannot work (a GPU device
    whose provider this onnxruntime lacks included), 1 when the GPU's session fell back to the CPU."""
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        settings = ServeSettings.load(ServeSettings.flag_overrides(args))
        problem = _model_problem(settings)
        if problem is None:
            check_available(settings.device)
    except (ValueError, DeviceRefused) as exc:  # a malformed setting, a provider this onnxruntime lacks
        problem = str(exc)
    if problem is not None:
        return _fail(problem, 2)
    try:
        # On a GPU the model is loaded and proven before the server listens, so a device that cannot run it
        # stops the server here instead of leaving it unready.
        app = create_app({**settings.as_config(), "LOAD_FIRST": is_gpu(settings.device)})
    except DeviceRefused as exc:
        return _fail(str(exc), 1)
    except ValueError as exc:  # an unreadable token file
        return _fail(str(exc), 2)
    repo = app.extensions["torchferry"]
    signal.signal(signal.SIGHUP, lambda signum, frame: repo.request_reload())
    app.run(host=args.host, port=args.port, debug=False, use_reloader=False, threaded=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
