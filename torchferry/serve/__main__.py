"""`python -m serve --model model.onnx | --model-dir DIR [--host 127.0.0.1] [--port 8080]`: the development server.

Production runs the same app under gunicorn: `gunicorn -c serve/gunicorn.conf.py` (see that file). In both,
SIGHUP makes the server look for a new model version and swap it in once proven, without a restart.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from torchferry.serve.app import create_app


def get_args_parser() -> argparse.ArgumentParser:
    """The development server's command line; every flag also has a TORCHFERRY_* variable."""
    p = argparse.ArgumentParser(prog="python -m serve", description="Serve a torchferry ONNX model over HTTP "
                                "(development server; production: gunicorn -c serve/gunicorn.conf.py).")
    p.add_argument("--model", default=os.environ.get("TORCHFERRY_MODEL"), help="the .onnx file "
                   "(default: $TORCHFERRY_MODEL)")
    p.add_argument("--model-dir", default=os.environ.get("TORCHFERRY_MODEL_DIR"), help="instead of --model: a folder "
                   "in Triton's layout, DIR/<name>/<version>/model.onnx; the highest proven version is served and "
                   "SIGHUP swaps in a newer one (default: $TORCHFERRY_MODEL_DIR)")
    p.add_argument("--name", default=None, help="the model's name in /v2 URLs; with --model-dir, which <name> "
                   "folder (default: $TORCHFERRY_MODEL_NAME, else the folder's name or the model's metadata)")
    p.add_argument("--poll-seconds", type=float, default=None, help="also look for new versions this often "
                   "(default: $TORCHFERRY_POLL_SECONDS or 0, only on SIGHUP)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    p.add_argument("--batch-window-ms", type=float, default=None, help="gather concurrent requests for up to this "
                   "long into one ONNX Runtime call (default: 0, off)")
    p.add_argument("--max-batch", type=int, default=None, help="largest micro-batch (default: 32)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: ORT's own)")
    p.add_argument("--top-k", type=int, default=None, help="labels per image when the request does not say (default: 5)")
    p.add_argument("--max-images", type=int, default=None, help="images per request (default: 16)")
    p.add_argument("--max-upload-bytes", type=int, default=None, help="largest request body (default: 16 MiB)")
    p.add_argument("--max-pixels", type=int, default=None, help="largest image, width × height (default: 40,000,000)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the development server; exit 2 when the model file is missing."""
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.model and args.model_dir:
        print("error: pass --model (one file) or --model-dir (versioned folder), not both", file=sys.stderr)
        return 2
    if args.model_dir:
        if not os.path.isdir(args.model_dir):
            print(f"error: model folder {args.model_dir!r} does not exist", file=sys.stderr)
            return 2
    elif not args.model or not os.path.isfile(args.model):
        print(f"error: model {args.model!r} does not exist; pass --model or set TORCHFERRY_MODEL", file=sys.stderr)
        return 2
    overrides = {"MODEL": args.model, "MODEL_DIR": args.model_dir, "MODEL_NAME": args.name,
                 "POLL_SECONDS": args.poll_seconds, "BATCH_WINDOW_MS": args.batch_window_ms,
                 "MAX_BATCH": args.max_batch, "ORT_THREADS": args.threads, "TOP_K": args.top_k,
                 "MAX_IMAGES": args.max_images, "MAX_UPLOAD_BYTES": args.max_upload_bytes,
                 "MAX_PIXELS": args.max_pixels}
    try:
        app = create_app({k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:  # a malformed setting or an unreadable token file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    repo = app.extensions["torchferry"]
    signal.signal(signal.SIGHUP, lambda signum, frame: repo.request_reload())
    app.run(host=args.host, port=args.port, debug=False, use_reloader=False, threaded=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
