"""The work every peer server does per request: the same decode, preprocessing and ONNX Runtime call as torchferry.

Imports only numpy, Pillow and onnxruntime (each peer's venv has those three, pinned to the versions of the main
environment). The preprocessing is an equal copy of torchferry/serve/images.py's `prepare` for what the benchmark
sends (8-bit JPEGs without EXIF rotation): PIL decode, convert to L or RGB, resize the shorter side (bilinear, with
torchvision's size rule), center crop, scale and normalise in numpy. tests/test_bench_peers.py holds the two equal.
What a peer does not copy is what torchferry does around it: the allow-list and pixel caps, the model's sha256 and
golden proof, auth, metrics and the access log.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image


def ort_threads(workers: int) -> int:
    """ONNX Runtime threads per worker: the cores divided among the workers, as torchferry's gunicorn config does."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, workers))


def prepare(data: bytes, spec: dict[str, Any]) -> np.ndarray:
    """JPEG bytes → float32 [C, H, W]: the checkpoint's eval transform (resize, center crop, normalise)."""
    img = Image.open(io.BytesIO(data))
    img = img.convert("L" if int(spec["channels"]) == 1 else "RGB")
    size, (out_h, out_w) = int(spec["resize"]), (int(v) for v in spec["size"])
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), resample=Image.Resampling.BILINEAR)
    top, left = round((new_h - out_h) / 2.0), round((new_w - out_w) / 2.0)
    img = img.crop((left, top, left + out_w, top + out_h))
    arr = np.asarray(img, dtype=np.float32)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(-1, 1, 1)
    return np.ascontiguousarray((arr / np.float32(255.0) - mean) / std, dtype=np.float32)


class Classifier:
    """One ONNX Runtime session of a torchferry export and its classes; `classify(bytes)` → the top-5 as JSON data."""

    def __init__(self, model_path: str, threads: int):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(model_path, sess_options=opts, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.classes, self.spec = json.loads(meta["classes"]), json.loads(meta["preprocess"])
        self.input_name = self.session.get_inputs()[0].name

    def classify(self, data: bytes, k: int = 5) -> dict[str, Any]:
        logits = self.session.run(None, {self.input_name: prepare(data, self.spec)[None]})[0][0].astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = [{"label": self.classes[i], "score": float(probs[i])} for i in np.argsort(-probs, kind="stable")[:k]]
        return {"predictions": [{"label": top[0]["label"], "score": top[0]["score"], "top_k": top}]}
