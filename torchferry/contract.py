"""The model-file contract (docs/design.md), torch-free: what a checkpoint and an ONNX model carry, and its checks.

Training writes it, the export reads and rewrites it, the server reads it without torch: the error type, the
checkpoint format version, the preprocessing spec and its bounds, the ONNX metadata keys and their encoding, the
golden inputs and the tolerance they are held to, the sha256 sidecar and the 16-bit image rule live here once.
Plain json/hashlib/numpy, so that `torchferry.serve` (which never imports torch) imports it as the rest do;
numpy is imported by the functions that use it, so that importing the contract (as `--help` does) stays light.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


class TorchferryError(Exception):
    """A problem the user can fix (bad flag, bad data, missing resources); CLIs print it as one line."""


class ContractError(TorchferryError):
    """A checkpoint or model file that does not follow the contract: damaged, altered, of another format."""


# ONNX Runtime's errors open with its status and the C++ file, line and function that raised them, e.g.
# "[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/onnxruntime/core/graph/model.cc:202 onnxruntime::Model::Model(
# onnx::ModelProto&&, ...) Unsupported model IR version: 14, max supported IR version: 13": 250 characters before
# the reason, which a one-line message cut at 300 would lose.
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : (?:\S+:\d+ )?(?:[\w:~<>]+\((?:[^()]|\([^()]*\))*\) )?")


def error_line(exc: object) -> str:
    """The first non-empty line of an error, at most 300 characters and without ONNX Runtime's status and C++
    location (the error type's name when it says nothing): what a one-line message quotes."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return _ORT_PREFIX.sub("", lines[0])[:300] if lines else type(exc).__name__


# ----------------------------------------------------------------------------------------------------
# the checkpoint's format and the values both files carry

CHECKPOINT_FORMAT = "torchferry.checkpoint/1"
FORMAT_MAJOR = CHECKPOINT_FORMAT.rsplit("/", 1)[1].split(".")[0]
# How a file torch.save wrote begins: its zip archive, or (torch.save's legacy format) a pickle of protocol 2 or more.
# An ONNX model (protobuf) begins otherwise, so a checkpoint given for a model, or a model for a checkpoint, is named.
TORCH_SAVE_MAGIC = (b"PK\x03\x04", b"\x80")
# Bounds of the preprocessing (--image-size, --resize-size): a file asks the reader for C × H × W floats per image.
MAX_IMAGE_SIDE = 2048
MAX_RESIZE = 4096
MAX_CLASSES = 100_000
MAX_CLASS_NAME = 1000
# All class names together: ImageNet-21k's 21,841 full WordNet names take about 0.7 million characters. Without it,
# 100,000 names of 1,000 characters made every GET /metadata build a 96 MB answer.
MAX_CLASS_CHARS = 2_000_000


def format_problem(fmt: Any) -> str | None:
    """Why a checkpoint's `format` is not one this torchferry reads, or None when it is."""
    text = str(fmt)
    name, _, version = text.partition("/")
    if name != "torchferry.checkpoint" or version.split(".")[0] != FORMAT_MAJOR:
        return f"has checkpoint format {text[:80]!r}; this torchferry reads {CHECKPOINT_FORMAT!r}"
    return None


def is_int(value: Any, low: int, high: int) -> bool:
    """An int (not a bool) in [low, high]."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def is_number(value: Any) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def short(value: Any) -> str:
    """repr(value), cut to 60 characters for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def preprocess_spec(*, size: int, resize: int, mean: list[float], std: list[float], channels: int) -> dict[str, Any]:
    """The eval transform as plain data: resize the shorter side to `resize` (bilinear), center-crop `size`,
    scale to [0, 1], normalise; the `preprocess` of every checkpoint and model file."""
    return {"size": [int(size), int(size)], "resize": int(resize), "mean": [float(m) for m in mean],
            "std": [float(s) for s in std], "channels": int(channels), "interpolation": "bilinear"}


def preprocess_problems(pre: Any) -> Iterator[str]:
    """What is wrong with a `preprocess` spec read from a file, first problem first (nothing when it is sound)."""
    if not isinstance(pre, dict):
        yield f"preprocess must be a mapping, got {type(pre).__name__}"
        return
    size, resize, channels = pre.get("size"), pre.get("resize"), pre.get("channels")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(is_int(v, 1, MAX_IMAGE_SIDE) for v in size)):
        yield f"preprocess.size must be [H, W] with sides from 1 to {MAX_IMAGE_SIDE}, got {short(size)}"
    if not is_int(resize, 1, MAX_RESIZE):
        yield f"preprocess.resize must be an integer from 1 to {MAX_RESIZE}, got {short(resize)}"
    if channels not in (1, 3) or isinstance(channels, bool):
        yield f"preprocess.channels must be 1 or 3, got {short(channels)}"
        return
    for key in ("mean", "std"):
        values = pre.get(key)
        if not (isinstance(values, list) and len(values) == channels
                and all(is_number(v) and math.isfinite(v) and abs(v) <= 1e3 for v in values)):
            yield f"preprocess.{key} must be {channels} finite numbers, got {short(values)}"
        elif key == "std" and not all(v > 0 for v in values):
            yield f"preprocess.std must be positive, not zero or negative, got {short(values)}"
    if pre.get("interpolation", "bilinear") != "bilinear":
        yield f"preprocess.interpolation must be 'bilinear', got {short(pre.get('interpolation'))}"


