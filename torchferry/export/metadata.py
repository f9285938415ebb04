"""The ONNX model contract (DESIGN.md): metadata_props keys, the golden inputs, external-data refusal.

Plain json/numpy/onnx only: what is written here is read back by the server without torch. The golden
inputs are not stored as tensors but regenerated from a seed with numpy's legacy `RandomState`, whose
streams numpy keeps stable across versions, so the model file stays small whatever its input size.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
GOLDEN_SEED = 20261126
GOLDEN_BATCH = 2
GOLDEN_RANGE = (-2.0, 2.0)
KEYS = ("classes", "preprocess", "arch", "val_acc", "checkpoint_sha256", "torchferry_version", "golden")


def golden_inputs(channels: int, height: int, width: int, seed: int = GOLDEN_SEED,
                  batch: int = GOLDEN_BATCH) -> np.ndarray:
    """The golden input batch: uniform values in GOLDEN_RANGE, float32, NCHW, the same on every machine."""
    low, high = GOLDEN_RANGE
    return np.random.RandomState(seed).uniform(low, high, size=(batch, channels, height, width)).astype(np.float32)


def golden_record(logits: np.ndarray, shape: list[int], source: str, atol: float, rtol: float = 0.0) -> dict[str, Any]:
    """What the model's `golden` metadata holds: how to rebuild the inputs, the logits they gave, and the bound
    they were held to, |got - logits| <= atol + rtol * |logits| (a reader may hold them to a stricter one)."""
    return {"seed": GOLDEN_SEED, "range": list(GOLDEN_RANGE), "shape": [int(s) for s in shape],
            "generator": "numpy.random.RandomState(seed).uniform(low, high, shape).astype(float32)",
            "logits": np.asarray(logits, dtype=np.float32).tolist(), "source": source, "atol": float(atol),
            "rtol": float(rtol)}


def set_metadata(model: onnx.ModelProto, values: dict[str, Any]) -> None:
    """Write metadata_props; non-string values are stored as JSON."""
    existing = {p.key: p for p in model.metadata_props}
    for key, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        prop = existing.get(key) or model.metadata_props.add()
        prop.key, prop.value = key, text


def read_metadata(model: onnx.ModelProto) -> dict[str, Any]:
    """metadata_props as Python values (JSON decoded where it parses)."""
    out: dict[str, Any] = {}
    for prop in model.metadata_props:
        try:
            out[prop.key] = json.loads(prop.value)
        except ValueError:
            out[prop.key] = prop.value
    return out


def external_data_tensors(model: onnx.ModelProto) -> list[str]:
    """Names of initializers whose data lives in other files (refused: CVE-2024-27318 path traversal)."""
    return [t.name for t in _tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]


def _tensors(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    """Initializers and tensor attributes of a graph and its subgraphs (If/Loop/Scan bodies)."""
    found = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                found.append(attr.t)
            elif attr.type == onnx.AttributeProto.TENSORS:
                found.extend(attr.tensors)
            elif attr.type == onnx.AttributeProto.GRAPH:
                found.extend(_tensors(attr.g))
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    found.extend(_tensors(g))
    return found
