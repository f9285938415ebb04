"""The text task's data: a CSV of `text,label` rows read and checked, split, and turned into token-id tensors.

`read_text_csv` reads one file with the standard library's csv module (RFC 4180 quoting: a text may hold
commas, quotes and line breaks inside double quotes), as UTF-8 (a leading byte-order mark is skipped).
Blank lines are passed over; everything else that is wrong stops the run with one line naming the file and
line: no `text` or `label` column, a row with more or fewer fields than the header, an empty text or label,
bytes that are not UTF-8, a NUL byte, a field over the csv module's size limit. `text_split` holds out a
stratified validation part (`--val-split`, the same for the same `--seed`) unless `--val-data` names a
second file, and orders the classes as the image tasks do (numeric labels numerically).
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from torchferry.contract import classes_problem
from torchferry.distributed import TorchferryError
from torchferry.distributed.discovery import csv_reader, sort_labels, stratified_split

TextRow = tuple[str, int]


@dataclass
class TextSplit:
    """Class names in index order and the (text, class index) rows of each part."""

    classes: list[str]
    train: list[TextRow] = field(default_factory=list)
    val: list[TextRow] = field(default_factory=list)
    spec: dict[str, Any] = field(default_factory=dict)  # the `text` spec (torchferry.inputs.text), once built
    bad_images: list[tuple[str, str]] = field(default_factory=list)  # the image task's; texts have none

    def describe(self) -> str:
        """One line for the log: what was found."""
        return f"{len(self.classes)} classes, {len(self.train)} training and {len(self.val)} validation texts"


def _columns(reader: csv.DictReader, path: str) -> tuple[str, str]:
    names = {(c or "").strip().lower(): c for c in (reader.fieldnames or [])}
    if "text" not in names or "label" not in names:
        raise TorchferryError(f"{path}: a text CSV needs 'text' and 'label' columns in its header line, "
                              f"found {(reader.fieldnames or [])[:10]}")
    return names["text"], names["label"]


def _rows(reader: csv.DictReader, path: str) -> list[tuple[str, str, int]]:
    text_col, label_col = _columns(reader, path)
    width = len(reader.fieldnames or [])
    rows: list[tuple[str, str, int]] = []
    for row in reader:
        line = reader.line_num  # where the row ends (a quoted text may span lines)
        fields = width + len(row.get(None) or []) - sum(v is None for k, v in row.items() if k is not None)
        if fields != width:
            raise TorchferryError(f"{path}:{line}: {fields} fields where the header has {width}; a text with a "
                                  "comma must be in double quotes")
        text, label = row[text_col], row[label_col].strip()
        if "\x00" in text or "\x00" in label:
            raise TorchferryError(f"{path}:{line}: a NUL character; is this a text file?")
        if not text.strip() or not label:
            raise TorchferryError(f"{path}:{line}: empty {'text' if not text.strip() else 'label'}")
        rows.append((text, label, line))
    return rows


def read_text_csv(path: str) -> list[tuple[str, str, int]]:
    """(text, label, line number where the row ends) of every row of a `text,label` CSV; TorchferryError on the first bad one."""
    if not os.path.isfile(path):
        raise TorchferryError(f"text file {path!r} does not exist")
    reader = None
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv_reader(f, columns=True, strict=True)
            rows = _rows(reader, path)
    except UnicodeDecodeError as exc:
        line = f":{reader.line_num + 1}" if reader else ""
        raise TorchferryError(f"{path}{line}: not UTF-8 text ({exc.reason} at byte {exc.start} of a block); "
                              "save the file as UTF-8") from None
    except csv.Error as exc:
        line = f":{reader.line_num}" if reader else ""
        raise TorchferryError(f"{path}{line}: not a readable CSV ({exc})") from None
    if not rows:
        raise TorchferryError(f"{path}: no rows under the header")
    return rows


def _require_two_per_label(rows: list[tuple[str, str, int]], path: str, allow: bool) -> None:
    counts = Counter(label for _, label, _ in rows)
    small = sorted(label for label, n in counts.items() if n < 2)
    if small and not allow:
        first = {label: line for _, label, line in reversed(rows)}
        named = ", ".join(f"{label!r} ({path}:{first[label]})" for label in small[:3])
        raise TorchferryError(f"label(s) {named}{' ...' if len(small) > 3 else ''} with a single text: a mistyped "
                              "label? Fix the row, or pass --allow-small-classes to train such classes")


def text_split(path: str, *, val_path: str | None = None, val_split: float = 0.2, seed: int = 0,
               allow_small_classes: bool = False) -> TextSplit:
    """The checked TextSplit of a `text,label` CSV (and a validation CSV, when given)."""
    rows = read_text_csv(path)
    classes = sort_labels({label for _, label, _ in rows})
    if len(classes) < 2:
        raise TorchferryError(f"found {len(classes)} label(s) in {path!r}; a classifier needs at least 2")
    problem = classes_problem(classes)  # checked now, not when export, evaluate or --resume read the checkpoint
    if problem:
        raise TorchferryError(f"the labels of {path!r} cannot be a checkpoint's classes: {problem}")
    index = {name: i for i, name in enumerate(classes)}
    samples = [(text, index[label]) for text, label, _ in rows]
    if val_path is None:
        _require_two_per_label(rows, path, allow_small_classes)
        train, val = stratified_split(samples, val_split, seed)
    else:
        val_rows = read_text_csv(val_path)
        extra = [(label, line) for _, label, line in val_rows if label not in index]
        if extra:
            raise TorchferryError(f"{val_path}:{extra[0][1]}: label {extra[0][0]!r} does not occur in {path!r}")
        train, val = samples, [(text, index[label]) for text, label, _ in val_rows]
    return TextSplit(classes=classes, train=train, val=val)


def encoded_dataset(rows: list[TextRow], spec: dict[str, Any]) -> Any:
    """A TensorDataset of (int64 ids [max_length], label) for `rows`, encoded by `torchferry.inputs.text.Encoder`."""
    import torch
    from torch.utils.data import TensorDataset

    from torchferry.inputs.text import Encoder

    ids = Encoder(spec).encode(text for text, _ in rows)
    labels = torch.tensor([label for _, label in rows], dtype=torch.int64)
    return TensorDataset(torch.from_numpy(ids), labels)
