"""Batch prediction: `python -m serve.batch` on Ray Data with 2 actors against the in-process predictor in a loop,
on the same image files on the same machine, as a ratio of images per second.

    python -m bench.batch [--quick] [--images N] [--rounds N] [--models smallcnn,resnet18]
    nice -n -5 python -m bench.batch --quick        # on a machine other programs share (the JSON records it)

Every side does the same work per file: read it, decode and preprocess it with the server's `prepare`, run ONNX
Runtime on batches of 64 and take the top 5 (`torchferry.batch.scorer.score`). The loop is one process; Ray Data
runs `--actors 2` actors of 1 ORT thread each. The loop is measured with 1 ORT thread (one actor's share: the
scaling figure the target reads) and with ORT's own thread count (all cores); 2 plain processes
(multiprocessing, 1 ORT thread each, half the files each) show what two processes can do on this machine with no
scheduler at all: the ceiling for the actors. The target (TARGET, ≥ 1.6x) reads the command's steady pace over
the loop's: files answered after its first answers, per second after them, against the loop timed once its model
is loaded and proven (the best round of each side). The pipeline's whole img/s (actors' start-up and proof
included) and the command's wall time (Ray's start-up included) are reported beside it, as is every round.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, machine_info, repo_env, result_header, result_path, show, write_result
from bench.load import make_images, make_model

BATCH = 64
TARGET = 1.6  # serve.batch with 2 actors over the loop on 1 ORT thread, on 2 cores (issue 18)
TARGET_KEY = "ray_over_loop_1_thread"  # the row's field the target reads (bench.run_all reads the same)
METHOD = ("alternating rounds, the best of each side: the same JPEG files (320×240) scored by the in-process "
          "predictor in a loop (read, the server's prepare, ONNX Runtime on batches of 64, top 5; one process, 1 ORT "
          "thread, and ORT's own thread count), by 2 plain processes running the loop's code on half the files each "
          "(the ceiling for 2 actors on this machine), and by python -m serve.batch with 2 actors of 1 thread each "
          "(its summary's steady img/s: files answered after the first answers over the seconds after them, as the "
          "loop is timed after its model is loaded and proven; the target reads this over the loop on 1 thread; "
          "the pipeline's img/s from its start, actors started and proven included, and the command's wall time, "
          "Ray's start included, are reported beside it)")


def write_files(folder: Path, count: int) -> list[Path]:
    """`count` photo-sized JPEGs (320×240, 16 distinct images repeated) under `folder`."""
    images = make_images(folder / "seed")
    paths = []
    for i in range(count):
        path = folder / "images" / f"{i % 10}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(images[i % len(images)])
        paths.append(path)
    shutil.rmtree(folder / "seed")
    return paths


def _proven(model: str, threads: int):
    """The predictor a batch actor loads: the model file's bytes, checked and proven on its golden inputs."""
    import hashlib

    from torchferry.batch.scorer import load_proven
    from torchferry.serve.predictor import read_model_file

    data = read_model_file(model)
    return load_proven(data, model, hashlib.sha256(data).hexdigest(), threads)


def _score_files(predictor, paths: list[Path]) -> None:
    """What one actor does with its files, in batches of BATCH: read, the server's prepare, ONNX Runtime, top 5."""
    from torchferry.batch.scorer import score

    for start in range(0, len(paths), BATCH):
        chunk = paths[start:start + BATCH]
        score(predictor, [str(p) for p in chunk], [p.read_bytes() for p in chunk], 5, 40_000_000)


def loop(model: str, paths: list[Path], threads: int) -> float:
    """Images per second of the in-process predictor in a loop: read, prepare, score batches of 64."""
    predictor = _proven(model, threads)
    started = time.perf_counter()
    _score_files(predictor, paths)
    return len(paths) / (time.perf_counter() - started)


def _plain_worker(model: str, paths: list[Path], ready, finished) -> None:
    """One of `plain`'s processes: load and prove the model, wait for the others, score its share."""
    predictor = _proven(model, 1)
    ready.wait()
    _score_files(predictor, paths)
    finished.put(len(paths))