# Metadata a reader only shows (the server's /metadata and /predict answers, the model's name in /v2 URLs): each a
# short string or a finite number, `versions` a small mapping of names to version strings, so that a file cannot
# make every answer large, or fail.
SHOWN_KEYS = ("name", "arch", "exporter", "torchferry_version", "checkpoint_sha256", "val_acc")
MAX_SHOWN, MAX_VERSIONS = 200, 64


def shown_metadata_problem(meta: Mapping[str, Any]) -> str | None:
    """Why a field of SHOWN_KEYS or `versions` in decoded metadata is not one a reader may show, or None."""
    for key in SHOWN_KEYS:
        value = meta.get(key)
        if not (value is None or (is_number(value) and math.isfinite(value))
                or (isinstance(value, str) and len(value) <= MAX_SHOWN)):
            return f"{key} must be a string of at most {MAX_SHOWN} characters or a number, got {short(value)}"
    versions = meta.get("versions")
    if versions is not None and not (isinstance(versions, dict) and len(versions) <= MAX_VERSIONS and all(
            isinstance(v, str) and len(k) <= MAX_SHOWN and len(v) <= MAX_SHOWN for k, v in versions.items())):
        return f"versions must map at most {MAX_VERSIONS} library names to version strings, got {short(versions)}"
    return None


def classes_problem(classes: Any) -> str | None:
    """Why `classes` is not a list of 2 to MAX_CLASSES class names (non-empty strings of at most MAX_CLASS_NAME
    characters, MAX_CLASS_CHARS together), or None."""
    if not (isinstance(classes, list) and all(isinstance(c, str) and 0 < len(c) <= MAX_CLASS_NAME for c in classes)):
        return "classes must be a list of class names (non-empty strings)"
    if not 2 <= len(classes) <= MAX_CLASSES:
        return f"classes must name from 2 to {MAX_CLASSES} classes, got {len(classes)}"
    if (chars := sum(map(len, classes))) > MAX_CLASS_CHARS:
        return f"class names must take at most {MAX_CLASS_CHARS:,} characters together, got {chars:,}"
    return None


# ----------------------------------------------------------------------------------------------------
# the task a file serves: one field of the config, the checkpoint and the ONNX metadata

TASKS = ("image", "tabular", "text")
DEFAULT_TASK = "image"  # a file without `task` (every file before issue 19) is an image classifier


def task_of(values: Mapping[str, Any]) -> str:
    """The `task` a checkpoint, config or metadata mapping records: DEFAULT_TASK when absent."""
    task = values.get("task", DEFAULT_TASK)
    if task not in TASKS:
        raise ContractError(f"task must be one of {', '.join(TASKS)}, got {short(task)}")
    return task


def registered(spec: str) -> Any:
    """The attribute a registry's `"package.module:name"` names (a task's class), or None when that module is
    not part of this installation (the serving image carries serve/ alone). Registries are the project's own
    tables, never a file's value."""
    import importlib

    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        return None
    return getattr(module, name, None)


# ----------------------------------------------------------------------------------------------------
# the ONNX model: names, metadata_props, golden inputs

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
METADATA_KEYS = ("classes", "preprocess", "arch", "val_acc", "checkpoint_sha256", "torchferry_version", "golden")
GOLDEN_SEED = 20261126
GOLDEN_BATCH = 2
GOLDEN_RANGE = (-2.0, 2.0)
# Golden inputs a file may ask for: at most this many rows (a file could ask for a batch that takes the host's memory).
MAX_GOLDEN_BATCH = 8
# The golden proof at start-up: |got - expected| <= atol + rtol * |expected| elementwise, with these bounds unless
# the file asks for stricter ones. ONNX Runtime against PyTorch differs by ~1e-6 on fp32 models; an INT8 file's
# golden logits are its own (they come from ONNX Runtime), reproduced to ~1e-6 on another CPU of the same ORT.
GOLDEN_ATOL, GOLDEN_RTOL = 1e-3, 1e-4
# The bound on a GPU (TORCHFERRY_DEVICE=cuda or tensorrt, serve/device.py), in place of the above and of a file's own:
# the golden logits are PyTorch's fp32 CPU figures, and a GPU does not compute in that arithmetic. ONNX Runtime's
# CUDA provider runs convolutions and matrix products in TF32 on Ampere and later (its `use_tf32` defaults on), as
# TensorRT's fp32 engines do: each product's inputs rounded to 10 mantissa bits (unit roundoff 2**-11 ~ 4.9e-4),
# a relative error of ~2e-3 on one wide product (PyTorch's CUDA notes measure 2.2e-3 at width 10240) that ~50
# layers of a resnet50 carry to ~1e-2 of a logit's size. 5e-2 + 1e-2 × |logit| admits that and still refuses a
# model that computes something else, whose logits differ by O(1). Not measured on a GPU in this repository yet.
GOLDEN_GPU_ATOL, GOLDEN_GPU_RTOL = 5e-2, 1e-2


