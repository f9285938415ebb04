"""`python -m serve --model model.onnx | --model-dir DIR [--host 127.0.0.1] [--port 8080]`: the development server.

Production runs the same app under gunicorn: `gunicorn -c torchferry/serve/gunicorn.conf.py` (see that file). In both,
SIGHUP makes the server look for a new model version and swap it in once proven, without a restart.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sys

from werkzeug.serving import LISTEN_QUEUE, make_server, select_address_family

from torchferry.cli import Parser
from torchferry.contract import folder_not_file
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
    if not settings.model:
        return "no model given: pass --model model.onnx (or --model-dir DIR), or set TORCHFERRY_MODEL"
    if os.path.isdir(settings.model):
        return (f"model {settings.model!r} {folder_not_file(settings.model, 'model.onnx')} (--model-dir takes a "
                "folder of versions, DIR/<name>/<version>/model.onnx)")
    if not os.path.isfile(settings.model):
        return f"model {settings.model!r} does not exist; pass --model or set TORCHFERRY_MODEL"
    return None


def _fail(problem: str, status: int) -> int:
    print(f"error: {problem}", file=sys.stderr)
    return status


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, as werkzeug's server would open it; OSError when it cannot (taken, a host
    that is not this machine's)."""
    return socket.create_server((host, port), family=select_address_family(host, port), backlog=LISTEN_QUEUE)


def main(argv: list[str] | None = None) -> int:
    """Run the development server; exit 2 when the model file is missing, a setting cannot work (a GPU device
    whose provider this onnxruntime lacks included) or --host:--port cannot be listened on, 1 when the GPU's
    session fell back to the CPU."""
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
    try:  # before the model loads: a port that is taken is said at once, in one line
        sock = listen(args.host, args.port)
    except OSError as exc:
        fix = ("another program holds the port: stop it, or pass another --port" if exc.errno == errno.EADDRINUSE
               else "pass a --host this machine has (127.0.0.1, 0.0.0.0) and a --port you may use")
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        return _fail(f"cannot listen on {args.host}:{args.port}: {reason}; {fix}", 2)
    try:
        # On a GPU the model is loaded and proven before the server answers (connections wait in the listen queue
        # meanwhile), so a device that cannot run it stops the server here instead of leaving it unready.
        app = create_app({**settings.as_config(), "LOAD_FIRST": is_gpu(settings.device)})
    except DeviceRefused as exc:
        sock.close()
        return _fail(str(exc), 1)
    except ValueError as exc:  # an unreadable token file
        sock.close()
        return _fail(str(exc), 2)
    repo = app.extensions["torchferry"]
    signal.signal(signal.SIGHUP, lambda signum, frame: repo.request_reload())
    # werkzeug's server on the socket opened above (it would print two lines and exit 1 on a taken port itself).
    server = make_server(args.host, args.port, app, threaded=True, fd=sock.fileno())
    sock.close()  # the server holds its own duplicate
    server.log_startup()
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
