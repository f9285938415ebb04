"""The tabular regression to the server: JSON rows on `/predict`, FP32 [N, F] encoded features on `/v2`.

`POST /predict` takes `{"rows": [{"temp_1": 45, "week": "Fri", ...}, ...]}`: every row must give every
feature column of the model's `features` metadata and nothing else, numbers finite, categories known; each
row is encoded by `torchferry.inputs.tabular.encode_rows` (what training encoded its rows with) and answered
`{"prediction": value}` in the target's units. `/v2` takes the encoded features themselves as FP32 [N, F].
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flask import request

from torchferry.contract import ContractError
from torchferry.inputs.tabular import InputRefused, encode_rows, feature_names, features_problems, width
from torchferry.serve.errors import HTTPError
from torchferry.serve.tasks import Render, ServeTask, json_field


def read_rows(body: bytes, max_rows: int) -> list[Any]:
    """The `rows` of a JSON body: a list of 1 to `max_rows` entries (each checked when encoded)."""
    rows = json_field(body, "rows", code="bad_request", empty="no_rows",
                      example='{"rows": [{"column": value, ...}, ...]}')
    if not isinstance(rows, list) or not rows:
        raise HTTPError(400, "no_rows", "'rows' must be a non-empty list of objects")
    if len(rows) > max_rows:
        raise HTTPError(413, "too_many_rows", f"{len(rows)} rows in one request; the limit is {max_rows}")
    return rows


class TabularServeTask(ServeTask):
    """A regression on a table: encoded features [N, F] in, one prediction per row out."""

    name = "tabular"
    classifier = False

    def read_spec(self, meta: dict[str, Any]) -> dict[str, Any]:
        if "features" not in meta:
            raise ContractError("it lacks the 'features' metadata of a torchferry tabular export")
        for problem in features_problems(meta["features"]):
            raise ContractError(f"metadata {problem}")
        features = meta["features"]
        return {"features": features, "target": features["target"], "feature_names": feature_names(features)}

    def input_shape(self, spec: dict[str, Any]) -> list[int]:
        return [width(spec["features"])]

    def output_columns(self, spec: dict[str, Any]) -> int:
        return 1

    def predict_batch(self, info: Any, max_items: int, top_k: int) -> tuple[np.ndarray, Render]:
        mimetype = request.mimetype or ""
        if mimetype != "application/json":
            raise HTTPError(415, "unsupported_media_type", f"Content-Type {mimetype or 'missing'!r}: send "
                            'application/json {"rows": [...]}')
        rows = read_rows(request.get_data(cache=False), max_items)
        try:
            batch = encode_rows(rows, info.spec["features"])
        except InputRefused as exc:
            raise HTTPError(400, "bad_row", str(exc)) from None
        return batch, lambda outputs: [{"prediction": float(v)} for v in np.asarray(outputs)[:, 0]]

    def v2_note(self, input_name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {"target": spec["target"], "feature_names": spec["feature_names"],
                "tabular_input": f"{input_name!r} takes FP32 [-1, {len(spec['feature_names'])}]: each row's encoded "
                "features in the order of feature_names (numbers standardised, categories one-hot); POST /predict "
                "takes plain JSON rows"}
