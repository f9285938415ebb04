"""The server's settings, each declared once: its TORCHFERRY_* variable, type, default, range and help.

Two typed dataclasses hold them: `ServeSettings`, what the app reads (`create_app`, and `python -m serve`,
whose flags are made from the same declarations), and `GunicornSettings`, what torchferry/serve/gunicorn.conf.py and the
worker class read. `load()` takes the defaults, then the environment, then explicit overrides (the app's
config mapping or the command line), and casts and checks each value once: a value that cannot work is a
ValueError naming its variable.

Light on purpose (no Flask, numpy or ONNX Runtime): gunicorn's master runs `exit_on_bad_settings()` from
torchferry/serve/gunicorn.conf.py before it starts any worker, so a setting that cannot work stops the server with one
line and exit status 2, as `python -m serve` does, instead of workers failing to boot one after another. A GPU
device (TORCHFERRY_DEVICE) whose provider this onnxruntime lacks is such a setting: only then is ONNX Runtime
imported, to ask it (serve/device.py).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from torchferry.serve.device import DEVICES, DeviceRefused, check_available, default_batch_window_ms

# Pillow keeps an 8-byte pointer per row, so a side may be at most the pixel limit / 8 (serve/images.py).
ROW_COST_PIXELS = 8
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True)
class Setting:
    """How one setting is read: its variable, range (`low`..`high`, inclusive unless `positive`) and help."""

    env: str
    help: str
    low: float | None = None
    high: float | None = None
    positive: bool = False  # above `low`, not equal to it
    rule: str | None = None  # the error says "must be <rule>" instead of the range
    choices: tuple[str, ...] = ()
    flag: str | None = None  # the `python -m serve` flag
    unset: str | None = None  # what happens when a setting without a default is unset (for the help)
    keep_empty: bool = False  # "" is a value, not unset: an empty token must not turn auth off


def setting(env: str, default: Any, help: str, secret: bool = False, **how: Any) -> Any:
    """A dataclass field that is a setting; `how` holds the rest of its `Setting`; a secret is left out of repr."""
    return field(default=default, repr=not secret, metadata={"setting": Setting(env, help, **how)})


def _kind(annotation: Any) -> type:
    """`int` for `int` and `int | None`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def _cast(spec: Setting, kind: type, raw: str) -> Any:
    try:
        return kind(raw)
    except ValueError:
        problem = f"must be {spec.rule}" if spec.rule else f"is not a valid {kind.__name__}"
        raise ValueError(f"{spec.env}={raw!r} {problem}") from None


def _checked(spec: Setting, kind: type, value: Any, shown: Any = None) -> Any:
    """`value` as `kind`, or a ValueError naming the variable (and `shown`, else the value) when it has another
    type or lies outside its range."""
    shown = value if shown is None else shown
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{spec.env}={shown!r} is not a valid str")
        if spec.choices and value.lower() not in spec.choices:
            raise ValueError(f"{spec.env}={shown!r} is not one of {', '.join(spec.choices)}")
        return value.lower() if spec.choices else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ValueError(f"{spec.env}={shown!r} is not a valid {kind.__name__}")
    low, high = spec.low, spec.high
    if not math.isfinite(value) or (low is not None and (value < low or (spec.positive and value == low))) or (
            high is not None and value > high):
        if spec.rule:
            raise ValueError(f"{spec.env}={shown!r} must be {spec.rule}")
        allowed = f"from {low:g} to {high:g}" if high is not None else f"{low:g} or more"
        raise ValueError(f"{spec.env}={shown!r} cannot work; it must be {allowed}")
    return kind(value)


_S = TypeVar("_S", bound="_Settings")  # typing.Self needs Python 3.11; the serving code runs on 3.10 too


