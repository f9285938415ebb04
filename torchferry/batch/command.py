"""`python -m serve.batch`: score a folder, a list file or a bucket of images with an exported model on Ray Data.

    python -m serve.batch --model runs/x/model.onnx --input photos/ --output scores/
    python -m serve.batch --model model.onnx --input s3://bucket/images/ --output scores/ --actors 8 --format csv

The driver checks and proves the model, lists the files and claims the output folder; Ray Data reads the
files, and an actor pool of `--actors` ONNX Runtime predictors (each proven on its golden inputs when it
starts, `--threads` CPU threads each) decodes, preprocesses and scores them with the server's own code; the
driver writes the answers as they come, part file by part file. A second run into the same folder scores
only the files it does not hold yet. Exit codes: 0 done (bad images are rows, not failures), 2 bad input
(a flag, the model, the input, the output folder), 1 Ray or a worker failed, 130 interrupted (the rows
answered so far are kept).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass

from torchferry.batch.output import FORMATS
from torchferry.batch.sources import IMAGE_EXTENSIONS
from torchferry.cli import Parser, add_debug_arguments, run_command
from torchferry.contract import TorchferryError
from torchferry.rayinit import ClusterUnavailable
from torchferry.serve.settings import ServeSettings

_logger = logging.getLogger(__name__)


class BatchFailed(Exception):
    """Ray or one of its workers failed while scoring; what was written so far stays and a rerun resumes."""


@dataclass
class BatchConfig:
    """One batch run, as the command line gives it."""

    model: str
    input: str
    output: str
    format: str = "parquet"
    top_k: int = 5
    actors: int | None = None  # one per Ray CPU ÷ threads
    threads: int = 1
    batch_size: int = 64
    rows_per_file: int = 10_000
    max_pixels: int = ServeSettings.max_pixels
    max_image_bytes: int = ServeSettings.max_upload_bytes
    max_input_bytes: int = ServeSettings.max_input_bytes
    ort_memory_bytes: int = ServeSettings.ort_memory_bytes
    extensions: str = ",".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
    address: str | None = None
    progress: str = "auto"
    verbose: bool = False
    debug: bool = False

    def check(self) -> None:
        """A TorchferryError naming the first flag whose value cannot work."""
        if self.format not in FORMATS:
            raise TorchferryError(f"--format {self.format!r}: choose one of {', '.join(FORMATS)}")
        actors = 1 if self.actors is None else self.actors
        for flag, value, low in (("--top-k", self.top_k, 1), ("--actors", actors, 1), ("--threads", self.threads, 1),
                                 ("--batch-size", self.batch_size, 1), ("--rows-per-file", self.rows_per_file, 1),
                                 ("--max-pixels", self.max_pixels, 8), ("--max-image-bytes", self.max_image_bytes, 1),
                                 ("--max-input-bytes", self.max_input_bytes, 1),
                                 ("--ort-memory-bytes", self.ort_memory_bytes, 0)):
            if value < low:
                raise TorchferryError(f"{flag} {value} cannot work; it must be {low} or more")

    @property
    def extension_list(self) -> tuple[str, ...]:
        """The file extensions a folder is read for, lower case with their dot; () for every file."""
        if self.extensions.strip() in ("", "*"):
            return ()
        return tuple(f".{e.strip().lower().lstrip('.')}" for e in self.extensions.split(",") if e.strip())


def get_args_parser() -> argparse.ArgumentParser:
    """The command line of `python -m serve.batch`."""
    d = BatchConfig("", "", "")
    p = Parser(prog="python -m serve.batch", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the exported model.onnx (proven before anything is read)")
    p.add_argument("--input", required=True, help="a folder or bucket prefix (s3://, gs://, file://) whose image "
                   "files are scored, or a list file with one path or URI a line (relative to the list's folder)")
    p.add_argument("--output", required=True, help="the output folder: new, empty, or one an earlier run of the "
                   "same model wrote (its rows are kept and their files skipped)")
    p.add_argument("--format", choices=FORMATS, default=d.format, help=f"part file format (default: {d.format})")
    p.add_argument("--top-k", type=int, default=d.top_k, help="labels and scores per image; at most the model's "
                   f"classes (default: {d.top_k})")
    g = p.add_argument_group("Ray")
    g.add_argument("--actors", type=int, default=d.actors, help="predictor actors, each with --threads CPUs "
                   "(default: as many as the Ray cluster's CPUs hold)")
    g.add_argument("--threads", type=int, default=d.threads, help="CPU threads (and Ray CPUs) per actor "
                   f"(default: {d.threads})")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"images per ONNX Runtime call (default: "
                   f"{d.batch_size})")
    g.add_argument("--address", default=None, help="join this Ray cluster (default: $RAY_ADDRESS, else a local "
                   "Ray on 127.0.0.1 only)")
    g = p.add_argument_group("limits and output")
    g.add_argument("--max-pixels", type=int, default=d.max_pixels, help="largest image, width × height, as the "
                   f"server's (default: {d.max_pixels:,})")
    g.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes, help="largest file, as the server's "
                   f"largest request (default: {d.max_image_bytes:,})")
    g.add_argument("--max-input-bytes", type=int, default=d.max_input_bytes, help="largest model input of one ONNX "
                   "Runtime call, as the server's request: fewer images than --batch-size for a model whose inputs "
                   f"are large, at least one (default: {d.max_input_bytes:,})")
    g.add_argument("--ort-memory-bytes", type=int, default=d.ort_memory_bytes, help="most CPU memory ONNX Runtime "
                   "may hold for the tensors it computes, in each actor and in the driver's proof, as the server's "
                   "TORCHFERRY_ORT_MEMORY_BYTES: an image past it is a row with the error model_memory_exhausted "
                   f"(0: no limit; default: {d.ort_memory_bytes:,})")
    g.add_argument("--extensions", default=d.extensions, help="file extensions read from a folder; '*' for every "
                   f"file (default: {d.extensions})")
    g.add_argument("--rows-per-file", type=int, default=d.rows_per_file, help="rows per part file: at most this "
                   f"many answers are lost when a run is stopped (default: {d.rows_per_file:,})")
    g.add_argument("--progress", choices=("auto", "on", "off"), default=d.progress, help="progress bar; auto "
                   "shows it on an interactive terminal (default: auto)")
    add_debug_arguments(g, verbose="more log output, Ray's included")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, score the images, print the summary; the exit code."""
    from torchferry.batch.run import run_batch

    cfg = BatchConfig(**vars(get_args_parser().parse_args(argv)))
    logging.basicConfig(level=logging.DEBUG if cfg.verbose else logging.INFO, format="%(message)s")

    def body() -> int:
        cfg.check()
        print(run_batch(cfg).line(), flush=True)
        return 0

    try:
        return run_command(body, debug=cfg.debug, failures=(BatchFailed, ClusterUnavailable))
    except KeyboardInterrupt:
        print(f"interrupted: the rows answered so far are in {os.path.abspath(cfg.output)}; run the same command "
              "again to score the rest", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