def encode_metadata(values: Mapping[str, Any]) -> dict[str, str]:
    """metadata_props values: strings as they are, anything else as compact JSON."""
    return {key: value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
            for key, value in values.items()}


def decode_metadata(props: Mapping[str, str]) -> dict[str, Any]:
    """metadata_props as Python values: JSON decoded where it parses, the string itself where not (`arch`)."""
    out: dict[str, Any] = {}
    for key, value in props.items():
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def golden_inputs(shape: list[int] | tuple[int, ...], seed: int = GOLDEN_SEED, low: float = GOLDEN_RANGE[0],
                  high: float = GOLDEN_RANGE[1], dtype: str = "float32") -> np.ndarray:
    """The golden batch of `shape` [N, ...] ([N, C, H, W] for images, [N, F] for tables, [N, L] token ids for
    texts), the same on every machine: float32 uniform in [low, high), or int64 uniform in low..high-1.

    Regenerated from the seed rather than stored, with numpy's legacy RandomState (whose streams numpy keeps
    stable across versions), so a model file stays small whatever its input size.
    """
    import numpy as np

    rng, size = np.random.RandomState(seed), tuple(int(s) for s in shape)
    if dtype == "int64":
        return rng.randint(int(low), int(high), size=size).astype(np.int64)
    return rng.uniform(low, high, size=size).astype(np.float32)


def golden_record(logits: np.ndarray, shape: list[int], source: str, atol: float, rtol: float = 0.0, *,
                  dtype: str = "float32", low: float = GOLDEN_RANGE[0],
                  high: float = GOLDEN_RANGE[1]) -> dict[str, Any]:
    """The `golden` metadata: how to rebuild the inputs, the logits they gave, and the bound they were held to,
    |got - logits| <= atol + rtol * |logits| (a reader may hold them to a stricter one)."""
    import numpy as np

    generator = ("numpy.random.RandomState(seed).randint(low, high, shape).astype(int64)" if dtype == "int64"
                 else "numpy.random.RandomState(seed).uniform(low, high, shape).astype(float32)")
    return {"seed": GOLDEN_SEED, "range": [low, high], "shape": [int(s) for s in shape], "generator": generator,
            **({"dtype": dtype} if dtype != "float32" else {}),
            "logits": np.asarray(logits, dtype=np.float32).tolist(), "source": source, "atol": float(atol),
            "rtol": float(rtol)}


def _golden_range(golden: dict[str, Any]) -> tuple[str, float, float]:
    """The dtype and [low, high) of a golden record's inputs, checked (token ids: integers from 0 to 2**31)."""
    dtype = golden.get("dtype", "float32")
    if dtype not in ("float32", "int64"):
        raise ContractError(f"golden.dtype must be 'float32' or 'int64', got {short(dtype)}")
    low, high = _finite_numbers(golden.get("range"), "golden.range", 2)
    if not low < high:
        raise ContractError(f"golden.range must be [low, high] with low < high, got {[low, high]}")
    if dtype == "int64" and not (low == int(low) and high == int(high) and 0 <= low and high <= 2**31):
        raise ContractError(f"golden.range of int64 inputs must be integers from 0 to 2**31, got {[low, high]}")
    return dtype, low, high


def _finite_numbers(value: Any, what: str, count: int) -> list[float]:
    if not isinstance(value, list) or len(value) != count or not all(
            is_number(v) and math.isfinite(v) for v in value):
        raise ContractError(f"{what} must be a list of {count} finite numbers, got {value!r}"[:300])
    return [float(v) for v in value]