class _Settings:
    """What both settings dataclasses share: reading them from the environment and overrides, once."""

    @classmethod
    def table(cls) -> dict[str, tuple[Setting, type]]:
        """Each field's name: its `Setting` and its type."""
        hints = typing.get_type_hints(cls)
        return {f.name: (f.metadata["setting"], _kind(hints[f.name])) for f in fields(cls)}  # type: ignore[arg-type]

    @classmethod
    def load(cls: type[_S], overrides: Mapping[str, Any] | None = None,  # noqa: PYI019
             environ: Mapping[str, str] | None = None) -> _S:
        """Defaults, then TORCHFERRY_* variables, then `overrides` (keyed by the capitalised field name, as in
        Flask's config; None for the default); ValueError naming the variable for a value that cannot work."""
        env = os.environ if environ is None else environ
        overrides = overrides or {}
        values = {}
        for name, (spec, kind) in cls.table().items():
            raw = env.get(spec.env)
            if name.upper() in overrides:  # None: unset, whatever the environment says
                value = overrides[name.upper()]
                values[name] = getattr(cls, name) if value is None else _checked(spec, kind, value)
            elif raw is not None and (raw != "" or spec.keep_empty):
                # A rule's message quotes what was written; a range's, the number it was read as.
                values[name] = _checked(spec, kind, _cast(spec, kind, raw), raw if spec.rule else None)
        return cls(**values)

    def as_config(self) -> dict[str, Any]:
        """The settings keyed as in Flask's config: MAX_IMAGES, TOP_K, ..."""
        return {f.name.upper(): getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True)
class ServeSettings(_Settings):
    """What the app needs: the model, its limits, authentication, ONNX Runtime and micro-batching."""

    model: str | None = setting("TORCHFERRY_MODEL", None, "the .onnx file", flag="--model")
    model_dir: str | None = setting(
        "TORCHFERRY_MODEL_DIR", None, "instead of --model: a folder in Triton's layout, DIR/<name>/<version>/"
        "model.onnx; the highest proven version is served and SIGHUP swaps in a newer one", flag="--model-dir")
    model_name: str | None = setting(
        "TORCHFERRY_MODEL_NAME", None, "the model's name in /v2 URLs; with --model-dir, which <name> folder",
        flag="--name", unset="the folder's name or the model's metadata")
    poll_seconds: float = setting("TORCHFERRY_POLL_SECONDS", 0.0, "also look for new versions this often, in "
                                  "seconds (0: only on SIGHUP)", low=0, high=86_400 * 365, flag="--poll-seconds")
    auth_token: str | None = setting("TORCHFERRY_AUTH_TOKEN", None, "the bearer token every route but the probes "
                                     "requires", unset="authentication off", keep_empty=True, secret=True)
    auth_token_file: str | None = setting("TORCHFERRY_AUTH_TOKEN_FILE", None, "a file holding the bearer token, "
                                          "re-read when it changes", unset="authentication off", keep_empty=True)
    max_upload_bytes: int = setting("TORCHFERRY_MAX_UPLOAD_BYTES", 16 * 1024 * 1024, "largest request body",
                                    low=1, high=2**31, flag="--max-upload-bytes")
    max_images: int = setting("TORCHFERRY_MAX_IMAGES", 16, "images (or texts, rows) per request", low=1, high=4096,
                              flag="--max-images")
    max_input_bytes: int = setting(
        "TORCHFERRY_MAX_INPUT_BYTES", 64 * 1024 * 1024, "largest model input one request makes: a model whose inputs "
        "are large (a 2048 px image: 48 MiB) takes fewer images per request than --max-images, at least one",
        low=1, high=2**40, flag="--max-input-bytes")
    max_text_chars: int = setting("TORCHFERRY_MAX_TEXT_CHARS", 10_000, "longest text a text model is sent, in "
                                  "characters", low=1, high=2**26, flag="--max-text-chars")
    max_pixels: int = setting("TORCHFERRY_MAX_PIXELS", 40_000_000, "largest image, width × height",
                              low=ROW_COST_PIXELS, high=2**31, flag="--max-pixels")
    top_k: int = setting("TORCHFERRY_TOP_K", 5, "labels per image when the request does not say", low=1,
                         flag="--top-k")
    ort_memory_bytes: int = setting(
        "TORCHFERRY_ORT_MEMORY_BYTES", 2 * 2**30, "most CPU memory ONNX Runtime may hold for the tensors it computes "
        "in one process, all requests in flight together (the model's weights aside); a request past it is answered "
        "503, a model whose proof needs more is not served (0: no limit)", low=0, high=2**44,
        flag="--ort-memory-bytes")
    ort_threads: int | None = setting(
        "TORCHFERRY_ORT_THREADS", None, "ONNX Runtime intra-op threads per process (0: ORT's own)", low=0,
        high=1024, flag="--threads", unset="ORT's own; under gunicorn the cores divided among the workers")
    batch_window_ms: float | None = setting(
        "TORCHFERRY_BATCH_WINDOW_MS", None, "gather concurrent requests for up to this long into one ONNX Runtime "
        "call (0: off)", low=0, high=60_000, flag="--batch-window-ms", unset="0 on the CPU, 2 on a GPU")
    max_batch: int = setting("TORCHFERRY_MAX_BATCH", 32, "largest micro-batch", low=1, high=65_536,
                             flag="--max-batch")

    device: str = setting("TORCHFERRY_DEVICE", "cpu", "where ONNX Runtime runs the model: cpu, cuda (its CUDA "
                          "provider) or tensorrt (TensorRT, CUDA for what it cannot run); a GPU whose provider is "
                          "missing stops the server", choices=DEVICES, flag="--device")
    device_id: int = setting("TORCHFERRY_DEVICE_ID", 0, "which GPU, with --device cuda or tensorrt", low=0,
                             high=1023, flag="--device-id")

    def batch_window(self) -> float:
        """Micro-batching's window in ms: the operator's setting, else on on a GPU and off on the CPU."""
        return default_batch_window_ms(self.device) if self.batch_window_ms is None else self.batch_window_ms

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per setting that has one, its help ending in its variable and default."""
        for name, (spec, kind) in cls.table().items():
            if spec.flag is None:
                continue
            default = getattr(cls, name)
            fallback = (spec.unset if default is None else default if kind is str else f"{default:,}" if kind is int
                        else f"{default:g}")
            parser.add_argument(spec.flag, dest=name, type=kind, default=None, help=f"{spec.help} (default: "
                                f"${spec.env}" + (f", else {fallback})" if fallback else ")"))

    @classmethod
    def flag_overrides(cls, args: argparse.Namespace) -> dict[str, Any]:
        """The flags given on the command line, keyed as `load()`'s overrides."""
        return {name.upper(): getattr(args, name) for name, (spec, _) in cls.table().items()
                if spec.flag is not None and getattr(args, name) is not None}


