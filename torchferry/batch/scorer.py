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


def load_proven(model: bytes, name: str, sha256: str, threads: int) -> Predictor:
    """A predictor on the model file's bytes (those the driver checked: `sha256`), proven on its golden inputs."""
    predictor = Predictor(name, threads, data=model)
    if predictor.info.task != "image":
        raise ModelRefused(f"{name} is a {predictor.info.task!r} model; python -m serve.batch scores image "
                           "classifiers (serve its task with python -m serve)")
    if predictor.info.sha256 != sha256:
        raise ModelRefused(f"{name} reached this worker as {predictor.info.sha256[:12]}…, not the {sha256[:12]}… "
                           "the driver checked")
    predictor.prove()
    return predictor


def score(predictor: Predictor, names: Sequence[str], blobs: Sequence[bytes], top_k: int,
          max_pixels: int) -> dict[str, list[Any]]:
    """Rows for encoded images: each file's top-`top_k` labels and scores, or the error the server gives it."""
    spec, inputs, scored, refused, codes, reasons = predictor.info.preprocess, [], [], [], [], []
    for name, data in zip(names, blobs):
        try:
            inputs.append(prepare(bytes(data), spec, max_pixels, name))
            scored.append(name)
            continue
        except HTTPError as exc:
            code, reason = exc.code, exc.message
        except Exception as exc:  # noqa: BLE001 - one file the server would answer 500 for; the run goes on
            code, reason = "failed", f"{name}: {type(exc).__name__}: {lead_line(exc)}"
        refused.append(name)
        codes.append(code)
        reasons.append(reason)
    rows = error_rows(refused, codes, reasons)
    if scored:
        answers = predictor.top_k(predictor.run(np.stack(inputs)), top_k)
        rows = {key: answer_rows(scored, answers)[key] + values for key, values in rows.items()}
    return rows


class Scorer:
    """Ray Data's callable class for `map_batches`: one proven predictor per actor, a batch of files → a table."""

    def __init__(self, model: list, name: str, sha256: str, threads: int, top_k: int, max_pixels: int,
                 prefix: str = ""):
        """`model`: [an ObjectRef of the model file's bytes], put once by the driver and read by every actor (held
        in a list, so Ray passes the reference rather than the bytes as a constructor argument)."""
        import ray

        self.predictor = load_proven(ray.get(model[0]), name, sha256, threads)
        self.top_k, self.max_pixels, self.prefix = top_k, max_pixels, prefix

    def __call__(self, batch: dict[str, np.ndarray]):
        """A batch of {"path", "bytes"} (Ray Data's read_binary_files) → a pyarrow table of rows, each file
        named as the output names it (`prefix` + its path on the file system: s3://bucket/key)."""
        names = [self.prefix + str(p) for p in batch["path"]]
        return rows_table(score(self.predictor, names, batch["bytes"], self.top_k, self.max_pixels))
