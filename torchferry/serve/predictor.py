"""One ONNX Runtime session per process, built from the model file alone, proven before it serves.

The model's metadata (written by `python -m export.onnx`) carries the classes, the preprocessing and golden
inputs with the logits PyTorch gave for them. At start-up the predictor checks the file's sha256 against
its sidecar, refuses external-data initializers, checks the metadata against the graph (one float input
[N, C, H, W] whose static sizes are the preprocessing's, one output [N, K] with K the number of classes),
rebuilds the golden inputs with numpy and runs them: a model that does not reproduce them is never marked
ready. The file is untrusted: every value it carries is checked before use, and the tolerance of the
proof is the server's (ATOL, RTOL); a file may only ask for a stricter one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

_logger = logging.getLogger(__name__)

# The golden proof: |got - expected| <= atol + rtol * |expected| elementwise, with these bounds unless the file
# asks for stricter ones. ONNX Runtime against PyTorch differs by ~1e-6 on fp32 models; an INT8 file's golden
# logits are its own (export/quantize.py), reproduced to ~1e-6 on another CPU of the same ORT.
ATOL, RTOL = 1e-3, 1e-4
# Golden inputs: at most this many rows (a file could ask for a batch that takes the memory of the host).
MAX_GOLDEN_BATCH = 8
# Largest preprocessing sizes a file may ask for: the model input is C × H × W floats per image.
MAX_SIDE = 4096


class ModelRefused(Exception):
    """The model file cannot be served: missing, altered, external data, not ours, or failing its proof."""


def golden_inputs(shape: list[int], seed: int, low: float, high: float) -> np.ndarray:
    """The export's golden batch: numpy's legacy RandomState (stable across numpy versions), float32 NCHW."""
    return np.random.RandomState(seed).uniform(low, high, size=tuple(shape)).astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, stable for large logits."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class ModelInfo:
    """What the model file says about itself."""

    path: str
    sha256: str
    classes: list[str]
    preprocess: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> list[Any]:
        """[N, C, H, W] with N dynamic."""
        h, w = self.preprocess["size"]
        return ["N", int(self.preprocess["channels"]), int(h), int(w)]


def _decode(props: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in props.items():
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _positive_int(value: Any, what: str, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ModelRefused(f"{what} must be an integer from 1 to {high}, got {value!r}")
    return value


def _finite_numbers(value: Any, what: str, count: int) -> list[float]:
    if not isinstance(value, list) or len(value) != count or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in value):
        raise ModelRefused(f"{what} must be a list of {count} finite numbers, got {value!r}"[:300])
    return [float(v) for v in value]


def check_preprocess(spec: Any) -> dict[str, Any]:
    """The file's preprocessing spec, checked value by value (types, ranges, one mean/std per channel)."""
    if not isinstance(spec, dict):
        raise ModelRefused("metadata 'preprocess' must be an object")
    channels = spec.get("channels")
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ModelRefused(f"metadata preprocess.channels must be 1 or 3, got {channels!r}")
    size = spec.get("size")
    if not isinstance(size, list) or len(size) != 2:
        raise ModelRefused(f"metadata preprocess.size must be [height, width], got {size!r}"[:300])
    for v in size:
        _positive_int(v, "metadata preprocess.size", MAX_SIDE)
    _positive_int(spec.get("resize"), "metadata preprocess.resize", MAX_SIDE)
    _finite_numbers(spec.get("mean"), "metadata preprocess.mean", channels)
    std = _finite_numbers(spec.get("std"), "metadata preprocess.std", channels)
    if any(v == 0 for v in std):
        raise ModelRefused("metadata preprocess.std holds a zero")
    return spec


def check_classes(classes: Any) -> list[str]:
    """The file's class names: a non-empty list of strings."""
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ModelRefused("metadata 'classes' must be a non-empty list of names")
    return classes


