"""A batch run on the driver: prove the model, list the files, claim the output folder, then let a Ray Data actor
pool read and score what the folder does not hold yet, writing the answers part file by part file.

The dataset is the paths to score, in blocks; `map_batches` with the callable class `Scorer` runs `--actors`
actors, each loading the model once (the bytes the driver read and checked, so every node scores the same
file), proving it before its first batch, and reading its files through the input's pyarrow file system (local,
s3://, gs://). The driver only gathers the small answer rows and writes them; it never reads an image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from torchferry.batch.command import BatchConfig, BatchFailed
from torchferry.batch.output import OutputFolder, error_rows, rows_table
from torchferry.batch.scorer import Scorer, load_proven
from torchferry.batch.sources import Entry, Source, resolve
from torchferry.cli import lead_line
from torchferry.contract import TorchferryError
from torchferry.files import atomic_write_bytes
from torchferry.rayinit import join_or_start_ray, shutdown_ray
from torchferry.serve.predictor import read_model_file

_logger = logging.getLogger(__name__)
READ_BATCHES = 4  # batches of --batch-size files per block of paths (and so per actor task)
BAD_LINES = 20  # bad files named one by one in the log; the rest are in the output's error column


@dataclass
class Summary:
    """What a run did: files found, answered this run (scored or bad, by error code), skipped, and how fast."""

    files: int
    skipped: int
    scored: int = 0
    bad: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    first_rows_s: float = 0.0  # from the pipeline's start to its first answers (actors started and proven)
    first_rows: int = 0
    output: str = ""
    ray_started: bool = False

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())

    @property
    def images_per_s(self) -> float:
        """Files answered this run per second of scoring (from the pipeline's start to its last row)."""
        done = self.scored + self.bad_total
        return done / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_s(self) -> float:
        """Files answered per second once the first answers came: the pool's pace, its start-up left out."""
        rest, seconds = self.scored + self.bad_total - self.first_rows, self.seconds - self.first_rows_s
        return rest / seconds if rest > 0 and seconds > 0 else 0.0

    def line(self) -> str:
        """The one-line summary the command prints (the pace after the first answers when there were others)."""
        bad = ", ".join(f"{code} {n}" for code, n in sorted(self.bad.items()))
        done = self.scored + self.bad_total
        steady = (f"{self.steady_images_per_s:.1f} img/s after the first answers at {self.first_rows_s:.1f} s"
                  if done > self.first_rows else f"all in the first answers, at {self.first_rows_s:.1f} s")
        pace = f"{self.images_per_s:.1f} img/s over {self.seconds:.1f} s ({steady})" if done else "nothing to score"
        return (f"batch: {self.files} files: {self.scored} scored, {self.bad_total} bad"
                + (f" ({bad})" if bad else "") + f", {self.skipped} skipped (already in the output); "
                f"{pace}; output {self.output}")


def split_entries(source: Source, done: set[str], max_bytes: int) -> tuple[list[Entry], list[Entry], dict]:
    """(already in the output, to score, error rows for files refused unread: missing, or over `max_bytes`)."""
    skipped, todo, refused = [], [], []
    for entry in source.entries:
        shown = source.shown(entry.path)
        if shown in done:
            skipped.append(entry)
        elif entry.size is None:
            refused.append((shown, "not_found", f"{shown}: no such file"))
        elif entry.size > max_bytes:
            refused.append((shown, "too_large", f"{shown}: {entry.size} bytes is over the limit of {max_bytes} bytes"))
        else:
            todo.append(entry)
    names, codes, reasons = (list(column) for column in zip(*refused)) if refused else ([], [], [])
    return skipped, todo, error_rows(names, codes, reasons)


class Tally:
    """The driver's side of the pipeline: buffers answer tables into part files, counts, logs bad files."""

    def __init__(self, out: OutputFolder, rows_per_file: int, summary: Summary, bar=None):
        self.out, self.rows_per_file, self.summary, self.bar = out, rows_per_file, summary, bar
        self.pending: list = []
        self.pending_rows, self.seen, self.bad_logged = 0, set(), 0

    def add(self, table) -> None:
        """Count one table of rows and write a part file once enough rows wait."""
        if table.num_rows == 0:
            return
        errors, paths = table.column("error").to_pylist(), table.column("path").to_pylist()
        self.seen.update(paths)
        bad = Counter(e for e in errors if e is not None)
        self.summary.scored += len(errors) - sum(bad.values())
        for code, n in bad.items():
            self.summary.bad[code] = self.summary.bad.get(code, 0) + n
        for reason in (r for r in table.column("reason").to_pylist() if r is not None):
            if self.bad_logged < BAD_LINES:
                _logger.warning("bad image: %s", reason)
            self.bad_logged += 1
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.bar is not None:
            self.bar.update(table.num_rows)
        while self.pending_rows >= self.rows_per_file:
            self.flush(self.rows_per_file)

    def flush(self, rows: int | None = None) -> None:
        """Write `rows` of what waits (all of it by default) as one part file: whole rows only, so a stopped run
        keeps them."""
        import pyarrow as pa

        if self.pending:
            table = pa.concat_tables(self.pending)
            rows = table.num_rows if rows is None else rows
            self.out.write(table.slice(0, rows))
            rest = table.slice(rows)
            self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows


def progress_bar(cfg: BatchConfig, total: int):
    """A tqdm bar on stderr when asked for (auto: on an interactive terminal), else None."""
    if cfg.progress == "off" or (cfg.progress == "auto" and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="scoring", unit="img", file=sys.stderr)


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data's own progress bars and execution log only with --verbose (the command draws its own bar)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.enable_auto_log_stats = verbose
    # No thread per task polling the actor's memory for Ray Data's memory statistics: the scorer's memory per
    # batch is bounded by --batch-size and the server's pixel limit, and on 2 cores every thread takes CPU.
    ctx.memory_usage_poll_interval_s = None
    if not verbose:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"


def pool_size(cfg: BatchConfig) -> int:
    """`--actors`, or as many actors as the cluster's CPUs hold; refused when the cluster cannot place them (the
    pool would wait for CPUs forever)."""
    import ray

    have = int(ray.cluster_resources().get("CPU", 0))
    actors = cfg.actors or max(1, have // cfg.threads)
    if actors * cfg.threads > have:
        raise TorchferryError(f"{actors} actor(s) × --threads {cfg.threads} need {actors * cfg.threads} CPUs but the "
                              f"Ray cluster has {have}; lower --actors or --threads")
    return actors


def score_on_ray(cfg: BatchConfig, source: Source, todo: list[Entry], model: tuple[bytes, str, int], tally: Tally):
    """Score `todo` in Ray Data's actor pool (each actor reads its files), every answer table into `tally`."""
    import ray.data

    data, sha256, top_k = model
    quiet_ray_data(cfg.verbose)
    # The dataset holds the paths, in blocks of READ_BATCHES batches (at least two blocks an actor): an actor's task
    # reads and scores its block batch by batch, so Ray's cost per task is shared by several ONNX Runtime calls.
    actors = pool_size(cfg)
    blocks = max(min(len(todo), 2 * actors), -(-len(todo) // (READ_BATCHES * cfg.batch_size)))
    # from_items builds the blocks of paths here; from_arrow would run a Ray task per block just to read their
    # metadata (a worker process started and Ray Data imported, on the same 2 cores as the actors).
    ds = ray.data.from_items([{"path": e.path} for e in todo], override_num_blocks=blocks)
    scorer = {"model": [ray.put(data)], "name": os.path.basename(cfg.model), "sha256": sha256,
              "threads": cfg.threads, "top_k": top_k, "max_pixels": cfg.max_pixels, "fs": source.fs,
              "prefix": source.prefix, "max_bytes": cfg.max_image_bytes,
              "max_input_bytes": cfg.max_input_bytes, "memory_cap": cfg.ort_memory_bytes}
    ds = ds.map_batches(Scorer, batch_size=cfg.batch_size, batch_format="numpy", num_cpus=cfg.threads,
                        compute=ray.data.ActorPoolStrategy(size=actors), fn_constructor_kwargs=scorer)
    started = time.perf_counter()
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
        if not tally.summary.first_rows:
            tally.summary.first_rows_s, tally.summary.first_rows = time.perf_counter() - started, table.num_rows
        tally.add(table)


# A local Ray started for a batch run shares the machine with the actors, so it gathers no usage statistics either
# (rayinit.local_ray_settings already turns metrics collection off for every local Ray). Unless the environment
# sets it.
LEAN_LOCAL_RAY = {"RAY_USAGE_STATS_ENABLED": "0"}


def lean_local_ray(address: str | None) -> None:
    """LEAN_LOCAL_RAY into the environment when this run starts its own Ray (no --address, no $RAY_ADDRESS)."""
    if not (address or os.environ.get("RAY_ADDRESS")):
        for key, value in LEAN_LOCAL_RAY.items():
            os.environ.setdefault(key, value)


def _score(cfg: BatchConfig, source: Source, todo: list[Entry], model: tuple[bytes, str, int], tally: Tally) -> float:
    """Start or join Ray, score `todo`, record files that vanished since the listing; seconds of scoring."""
    lean_local_ray(cfg.address)
    started_here = join_or_start_ray(cfg.address, cfg.verbose)
    try:
        started = time.perf_counter()
        try:
            score_on_ray(cfg, source, todo, model, tally)
        except TorchferryError:
            raise
        except Exception as exc:  # Ray's errors: a worker or actor died, the model failed on a node ...
            raise BatchFailed(f"scoring failed: {lead_line(exc)}; the rows written so far stay in {tally.out.path} "
                              "and a rerun scores the rest") from exc
        gone = [source.shown(e.path) for e in todo if source.shown(e.path) not in tally.seen]
        tally.add(rows_table(error_rows(gone, ["not_found"] * len(gone), [f"{g}: gone before it was read"
                                                                          for g in gone])))
        return time.perf_counter() - started
    finally:
        if started_here:
            shutdown_ray()


def _write_summary(out: OutputFolder, summary: Summary) -> None:
    """The run's summary beside its rows, as JSON (`_summary.json`, left out by table readers)."""
    record = {**asdict(summary), "bad_total": summary.bad_total, "images_per_s": summary.images_per_s,
              "steady_images_per_s": summary.steady_images_per_s,
              "parts_written": [os.path.basename(p) for p in out.written]}
    atomic_write_bytes(os.path.join(out.path, "_summary.json"), (json.dumps(record, indent=2) + "\n").encode())


def run_batch(cfg: BatchConfig) -> Summary:
    """Score every file of `cfg.input` that `cfg.output` does not hold yet; the summary of the run."""
    data = read_model_file(cfg.model)
    predictor = load_proven(data, cfg.model, hashlib.sha256(data).hexdigest(), cfg.threads, cfg.max_input_bytes,
                            cfg.ort_memory_bytes)
    sha256, top_k = predictor.info.sha256, min(cfg.top_k, len(predictor.info.classes))
    source = resolve(cfg.input, cfg.extension_list)
    if not source.entries:
        kinds = ", ".join(cfg.extension_list) or "any"
        raise TorchferryError(f"--input {cfg.input!r} holds no image files (extensions: {kinds}); check the path "
                              "or --extensions")
    out = OutputFolder(cfg.output, cfg.format, {"model_sha256": sha256, "top_k": top_k, "output_format": cfg.format,
                                                "model": os.path.abspath(cfg.model)})
    skipped, todo, refused = split_entries(source, out.open(), cfg.max_image_bytes)
    summary = Summary(files=len(source.entries), skipped=len(skipped), output=out.path)
    tally = Tally(out, cfg.rows_per_file, summary, progress_bar(cfg, len(todo)) if todo else None)
    try:
        tally.add(rows_table(refused))
        if todo:
            summary.ray_started = True
            summary.seconds = _score(cfg, source, todo, (data, sha256, top_k), tally)
    finally:
        tally.flush()  # whole rows only: what a stopped run answered is kept, and a rerun skips it
        if tally.bar is not None:
            tally.bar.close()
    _write_summary(out, summary)
    return summary