def read_golden(golden: Any, input_shape: list[int], num_classes: int,
                bound: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(inputs, expected logits, atol, rtol) of a file's `golden` record, every field checked first.

    `input_shape` is one input's shape ([C, H, W] as the preprocessing gives it, [F] for a table); `num_classes`
    the output's columns (1 for a regression). The bound is the reader's (GOLDEN_ATOL, GOLDEN_RTOL),
    or the file's where that is a finite, non-negative, smaller number: a file may only ask for a stricter proof.
    A device whose arithmetic is not fp32's passes its own `bound` (GOLDEN_GPU_ATOL, GOLDEN_GPU_RTOL), which
    replaces both.
    """
    import numpy as np

    if not isinstance(golden, dict):
        raise ContractError("the model carries no golden outputs to prove it with")
    shape = golden.get("shape")
    if not isinstance(shape, list) or len(shape) != len(input_shape) + 1 or shape[1:] != list(input_shape):
        want = ", ".join(str(v) for v in input_shape)
        raise ContractError(f"golden.shape must be [batch, {want}], got {shape!r}"[:300])
    if not is_int(shape[0], 1, MAX_GOLDEN_BATCH):
        raise ContractError(f"golden.shape's batch must be an integer from 1 to {MAX_GOLDEN_BATCH}, got {shape[0]!r}")
    seed = golden.get("seed")
    if not is_int(seed, 0, 2**32 - 1):
        raise ContractError(f"golden.seed must be an integer from 0 to 2**32 - 1, got {seed!r}"[:300])
    dtype, low, high = _golden_range(golden)
    try:
        expected = np.asarray(golden.get("logits"), dtype=np.float32)
    except (TypeError, ValueError):
        raise ContractError("golden.logits must be a [batch, classes] list of numbers") from None
    if expected.shape != (shape[0], num_classes) or not np.isfinite(expected).all():
        raise ContractError(f"golden.logits must be {shape[0]} rows of {num_classes} finite numbers "
                            f"(one per output column), got shape {list(expected.shape)}")
    if bound is not None:
        return golden_inputs(shape, seed, low, high, dtype), expected, float(bound[0]), float(bound[1])
    bounds = []
    for key, ours in (("atol", GOLDEN_ATOL), ("rtol", GOLDEN_RTOL)):
        theirs = golden.get(key)
        bounds.append(float(theirs) if is_number(theirs) and math.isfinite(theirs) and 0 <= theirs < ours else ours)
    return golden_inputs(shape, seed, low, high, dtype), expected, bounds[0], bounds[1]


def tolerance_ratio(got: np.ndarray, reference: np.ndarray, atol: float, rtol: float) -> float:
    """max of |got - ref| / (atol + rtol * |ref|) over every logit: at most 1 when every one is within bounds.

    The bound is numpy.isclose's (b = the reference): absolute for logits near zero, relative for large ones.
    NaN anywhere gives inf.
    """
    import numpy as np

    diff = np.abs(got.astype(np.float64) - reference.astype(np.float64))
    bound = atol + rtol * np.abs(reference.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(diff == 0, 0.0, diff / bound)
    return float(np.nan_to_num(ratio, nan=np.inf, posinf=np.inf).max()) if ratio.size else 0.0


# ----------------------------------------------------------------------------------------------------
# the sha256 sidecar: `<file>.sha256` holding "<hex digest>  <file name>\n" (sha256sum's format)

def sha256_file(path: str) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sidecar_path(path: str) -> str:
    """Where the sha256 of `path` is recorded."""
    return path + ".sha256"


def sidecar_text(path: str, digest: str) -> bytes:
    """The sidecar of `path` whose contents hash to `digest`, in `sha256sum`'s format (`sha256sum -c` reads it)."""
    return f"{digest}  {os.path.basename(path)}\n".encode()


def recorded_sha256(path: str) -> str | None:
    """The sha256 the sidecar of `path` records, or None when there is no sidecar (or an empty one)."""
    sidecar = sidecar_path(path)
    if not os.path.isfile(sidecar):
        return None
    with open(sidecar, encoding="utf-8", errors="replace") as f:
        parts = f.read(4096).split()
    return parts[0] if parts else None


def folder_not_file(path: str, expected: str) -> str:
    """'is a folder, not a file' for a folder given where a file goes, naming the `expected` file inside it (a run's
    best.pth, its model.onnx) when it holds one."""
    inside = os.path.join(path, expected)
    return "is a folder, not a file" + (f": pass {inside!r}" if os.path.isfile(inside) else "")


# ----------------------------------------------------------------------------------------------------
# images: the 16-bit rule training and serving share

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def eight_bit(values: np.ndarray) -> np.ndarray:
    """16-bit (or 32-bit integer) gray values → uint8: clipped to 0..65535, then value / 257 rounded (scaled, not
    clipped, so a 16-bit scan keeps its contrast); training's image reader and the server's decoder both use it."""
    import numpy as np

    v = np.asarray(values).astype(np.int64)  # a copy, worked on in place: one int64 array, no temporaries
    np.clip(v, 0, 65535, out=v)
    # round(v / 257) for integers: v / 257 is never exactly k + 0.5, so floor((v + 128) / 257) is the same.
    v += 128
    v //= 257
    return v.astype(np.uint8)
