"""A batch run's output folder: part files of rows (Parquet or CSV), each written whole or not at all, and a
manifest that ties the folder to one model and one top-k, so a resumed run never mixes two.

Row columns: `path`; `label` and `score` (the best class and its softmax probability); `labels` and `scores`
(the top k, best first; JSON lists in CSV); `error` and `reason` (the server's error code and message for a
file it would refuse, else empty). Readers that skip names starting with "." or "_" (pyarrow, pandas, Spark,
Ray Data) read the folder as one table: part files are `part-<run>-<n>.<format>`, the manifest `_batch.json`,
and a part being written is a hidden temporary file renamed into place once complete.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import time
from collections.abc import Sequence
from typing import Any

from torchferry.contract import TorchferryError
from torchferry.files import atomic_write_bytes

FORMATS = ("parquet", "csv")
MANIFEST, MANIFEST_FORMAT = "_batch.json", "torchferry.batch/1"
COLUMNS = ("path", "label", "score", "labels", "scores", "error", "reason")
# What a resumed run must share with the run that wrote the folder.
IDENTITY = ("model_sha256", "top_k", "output_format")


def schema():
    """The rows' pyarrow schema."""
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("label", pa.string()), ("score", pa.float64()),
                      ("labels", pa.list_(pa.string())), ("scores", pa.list_(pa.float64())),
                      ("error", pa.string()), ("reason", pa.string())])


def answer_rows(names: Sequence[str], answers: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """Rows for scored files from the predictor's `top_k` answers, in order."""
    return {"path": list(names), "label": [a["label"] for a in answers], "score": [a["score"] for a in answers],
            "labels": [[t["label"] for t in a["top_k"]] for a in answers],
            "scores": [[t["score"] for t in a["top_k"]] for a in answers],
            "error": [None] * len(names), "reason": [None] * len(names)}


def error_rows(names: Sequence[str], codes: Sequence[str], reasons: Sequence[str]) -> dict[str, list[Any]]:
    """Rows for files that were not scored: the error code and the message saying why."""
    empty = [None] * len(names)
    return {"path": list(names), "label": empty, "score": empty, "labels": empty, "scores": empty,
            "error": list(codes), "reason": list(reasons)}


def rows_table(rows: dict[str, list[Any]]):
    """Rows (column → values) as a pyarrow table of the output schema."""
    import pyarrow as pa

    return pa.table(rows, schema=schema())


def encode_part(table, fmt: str) -> bytes:
    """A table as the bytes of one Parquet or CSV file (CSV: the top-k lists as JSON)."""
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, sink)
    else:
        import pyarrow.csv as pacsv

        lists = {name: [None if v is None else json.dumps(v) for v in table.column(name).to_pylist()]
                 for name in ("labels", "scores")}
        flat = table.set_column(3, "labels", pa.array(lists["labels"], pa.string()))
        pacsv.write_csv(flat.set_column(4, "scores", pa.array(lists["scores"], pa.string())), sink)
    return sink.getvalue().to_pybytes()


def read_paths(path: str, fmt: str) -> list[str]:
    """The `path` column of one part file."""
    import pyarrow as pa

    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path, columns=["path"]).column("path").to_pylist()
    import pyarrow.csv as pacsv

    options = pacsv.ConvertOptions(include_columns=["path"], column_types={"path": pa.string()})
    with open(path, "rb") as f:
        return pacsv.read_csv(io.BytesIO(f.read()), convert_options=options).column("path").to_pylist()


class OutputFolder:
    """The output folder of a run: checked and claimed by `open()`, then filled part by part by `write()`."""

    def __init__(self, path: str, fmt: str, identity: dict[str, Any]):
        self.path, self.fmt, self.identity = os.path.abspath(path), fmt, identity
        self.run = time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)
        self.written: list[str] = []

    def parts(self) -> list[str]:
        """The part files already in the folder, by name."""
        return sorted(n for n in os.listdir(self.path) if n.startswith("part-") and n.endswith(f".{self.fmt}"))

    def open(self) -> set[str]:
        """Check the folder (new, empty, or one a run of this model and top-k wrote), write the manifest; the
        paths its part files already hold (which this run skips)."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise TorchferryError(f"--output {self.path} is a file; give a folder (new, or one a batch run wrote)")
        manifest = os.path.join(self.path, MANIFEST)
        if os.path.isdir(self.path) and os.listdir(self.path) and not os.path.isfile(manifest):
            raise TorchferryError(f"--output {self.path} holds other files and no {MANIFEST}; give a new or empty "
                                  "folder, or one a batch run wrote")
        if os.path.isfile(manifest):
            self._check_manifest(manifest)
        try:
            os.makedirs(self.path, exist_ok=True)
            atomic_write_bytes(manifest, (json.dumps({"format": MANIFEST_FORMAT, **self.identity}, indent=2)
                                          + "\n").encode())
        except OSError as exc:
            raise TorchferryError(f"cannot write to --output {self.path}: {exc.strerror or exc}") from None
        done: set[str] = set()
        for name in self.parts():
            try:
                done.update(read_paths(os.path.join(self.path, name), self.fmt))
            except Exception as exc:  # noqa: BLE001 - pyarrow's errors for a damaged file
                raise TorchferryError(f"{os.path.join(self.path, name)} cannot be read ({type(exc).__name__}); "
                                      "remove it to score its images again") from None
        return done

    def _check_manifest(self, manifest: str) -> None:
        try:
            with open(manifest, encoding="utf-8") as f:
                recorded = json.load(f)
        except (OSError, ValueError) as exc:
            raise TorchferryError(f"{manifest} cannot be read ({exc}); give a new --output folder") from None
        if not isinstance(recorded, dict) or recorded.get("format") != MANIFEST_FORMAT:
            raise TorchferryError(f"{manifest} is not a {MANIFEST_FORMAT} manifest; give a new --output folder")
        differ = [f"{key} {recorded.get(key)!r} (this run: {self.identity[key]!r})" for key in IDENTITY
                  if recorded.get(key) != self.identity[key]]
        if differ:
            raise TorchferryError(f"--output {self.path} was written with {', '.join(differ)}; resume with the "
                                  "same model, --top-k and --format, or give a new --output folder")

    def write(self, table) -> str:
        """One part file of `table`'s rows, renamed into place once complete; its path."""
        path = os.path.join(self.path, f"part-{self.run}-{len(self.written):05d}.{self.fmt}")
        atomic_write_bytes(path, encode_part(table, self.fmt))
        self.written.append(path)
        return path
