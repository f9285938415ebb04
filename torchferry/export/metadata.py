"""The ONNX model contract (docs/design.md) on an `onnx.ModelProto`: metadata_props and external-data refusal.

The keys, their encoding and the golden inputs are `torchferry.contract`'s, the module the server reads the
same file with (without torch or onnx).
"""

from __future__ import annotations

from typing import Any

import onnx

from torchferry.contract import decode_metadata, encode_metadata


def set_metadata(model: onnx.ModelProto, values: dict[str, Any]) -> None:
    """Write metadata_props; non-string values are stored as JSON."""
    existing = {p.key: p for p in model.metadata_props}
    for key, text in encode_metadata(values).items():
        prop = existing.get(key) or model.metadata_props.add()
        prop.key, prop.value = key, text


def read_metadata(model: onnx.ModelProto) -> dict[str, Any]:
    """metadata_props as Python values (JSON decoded where it parses)."""
    return decode_metadata({p.key: p.value for p in model.metadata_props})


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
