"""The server's settings: defaults, TORCHFERRY_* environment variables, and the check that they can work.

Light on purpose (no Flask, numpy or ONNX Runtime): gunicorn's master runs `exit_on_bad_settings()` from
serve/gunicorn.conf.py before it starts any worker, so a setting that cannot work stops the server with one
line and exit status 2, as `python -m serve` does, instead of workers failing to boot one after another.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

# Pillow keeps an 8-byte pointer per row, so a side may be at most the pixel limit / 8 (serve/images.py).
ROW_COST_PIXELS = 8

# Settings where an empty value is kept as "", not read as unset: an empty token must not turn auth off.
KEEP_EMPTY = frozenset({"AUTH_TOKEN", "AUTH_TOKEN_FILE"})

# name: (environment variable, type, default)
SETTINGS: dict[str, tuple[str, type, Any]] = {
    "MODEL": ("TORCHFERRY_MODEL", str, None),
    "MODEL_DIR": ("TORCHFERRY_MODEL_DIR", str, None),
    "MODEL_NAME": ("TORCHFERRY_MODEL_NAME", str, None),
    "POLL_SECONDS": ("TORCHFERRY_POLL_SECONDS", float, 0.0),
    "AUTH_TOKEN": ("TORCHFERRY_AUTH_TOKEN", str, None),
    "AUTH_TOKEN_FILE": ("TORCHFERRY_AUTH_TOKEN_FILE", str, None),
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
        if raw is None or (raw == "" and name not in KEEP_EMPTY):
            out[name] = default
            continue
        try:
            out[name] = kind(raw)
        except ValueError:
            raise ValueError(f"{var}={raw!r} is not a valid {kind.__name__}") from None
    return out


# The range each numeric setting must lie in: (smallest, largest or None); a value outside cannot work.
BOUNDS: dict[str, tuple[float, float | None]] = {
    "POLL_SECONDS": (0, 86_400 * 365),
    "MAX_UPLOAD_BYTES": (1, 2**31),
    "MAX_IMAGES": (1, 4096),
    "MAX_PIXELS": (ROW_COST_PIXELS, 2**31),
    "TOP_K": (1, None),
    "ORT_THREADS": (0, 1024),
    "BATCH_WINDOW_MS": (0, 60_000),
    "MAX_BATCH": (1, 65_536),
}


def check_settings(config: dict[str, Any]) -> None:
    """A setting that cannot work is a ValueError naming it, raised before the server starts."""
    for name, (low, high) in BOUNDS.items():
        value = config.get(name)
        if value is None:
            continue
        var = SETTINGS[name][0]
        kind = SETTINGS[name][1]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise ValueError(f"{var}={value!r} is not a valid {kind.__name__}")
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            allowed = f"from {low:g} to {high:g}" if high is not None else f"{low:g} or more"
            raise ValueError(f"{var}={value!r} cannot work; it must be {allowed}")



def exit_on_bad_settings(environ: dict[str, str] | None = None) -> None:
    """The environment's settings and token checked; on a problem, one line on stderr and exit status 2."""
    from torchferry.serve.auth import BearerAuth

    try:
        config = settings_from_env(environ)
        check_settings(config)
        if config["AUTH_TOKEN"] is not None or config["AUTH_TOKEN_FILE"] is not None:
            BearerAuth(config["AUTH_TOKEN"], config["AUTH_TOKEN_FILE"])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
