"""The tabular task's data: a CSV file (or scikit-learn's bundled diabetes set) read into a checked `TableSplit`.

`read_table(cfg)` reads `--data` (and `--val-data`), decides which columns are numeric (every value a number)
and which categorical (any other, or named by `--categorical`), splits off `--val-split` of the rows by
`--seed` when there is no validation file, and fits the `features` spec (standardisation, categories) on the
training rows only. The driver calls it before Ray starts, so bad data fails in seconds with one line; every
worker calls it again (it is deterministic).
"""

from __future__ import annotations

import csv
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any

from torchferry.distributed import TorchferryError
from torchferry.distributed.config import BUILTIN_TABLES, TrainConfig
from torchferry.distributed.discovery import csv_reader
from torchferry.inputs.tabular import MAX_COLUMNS, MAX_NAME, InputRefused, fit_features

Row = dict[str, Any]
MIN_ROWS = 4


@dataclass
class TableSplit:
    """Training and validation rows (numbers as floats, categories as strings), the column kinds and the
    `features` spec fitted on the training rows."""

    source: str
    target: str
    kinds: dict[str, str]
    train: list[Row]
    val: list[Row]
    features: dict[str, Any] = field(default_factory=dict)
    bad_images: list[tuple[str, str]] = field(default_factory=list)  # the image task's; a table has none

    def describe(self) -> str:
        """One line: rows, columns and target."""
        numeric = sum(k == "numeric" for k in self.kinds.values())
        return (f"{len(self.train)} training and {len(self.val)} validation rows of {self.source}: "
                f"{numeric} numeric and {len(self.kinds) - numeric} categorical columns, target {self.target!r}")


def read_csv(path: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of a CSV file; a TorchferryError naming the line for a ragged or unreadable file."""
    if not os.path.isfile(path):
        raise TorchferryError(f"--data {path!r} is not a file (a tabular run reads a CSV file or 'diabetes')")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv_reader(f)
            header = next(reader, None)
            if not header:
                raise TorchferryError(f"{path}: the file is empty; the first line must name the columns")
            header = [h.strip() for h in header]
            rows = []
            for line in reader:
                if not any(cell.strip() for cell in line):
                    continue
                if len(line) != len(header):
                    raise TorchferryError(f"{path} line {reader.line_num}: {len(line)} fields, the header names "
                                          f"{len(header)}")
                rows.append([cell.strip() for cell in line])
    except (UnicodeDecodeError, csv.Error) as exc:
        raise TorchferryError(f"{path}: not a readable UTF-8 CSV file ({str(exc)[:200]})") from None
    bad = [h for h in header if not 0 < len(h) <= MAX_NAME]
    if bad or len(set(header)) != len(header) or len(header) > MAX_COLUMNS + 1:
        raise TorchferryError(f"{path}: the header must name up to {MAX_COLUMNS + 1} distinct columns of 1 to "
                              f"{MAX_NAME} characters")
    return header, rows


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def column_kinds(header: list[str], rows: list[list[str]], target: str, categorical: list[str]) -> dict[str, str]:
    """Feature column → "numeric" or "categorical", in file order (the target left out)."""
    unknown = [c for c in categorical if c not in header]
    if unknown:
        raise TorchferryError(f"--categorical {unknown[0]!r} is not a column; the columns are {', '.join(header)}"[:400])
    if target in categorical:
        raise TorchferryError(f"--categorical {target!r} is the target; a regression target is a number")
    kinds = {}
    for j, name in enumerate(header):
        if name != target:
            numeric = name not in categorical and all(_is_number(r[j]) for r in rows)
            kinds[name] = "numeric" if numeric else "categorical"
    if not kinds:
        raise TorchferryError("the table has no column besides the target to predict it from")
    return kinds


def table_rows(header: list[str], rows: list[list[str]], kinds: dict[str, str], target: str, where: str) -> list[Row]:
    """Rows as mappings: numbers (finite) for numeric columns and the target, strings for categories."""
    out = []
    for i, cells in enumerate(rows):
        row: Row = {}
        for name, cell in zip(header, cells):
            if cell == "":
                raise TorchferryError(f"{where} row {i + 1}: column {name!r} is empty; fill in or drop the row")
            if name == target or kinds.get(name) == "numeric":
                value = float(cell) if _is_number(cell) else math.nan
                if not math.isfinite(value):
                    what = "the target" if name == target else f"numeric column {name!r}"
                    raise TorchferryError(f"{where} row {i + 1}: {what} is {cell[:40]!r}, not a finite number")
                row[name] = value
            else:
                row[name] = cell
        out.append(row)
    return out


def _diabetes() -> tuple[list[str], list[list[str]], str]:
    """scikit-learn's bundled diabetes set (442 patients, 10 measurements, progression after a year)."""
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes(scaled=False)
    header = [*bunch.feature_names, "target"]
    rows = [[repr(float(v)) for v in (*x, y)] for x, y in zip(bunch.data, bunch.target)]
    return header, rows, "target"


def split_rows(rows: list[Row], val_split: float, seed: int) -> tuple[list[Row], list[Row]]:
    """(training, validation): a shuffle by `seed`, `val_split` of the rows (at least one) held out."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(len(rows) * val_split)), len(rows) - 2)
    return [rows[i] for i in order[n_val:]], [rows[i] for i in order[:n_val]]


def read_table(cfg: TrainConfig) -> TableSplit:
    """`--data` (a CSV or 'diabetes') read, typed, split and fitted; a TorchferryError on bad data."""
    if cfg.data in BUILTIN_TABLES:
        header, cells, default_target = _diabetes()
        source = "scikit-learn's diabetes set"
    else:
        header, cells = read_csv(cfg.data)
        default_target, source = None, os.path.basename(cfg.data)
    target = cfg.target or default_target
    if target is None:
        raise TorchferryError(f"--data {cfg.data!r}: name the column to predict with --target")
    if target not in header:
        raise TorchferryError(f"--target {target!r} is not a column of {source}; the columns are "
                              f"{', '.join(header)}"[:400])
    val_cells = read_csv(cfg.val_data)[1] if cfg.val_data else []
    kinds = column_kinds(header, cells + val_cells, target, list(cfg.categorical))
    rows = table_rows(header, cells, kinds, target, source)
    if cfg.val_data:
        val_header, _ = read_csv(cfg.val_data)
        if val_header != header:
            raise TorchferryError(f"--val-data {cfg.val_data!r} has other columns than --data")
        train, val = rows, table_rows(header, val_cells, kinds, target, os.path.basename(cfg.val_data))
    else:
        if len(rows) < MIN_ROWS:
            raise TorchferryError(f"{source} has {len(rows)} rows; a regression needs at least {MIN_ROWS}")
        train, val = split_rows(rows, cfg.val_split, cfg.seed)
    if not val:
        raise TorchferryError(f"no validation rows in {cfg.val_data!r}")
    try:
        features = fit_features(train, kinds, target)
    except InputRefused as exc:
        raise TorchferryError(str(exc)) from None
    return TableSplit(source=source, target=target, kinds=kinds, train=train, val=val, features=features)