def plain(model: str, paths: list[Path], workers: int) -> float:
    """Images per second of `workers` plain processes (multiprocessing, 1 ORT thread each) scoring a share of the
    files each with the loop's code, timed from when all have their model proven: what `workers` processes can
    do on this machine with no scheduler at all, the ceiling for serve.batch's actors."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ready, finished = ctx.Barrier(workers + 1), ctx.Queue()
    shares = [paths[i::workers] for i in range(workers)]
    procs = [ctx.Process(target=_plain_worker, args=(model, share, ready, finished)) for share in shares]
    for proc in procs:
        proc.start()
    try:
        ready.wait(timeout=300)
        started = time.perf_counter()
        done = sum(finished.get(timeout=600) for _ in procs)
        seconds = time.perf_counter() - started
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    return done / seconds


def command(model: str, folder: Path, actors: int) -> dict[str, Any]:
    """`python -m serve.batch` into a fresh output folder; its summary and wall seconds."""
    out = folder / f"out-{actors}"
    cmd = [sys.executable, "-m", "serve.batch", "--model", model, "--input", str(folder / "images"), "--output",
           str(out), "--actors", str(actors), "--threads", "1", "--batch-size", str(BATCH), "--progress", "off"]
    print("$ " + show(cmd), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=repo_env(), check=True)
    wall = time.perf_counter() - started
    summary = json.loads((out / "_summary.json").read_text())
    shutil.rmtree(out)
    return {"img_s": summary["steady_images_per_s"], "pipeline_img_s": summary["images_per_s"],
            "pipeline_s": summary["seconds"], "first_rows_s": summary["first_rows_s"], "wall_s": wall,
            "images": summary["scored"] + summary["bad_total"]}


def one_round(model: str, paths: list[Path], tmp: Path) -> dict[str, Any]:
    """The four sides one after another on the same files: the loop on 1 ORT thread and on ORT's own thread
    count, 2 plain processes, and the command with 2 actors; the load average after each."""
    row: dict[str, Any] = {"loop_1_thread_img_s": loop(model, paths, 1), "load_after_loop": os.getloadavg()[0],
                           "loop_ort_threads_img_s": loop(model, paths, 0)}
    row.update(plain_2_processes_img_s=plain(model, paths, 2), load_after_plain=os.getloadavg()[0])
    row.update(command(model, tmp, 2))
    row.update(load_average=os.getloadavg()[0], ray_over_loop_1_thread=row["img_s"] / row["loop_1_thread_img_s"],
               plain_over_loop_1_thread=row["plain_2_processes_img_s"] / row["loop_1_thread_img_s"])
    return row


def measure(arch: str, count: int, tmp: Path, rounds: int) -> dict[str, Any]:
    """One model: `rounds` alternating rounds of every side; the best of each side (the machine is shared: the best
    round is the one least disturbed), every round kept with its own ratios."""
    model = make_model(arch, tmp)
    paths = sorted((tmp / "images").rglob("*.jpg"))
    load_before = os.getloadavg()[0]
    each = [one_round(model, paths, tmp) for _ in range(rounds)]
    one, own = max(r["loop_1_thread_img_s"] for r in each), max(r["loop_ort_threads_img_s"] for r in each)
    ideal = max(r["plain_2_processes_img_s"] for r in each)
    ray = max(each, key=lambda r: r["img_s"])
    row = {"model": arch, "images": count, "rounds": each, "loop_1_thread_img_s": one, "loop_ort_threads_img_s": own,
           "plain_2_processes_img_s": ideal, "ray_2_actors_img_s": ray["img_s"],
           "ray_pipeline_img_s": ray["pipeline_img_s"], "ray_pipeline_s": ray["pipeline_s"],
           "ray_first_rows_s": ray["first_rows_s"], "ray_command_wall_s": ray["wall_s"],
           "ray_command_img_s": ray["images"] / ray["wall_s"],
           "ray_over_loop_1_thread": ray["img_s"] / one, "ray_over_loop_ort_threads": ray["img_s"] / own,
           "plain_over_loop_1_thread": ideal / one, "ray_over_plain": ray["img_s"] / ideal,
           "ray_pipeline_over_loop_1_thread": ray["pipeline_img_s"] / one,
           "load_average_before": load_before, "load_average_after": os.getloadavg()[0]}
    print(summary_line(row), flush=True)
    return row


def target_ratio(row: dict[str, Any]) -> float:
    """The figure the target reads: serve.batch's steady img/s over the loop's on 1 ORT thread (best of each)."""
    return row[TARGET_KEY]


def summary_line(row: dict[str, Any]) -> str:
    """One model's figures in a line, the target's verdict included."""
    ratio = target_ratio(row)
    verdict = "met" if ratio >= TARGET else f"short by {100 * (1 - ratio / TARGET):.1f} %"
    return (f"{row['model']}: loop 1 thread {row['loop_1_thread_img_s']:.1f} img/s, loop ORT threads "
            f"{row['loop_ort_threads_img_s']:.1f} img/s, 2 plain processes {row['plain_2_processes_img_s']:.1f} img/s "
            f"({row['plain_over_loop_1_thread']:.2f}x), serve.batch 2 actors {row['ray_2_actors_img_s']:.1f} img/s "
            f"({ratio:.2f}x the loop: target {TARGET:g}x {verdict}; {row['ray_over_plain']:.2f}x the plain "
            f"processes; {row['ray_pipeline_over_loop_1_thread']:.2f}x counting the actors' start); command wall "
            f"{row['ray_command_wall_s']:.1f} s; per round "
            + ", ".join(f"{r['ray_over_loop_1_thread']:.2f}x" for r in row["rounds"])
            + f"; load average {row['load_average_before']:.1f} before, {row['load_average_after']:.1f} after")


def render(b: dict[str, Any]) -> list[str]:
    """The RESULTS.md section for a batch result."""
    out = ["## Batch prediction (CPU)", "", b["method"][0].upper() + b["method"][1:] + ".", "",
           ("| model | images | loop, 1 thread img/s | loop, ORT threads img/s | serve.batch, 2 actors img/s | "
            "vs loop 1 thread | vs loop ORT threads | pipeline img/s (first answers at s) | command wall s | "
            "load average | 2 plain processes img/s (vs loop 1 thread) | serve.batch vs 2 plain processes |"),
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in b["rows"]:
        out.append(f"| {r['model']} | {r['images']} | {r['loop_1_thread_img_s']:.1f} | "
                   f"{r['loop_ort_threads_img_s']:.1f} | {r['ray_2_actors_img_s']:.1f} | "
                   f"{r['ray_over_loop_1_thread']:.2f}x | {r['ray_over_loop_ort_threads']:.2f}x | "
                   f"{r['ray_pipeline_img_s']:.1f} ({r['ray_first_rows_s']:.1f}) | {r['ray_command_wall_s']:.1f} | "
                   f"{r['load_average_before']:.1f} | {_plain_cell(r)} |")
    return [*out, ""]


def _plain_cell(r: dict[str, Any]) -> str:
    """The plain processes' cells (results before they were measured have none)."""
    if "plain_2_processes_img_s" not in r:
        return "– | –"
    return (f"{r['plain_2_processes_img_s']:.1f} ({r['plain_over_loop_1_thread']:.2f}x) | "
            f"{r['ray_over_plain']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer images (default: 10,000 quick, 30,000 otherwise)")
    p.add_argument("--images", type=int, default=None, help="image files to score (overrides --quick's count)")
    p.add_argument("--models", default="smallcnn", help="models, comma-separated: smallcnn (32 px, decoding "
                   "dominates), resnet18 (224 px, inference dominates; slow on 2 cores) (default: smallcnn)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds, the best of each side reported "
                   "(default: 2 quick, 3 otherwise)")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/<date>-<host>-batch.json)")
    args = p.parse_args(argv)
    count = args.images or (10_000 if args.quick else 30_000)
    models = args.models.split(",")
    with tempfile.TemporaryDirectory(prefix="tf-bench-batch-") as name:
        tmp = Path(name)
        write_files(tmp, count)
        rows = [measure(arch, count, tmp, args.rounds or (2 if args.quick else 3)) for arch in models]
    result = {**result_header("batch"), "machine": machine_info("onnxruntime", "ray", niceness=os.nice(0)), "rows": rows,
              "method": METHOD}
    write_result(result, Path(args.out) if args.out else result_path("batch"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
