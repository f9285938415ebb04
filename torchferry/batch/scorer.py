"""The work of one Ray Data actor: the server's predictor, loaded and proven once, scoring batches of files.

Each file is decoded and preprocessed by `torchferry.serve.images.prepare`, the function the server's `/predict`
calls, with the same pixel limit, and its answer is the predictor's own `top_k`: a batch run and the server
give the same labels and scores for the same bytes. A file the server would refuse is a row with the server's
error code and message, never a failed run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from torchferry.batch.output import answer_rows, error_rows, rows_table
from torchferry.cli import lead_line
from torchferry.serve.errors import HTTPError
from torchferry.serve.images import prepare
from torchferry.serve.predictor import ModelRefused, Predictor
from torchferry.serve.settings import ServeSettings


def load_proven(model: bytes, name: str, sha256: str, threads: int,
                max_input_bytes: int = ServeSettings.max_input_bytes, memory_cap: int = 0) -> Predictor:
    """A predictor on the model file's bytes (those the driver checked: `sha256`), proven on its golden inputs;
    ONNX Runtime's tensors in this process take at most `memory_cap` bytes (`capped_arena`; 0: no cap)."""
    predictor = Predictor(name, threads, data=model, memory_cap=memory_cap, memory_setting="--ort-memory-bytes")
    if predictor.info.task != "image":
        raise ModelRefused(f"{name} is a {predictor.info.task!r} model; python -m serve.batch scores image "
                           "classifiers (serve its task with python -m serve)")
    if predictor.info.sha256 != sha256:
        raise ModelRefused(f"{name} reached this worker as {predictor.info.sha256[:12]}…, not the {sha256[:12]}… "
                           "the driver checked")
    predictor.prove(max_input_bytes)
    return predictor


def score(predictor: Predictor, names: Sequence[str], blobs: Sequence[bytes], top_k: int, max_pixels: int,
          max_input_bytes: int = ServeSettings.max_input_bytes) -> dict[str, list[Any]]:
    """Rows for encoded images: each file's top-`top_k` labels and scores, or the error the server gives it. The
    images go to ONNX Runtime in runs of at most `max_input_bytes` of model input (at least one image), as the
    server's requests do: the model file chooses its input size."""
    spec, inputs, scored, answers, refused = predictor.info.preprocess, [], [], [], ([], [], [])
    run = predictor.items_per_request(max(len(names), 1), max_input_bytes)
    for i, (name, data) in enumerate(zip(names, blobs)):
        try:
            inputs.append(prepare(bytes(data), spec, max_pixels, name))
            scored.append(name)
        except HTTPError as exc:
            error = (name, exc.code, exc.message)
        except Exception as exc:  # noqa: BLE001 - one file the server would answer 500 for; the run goes on
            error = (name, "failed", f"{name}: {type(exc).__name__}: {lead_line(exc)}")
        else:
            error = None
        for column, value in zip(refused, error or ()):
            column.append(value)
        if len(inputs) == run or (inputs and i == len(names) - 1):
            got = _answers(predictor, inputs, scored[len(answers):], top_k, refused)
            if got is None:  # past the memory cap at this size: the rest go an image at a time
                run = 1
                got = [a for j, one in enumerate(inputs)
                       for a in _answers(predictor, [one], scored[len(answers) + j:len(answers) + j + 1], top_k,
                                         refused) or ()]
            answers += got
            inputs = []
    kept = [(name, answer) for name, answer in zip(scored, answers) if answer is not None]
    rows = error_rows(*refused)
    if kept:
        answered = answer_rows([name for name, _ in kept], [answer for _, answer in kept])
        rows = {key: answered[key] + values for key, values in rows.items()}
    return rows


def _answers(predictor: Predictor, inputs: list[np.ndarray], names: Sequence[str], top_k: int,
             refused: tuple[list, list, list]) -> list[dict[str, Any] | None] | None:
    """The answers for one run of inputs; None when a run of several is past ONNX Runtime's memory cap (run them
    again one at a time). An image that does not fit alone is a refused row (None in its place), as the server
    answers it 503."""
    try:
        return predictor.top_k(predictor.run(np.stack(inputs)), top_k)
    except HTTPError as exc:
        if len(inputs) > 1:
            return None
        reason = (f"{names[0]}: ONNX Runtime needs more memory for this image than the "
                  f"{predictor.memory_cap / 2**20:g} MiB it may hold (--ort-memory-bytes)")
        for column, value in zip(refused, (names[0], exc.code, reason)):
            column.append(value)
        return [None]


def read_files(fs, paths: Sequence[str], prefix: str, max_bytes: int) -> tuple[list[str], list[bytes], dict]:
    """(names, bytes) of the files at `paths` on the pyarrow file system `fs`, and error rows for those that cannot
    be read or have grown past `max_bytes` since the driver listed them (each read stops there)."""
    names, blobs, refused = [], [], ([], [], [])
    for path in paths:
        name = prefix + path
        try:
            with fs.open_input_file(path) as f:
                size = f.size()
                data = f.read(max_bytes + 1)
        except FileNotFoundError:
            code, reason = "not_found", f"{name}: gone before it was read"
        except OSError as exc:  # permissions, a bucket's refusal, a network error: this file's, not the run's
            code, reason = "unreadable", f"{name}: {lead_line(exc)}"
        else:
            if len(data) <= max_bytes:
                names.append(name)
                blobs.append(data)
                continue
            code, reason = "too_large", f"{name}: {size} bytes is over the limit of {max_bytes} bytes"
        for column, value in zip(refused, (name, code, reason)):
            column.append(value)
    return names, blobs, error_rows(*refused)


class Scorer:
    """Ray Data's callable class for `map_batches`: one proven predictor per actor; a batch of paths is read
    through the input's pyarrow file system, decoded and scored into a table of rows.

    The actor reads its own files: on 2 cores a separate read stage (`read_binary_files`: read tasks, every
    file's bytes through the object store) left the actors about half the throughput (bench.batch)."""

    def __init__(self, model: list, name: str, sha256: str, threads: int, top_k: int, max_pixels: int,
                 fs, prefix: str = "", max_bytes: int = 1 << 24, max_input_bytes: int = ServeSettings.max_input_bytes,
                 memory_cap: int = 0):
        """`model`: [an ObjectRef of the model file's bytes], put once by the driver and read by every actor (held
        in a list, so Ray passes the reference rather than the bytes as a constructor argument)."""
        import ray

        self.predictor = load_proven(ray.get(model[0]), name, sha256, threads, max_input_bytes, memory_cap)
        self.top_k, self.max_pixels, self.fs, self.prefix, self.max_bytes = top_k, max_pixels, fs, prefix, max_bytes
        self.max_input_bytes = max_input_bytes

    def __call__(self, batch: dict[str, np.ndarray]):
        """A batch of {"path"} → a pyarrow table of rows, each file named as the output names it (`prefix` + its
        path on the file system: s3://bucket/key)."""
        names, blobs, refused = read_files(self.fs, [str(p) for p in batch["path"]], self.prefix, self.max_bytes)
        rows = score(self.predictor, names, blobs, self.top_k, self.max_pixels, self.max_input_bytes)
        return rows_table({key: values + refused[key] for key, values in rows.items()})