def tolerance(golden: dict[str, Any]) -> tuple[float, float]:
    """(atol, rtol) of the proof: the server's, or the file's where it is a finite, non-negative, smaller number."""
    bounds = []
    for key, ours in (("atol", ATOL), ("rtol", RTOL)):
        theirs = golden.get(key)
        stricter = (isinstance(theirs, (int, float)) and not isinstance(theirs, bool) and np.isfinite(theirs)
                    and 0 <= theirs < ours)
        bounds.append(float(theirs) if stricter else ours)
    return bounds[0], bounds[1]


class Predictor:
    """Loads, checks and runs one ONNX classifier; thread-safe (ORT sessions are)."""

    def __init__(self, model_path: str, intra_op_threads: int = 0):
        if not os.path.isfile(model_path):
            raise ModelRefused(f"model file {model_path!r} does not exist")
        with open(model_path, "rb") as f:
            data = f.read()
        digest = hashlib.sha256(data).hexdigest()
        sidecar = model_path + ".sha256"
        if os.path.isfile(sidecar):
            with open(sidecar, encoding="utf-8") as f:
                parts = f.read().split()
            if parts and parts[0] != digest:
                raise ModelRefused(f"sha256 of {model_path} is {digest[:12]}…, its sidecar says {parts[0][:12]}…: "
                                   "the file is altered or truncated")
        self.session = self._session(data, intra_op_threads, model_path)
        meta = _decode(self.session.get_modelmeta().custom_metadata_map)
        for key in ("classes", "preprocess"):
            if key not in meta:
                raise ModelRefused(f"{model_path} lacks the '{key}' metadata of a torchferry export")
        classes, spec = check_classes(meta["classes"]), check_preprocess(meta["preprocess"])
        self.input_name, self.output_name = self._check_graph(classes, spec)
        self.info = ModelInfo(path=os.path.abspath(model_path), sha256=digest, classes=list(classes),
                              preprocess=dict(spec), metadata=meta)
        self._lock = threading.Lock()

    def _check_graph(self, classes: list[str], spec: dict[str, Any]) -> tuple[str, str]:
        """The input and output names, once the graph is seen to take what the metadata says it takes."""
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise ModelRefused(f"the graph has {len(inputs)} inputs and {len(outputs)} outputs; a classifier has "
                               "one input [N, C, H, W] and an output [N, classes]")
        inp, out = inputs[0], outputs[0]
        if inp.type != "tensor(float)":
            raise ModelRefused(f"the graph's input {inp.name!r} is {inp.type}; expected tensor(float)")
        want = [None, int(spec["channels"]), *(int(v) for v in spec["size"])]
        if len(inp.shape) != 4 or any(isinstance(d, int) and w is not None and d != w for d, w in zip(inp.shape, want)):
            raise ModelRefused(f"the graph's input {inp.name!r} has shape {inp.shape}; the metadata's preprocessing "
                               f"gives [N, {want[1]}, {want[2]}, {want[3]}] (channels, size)")
        if len(out.shape) != 2 or (isinstance(out.shape[1], int) and out.shape[1] != len(classes)):
            raise ModelRefused(f"the graph's output {out.name!r} has shape {out.shape}; the metadata names "
                               f"{len(classes)} classes, so it must be [N, {len(classes)}]")
        return inp.name, out.name

    @staticmethod
    def _session(data: bytes, threads: int, path: str) -> ort.InferenceSession:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads > 0:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        # Loaded from bytes with an empty folder for external data: a model whose initializers point at other
        # files (ONNX path traversal, CVE-2024-27318) fails to load instead of reading them.
        with tempfile.TemporaryDirectory(prefix="torchferry-noext-") as empty:
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", empty)
            try:
                return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
            except Exception as exc:  # noqa: BLE001 - ORT's refusal, reported in one line
                text = str(exc)
                if "xternal data" in text:
                    raise ModelRefused(f"{path} references external data files; refused (only self-contained "
                                       "models are served)") from None
                raise ModelRefused(f"ONNX Runtime cannot load {path}: {text.strip().splitlines()[0][:300]}") from None

    def golden(self) -> tuple[np.ndarray, np.ndarray, float, float]:
        """(inputs, expected logits, atol, rtol) from the file's golden record, every field checked first."""
        golden = self.info.metadata.get("golden")
        if not isinstance(golden, dict):
            raise ModelRefused("the model carries no golden outputs to prove it with")
        shape, spec = golden.get("shape"), self.info.preprocess
        want = [int(spec["channels"]), *(int(v) for v in spec["size"])]
        if not isinstance(shape, list) or len(shape) != 4 or shape[1:] != want:
            raise ModelRefused(f"golden.shape must be [batch, {want[0]}, {want[1]}, {want[2]}], got {shape!r}"[:300])
        batch = _positive_int(shape[0], "golden.shape's batch", MAX_GOLDEN_BATCH)
        seed = golden.get("seed")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ModelRefused(f"golden.seed must be an integer from 0 to 2**32 - 1, got {seed!r}"[:300])
        low, high = _finite_numbers(golden.get("range"), "golden.range", 2)
        if not low < high:
            raise ModelRefused(f"golden.range must be [low, high] with low < high, got {[low, high]}")
        try:
            expected = np.asarray(golden.get("logits"), dtype=np.float32)
        except (TypeError, ValueError):
            raise ModelRefused("golden.logits must be a [batch, classes] list of numbers") from None
        if expected.shape != (batch, len(self.info.classes)) or not np.isfinite(expected).all():
            raise ModelRefused(f"golden.logits must be {batch} rows of {len(self.info.classes)} finite numbers "
                               f"(one per class), got shape {list(expected.shape)}")
        atol, rtol = tolerance(golden)
        return golden_inputs(shape, seed, low, high), expected, atol, rtol

    def prove(self) -> float:
        """Recompute the golden outputs; raises ModelRefused when they do not match. Returns the max abs diff.

        Passes when |got - expected| <= atol + rtol * |expected| everywhere, with the server's ATOL and RTOL
        unless the file records stricter ones. The output must have one column per class.
        """
        x, expected, atol, rtol = self.golden()
        try:
            got = self.run(x)
        except Exception as exc:  # noqa: BLE001 - ORT's refusal of its own graph, in one line
            raise ModelRefused(f"the model fails on its golden inputs: {str(exc).strip().splitlines()[0][:300]}") from None
        if got.ndim != 2 or got.shape[1] != len(self.info.classes):
            raise ModelRefused(f"the model's output has shape {list(got.shape)} for its golden inputs; the metadata "
                               f"names {len(self.info.classes)} classes")
        if got.shape != expected.shape:
            raise ModelRefused(f"the model gives {list(got.shape)} logits for golden inputs of "
                               f"{list(expected.shape)}")
        diff = np.abs(got.astype(np.float64) - expected)
        bound = atol + rtol * np.abs(expected.astype(np.float64))
        worst = float(diff.max())
        if not np.all(diff <= bound):  # NaN fails too
            excess = float(np.nanmax(diff - bound)) if np.isfinite(diff).all() else float("nan")
            raise ModelRefused(f"golden outputs do not reproduce: max abs diff {worst:.3g}, over the bound "
                               f"atol {atol:g} + rtol {rtol:g} × |expected| by {excess:.3g}; the model does not "
                               "compute what was exported")
        return worst

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a float32 [N, C, H, W] batch."""
        return self.session.run(None, {self.input_name: batch})[0]

    def top_k(self, logits: np.ndarray, k: int) -> list[dict[str, Any]]:
        """Per row: the best label, its index and score, and the top `k` labels with scores."""
        probs = softmax(logits)
        k = min(k, probs.shape[1])
        results = []
        for row in probs:
            order = np.argsort(-row, kind="stable")[:k]
            top = [{"label": self.info.classes[i], "index": int(i), "score": float(row[i])} for i in order]
            results.append({"label": top[0]["label"], "index": top[0]["index"], "score": top[0]["score"],
                            "top_k": [{"label": t["label"], "score": t["score"]} for t in top]})
        return results
