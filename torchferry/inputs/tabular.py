"""The tabular task's input contract: the `features` spec and JSON-like rows → the model's float32 [N, F].

`features` is plain data that the checkpoint and the ONNX metadata carry:

    {"columns": [{"name": "temp_1", "kind": "numeric", "mean": 51.2, "std": 11.9},
                 {"name": "week", "kind": "categorical", "categories": ["Fri", "Mon", ...]}],
     "target": "actual"}

A numeric column becomes one feature, (value - mean) / std with the training split's statistics; a categorical
column one feature per category (one-hot, in the listed order). `encode_rows` is the one encoder: training
encodes its CSV rows with it and the server its JSON rows, so both feed the model the same numbers. A model file
is untrusted: `features_problems` bounds every size before anything is allocated.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torchferry.contract import TorchferryError, is_number, short

if TYPE_CHECKING:
    import numpy as np

MAX_COLUMNS = 1024
MAX_CATEGORIES = 1000        # per categorical column
MAX_WIDTH = 16_384           # encoded features in all
MAX_NAME = 200               # characters of a column name or category
MAX_STAT = 1e12              # |mean| and std of a numeric column


class InputRefused(TorchferryError):
    """A row that does not fit the spec: an unknown or missing column, a wrong type, NaN or infinity."""


def width(spec: Mapping[str, Any]) -> int:
    """The encoded features of a (checked) spec: one per numeric column, one per category."""
    return sum(1 if c["kind"] == "numeric" else len(c["categories"]) for c in spec["columns"])


def feature_names(spec: Mapping[str, Any]) -> list[str]:
    """The name of each encoded feature: the column, or `column=category` for a one-hot feature."""
    names = []
    for c in spec["columns"]:
        names += [c["name"]] if c["kind"] == "numeric" else [f"{c['name']}={v}" for v in c["categories"]]
    return names


def _name_ok(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME


def _column_problems(i: int, col: Any) -> Iterator[str]:
    if not isinstance(col, dict) or not _name_ok(col.get("name")):
        yield f"features.columns[{i}] must be a mapping with a name (1 to {MAX_NAME} characters)"
        return
    name, kind = col["name"], col.get("kind")
    if kind == "numeric":
        mean, std = col.get("mean"), col.get("std")
        if not (is_number(mean) and math.isfinite(mean) and abs(mean) <= MAX_STAT):
            yield f"features column {short(name)}: mean must be a finite number, got {short(mean)}"
        if not (is_number(std) and math.isfinite(std) and 0 < std <= MAX_STAT):
            yield f"features column {short(name)}: std must be a positive finite number, got {short(std)}"
    elif kind == "categorical":
        cats = col.get("categories")
        if not (isinstance(cats, list) and 1 <= len(cats) <= MAX_CATEGORIES and all(_name_ok(v) for v in cats)
                and len(set(cats)) == len(cats)):
            yield (f"features column {short(name)}: categories must be 1 to {MAX_CATEGORIES} distinct names of 1 "
                   f"to {MAX_NAME} characters")
    else:
        yield f"features column {short(name)}: kind must be 'numeric' or 'categorical', got {short(kind)}"


def features_problems(spec: Any) -> Iterator[str]:
    """What is wrong with a `features` spec read from a file, first problem first (nothing when it is sound)."""
    if not isinstance(spec, dict):
        yield f"features must be a mapping, got {type(spec).__name__}"
        return
    columns, target = spec.get("columns"), spec.get("target")
    if not (isinstance(columns, list) and 1 <= len(columns) <= MAX_COLUMNS):
        yield f"features.columns must list 1 to {MAX_COLUMNS} columns"
        return
    if not _name_ok(target):
        yield f"features.target must name the predicted column (1 to {MAX_NAME} characters), got {short(target)}"
    for i, col in enumerate(columns):
        problems = list(_column_problems(i, col))
        if problems:
            yield problems[0]
            return
    names = [c["name"] for c in columns]
    if len(set(names)) != len(names) or target in names:
        yield "features.columns must have distinct names, none of them the target"
    elif width(spec) > MAX_WIDTH:
        yield f"features encode to {width(spec)} values; the limit is {MAX_WIDTH}"


def _number(value: Any, where: str) -> float:
    if not is_number(value):
        raise InputRefused(f"{where} must be a number, got {type(value).__name__} {short(value)}")
    try:
        number = float(value)
    except OverflowError:  # a JSON integer beyond float's range (10**400)
        raise InputRefused(f"{where} is too large") from None
    if not math.isfinite(number):
        raise InputRefused(f"{where} must be finite, not NaN or infinity")
    return number


def _category(value: Any, col: Mapping[str, Any], where: str, unknown: str) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # a category written as a number in the CSV ("3"), sent as 3
    if not isinstance(value, str):
        raise InputRefused(f"{where} must be a category (a string), got {type(value).__name__} {short(value)}")
    try:
        return col["categories"].index(value)
    except ValueError:
        if unknown == "zeros":
            return None
        known = ", ".join(repr(c) for c in col["categories"][:10])
        more = ", ..." if len(col["categories"]) > 10 else ""
        raise InputRefused(f"{where}: unknown category {short(value)}; the model knows {known}{more}") from None


def encode_rows(rows: Sequence[Any], spec: Mapping[str, Any], unknown: str = "error",
                with_target: bool = False) -> np.ndarray:
    """float32 [N, width] from rows (mappings of column name → number or category) by a checked spec.

    Every row must give every column and nothing else; numbers must be finite. Training's rows (`with_target`)
    also carry the target, and encode a category the spec does not list (`unknown="zeros"`: a validation row's)
    as all zeros instead of refusing it.
    """
    import numpy as np

    columns = spec["columns"]
    order = [c["name"] for c in columns]
    names = set(order) | ({spec["target"]} if with_target else set())
    out = np.zeros((len(rows), width(spec)), dtype=np.float32)
    for r, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise InputRefused(f"row {r} must be an object of column: value, got {type(row).__name__}")
        extra = [k for k in row if k not in names]
        if extra:
            what = " (the target, which the model predicts)" if extra[0] == spec.get("target") else ""
            more = ", ..." if len(order) > 20 else ""
            raise InputRefused(f"row {r}: unknown column {short(extra[0])}{what}; the model takes "
                               f"{', '.join(short(n) for n in order[:20])}{more}")
        j = 0
        for col in columns:
            where = f"row {r} column {short(col['name'])}"
            if col["name"] not in row or row[col["name"]] is None:
                raise InputRefused(f"{where} is missing; every row needs every column")
            value = row[col["name"]]
            if col["kind"] == "numeric":
                out[r, j] = (_number(value, where) - col["mean"]) / col["std"]
                j += 1
            else:
                hot = _category(value, col, where, unknown)
                if hot is not None:
                    out[r, j + hot] = 1.0
                j += len(col["categories"])
    return out


def fit_features(rows: Sequence[Mapping[str, Any]], kinds: Mapping[str, str], target: str) -> dict[str, Any]:
    """The `features` spec of training rows: each numeric column's mean and std (population; 1 where a column
    is constant), each categorical column's categories in sorted order. `kinds` maps column → kind, in order."""
    import numpy as np

    columns: list[dict[str, Any]] = []
    for name, kind in kinds.items():
        if kind == "numeric":
            values = np.asarray([float(r[name]) for r in rows], dtype=np.float64)
            std = float(values.std())
            columns.append({"name": name, "kind": "numeric", "mean": float(values.mean()),
                            "std": std if std > 0 and math.isfinite(std) else 1.0})
        else:
            columns.append({"name": name, "kind": "categorical", "categories": sorted({str(r[name]) for r in rows})})
    spec = {"columns": columns, "target": target}
    for problem in features_problems(spec):
        raise InputRefused(f"the table does not fit the tabular task: {problem}")
    return spec
