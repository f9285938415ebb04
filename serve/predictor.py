"""One ONNX Runtime session per process, built from the model file alone, proven before it serves.

The model's metadata (written by `python -m export.onnx`) carries the classes, the preprocessing and golden
inputs with the logits PyTorch gave for them. At start-up the predictor checks the file's sha256 against
its sidecar, refuses external-data initializers, rebuilds the golden inputs with numpy and runs them: a
model that does not reproduce them is never marked ready.
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
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.info = ModelInfo(path=os.path.abspath(model_path), sha256=digest, classes=list(meta["classes"]),
                              preprocess=dict(meta["preprocess"]), metadata=meta)
        self._lock = threading.Lock()

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

    def prove(self) -> float:
        """Recompute the golden outputs; raises ModelRefused when they do not match. Returns the max abs diff."""
        golden = self.info.metadata.get("golden")
        if not isinstance(golden, dict):
            raise ModelRefused("the model carries no golden outputs to prove it with")
        x = golden_inputs(golden["shape"], int(golden["seed"]), *golden["range"])
        expected = np.asarray(golden["logits"], dtype=np.float32)
        got = self.run(x)
        diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
        atol = float(golden.get("atol", 1e-4))
        if not diff <= atol:
            raise ModelRefused(f"golden outputs do not reproduce: max abs diff {diff:.3g} > {atol:g}; the model "
                               "does not compute what was exported")
        return diff

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