@dataclass(frozen=True)
class GunicornSettings(_Settings):
    """What torchferry/serve/gunicorn.conf.py and the worker class (serve/worker.py) need: processes, threads, timeouts."""

    bind: str = setting("TORCHFERRY_BIND", "127.0.0.1:8080", "address to listen on (the container: 0.0.0.0:8080)")
    workers: int = setting("TORCHFERRY_WORKERS", 1, "worker processes", low=1, high=1024)
    # 2: ONNX Runtime already spreads one run over the worker's share of the cores, and a second thread decodes the
    # next request meanwhile; more threads only interleave more requests on the same cores. Measured (both servers
    # running, the load alternating, 6 pairs): 2 workers × 2 threads against × 4, req/s 1.00/1.04/1.05x at 1/4/16
    # clients; 1 worker × 2 against × 4 (ORT on 2 threads), 1.02/1.03/1.11x.
    threads: int = setting("TORCHFERRY_THREADS", 2, "native threads per worker that run the app", low=1, high=1024)
    worker_connections: int = setting("TORCHFERRY_WORKER_CONNECTIONS", 1000, "open connections per worker",
                                      low=1, high=1_000_000)
    graceful_timeout: int = setting("TORCHFERRY_GRACEFUL_TIMEOUT", 30, "seconds requests in flight get after "
                                    "SIGTERM", low=0, high=86_400)
    timeout: int = setting("TORCHFERRY_TIMEOUT", 60, "seconds a silent worker lives before it is replaced "
                           "(0: never)", low=0, high=86_400)
    body_timeout: float = setting("TORCHFERRY_BODY_TIMEOUT", 15.0, "seconds a request body may take after its "
                                  "head, then 408", low=0, positive=True, rule="a positive number of seconds")
    worker_tmp_dir: str | None = setting("TORCHFERRY_WORKER_TMP_DIR", None, "where workers keep their heartbeat "
                                         "files", unset="/dev/shm where it exists")
    log_level: str = setting("TORCHFERRY_LOG_LEVEL", "info", "gunicorn's log level", choices=LOG_LEVELS)


def settings_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The app's settings from defaults and TORCHFERRY_* variables, keyed as in Flask's config."""
    return ServeSettings.load(environ=environ).as_config()


def exit_on_bad_settings(environ: Mapping[str, str] | None = None) -> tuple[GunicornSettings, ServeSettings]:
    """Every setting, the token and the device's provider checked; on a problem, one line on stderr and exit
    status 2."""
    from torchferry.serve.auth import BearerAuth

    try:
        app = ServeSettings.load(environ=environ)
        if app.auth_token is not None or app.auth_token_file is not None:
            BearerAuth(app.auth_token, app.auth_token_file)
        check_available(app.device)
        return GunicornSettings.load(environ=environ), app
    except (ValueError, DeviceRefused) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
