"""Batch prediction: `python -m serve.batch` on Ray Data with 2 actors against the in-process predictor in a loop,
on the same image files on the same machine, as a ratio of images per second.

    python -m bench.batch [--quick] [--images N] [--rounds N] [--models smallcnn,resnet18]

Both sides do the same work per file: read it, decode and preprocess it with the server's `prepare`, run ONNX
Runtime on batches of 64 and take the top 5 (`torchferry.batch.scorer.score`). The loop is one process; Ray Data
runs `--actors 2` actors of 1 ORT thread each. The loop is measured with 1 ORT thread (one actor's share: the
scaling figure the target reads) and with ORT's own thread count (all cores). The command's figure is its own
summary's steady pace: files answered after its first answers, per second after them (the loop, too, is timed
once its model is loaded and proven); the pipeline's whole img/s (actors' start-up and proof included) and the
command's wall time (Ray's start-up included) are reported beside it.
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
METHOD = ("alternating rounds, the best of each side: the same JPEG files (320×240) scored by the in-process predictor in a loop (read, the server's prepare, "
          "ONNX Runtime on batches of 64, top 5; one process, 1 ORT thread, and ORT's own thread count) and by "
          "python -m serve.batch with 2 actors of 1 thread each (its summary's steady img/s: files answered after "
          "the first answers over the seconds after them, as the loop is timed after its model is loaded and proven; "
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


def loop(model: str, paths: list[Path], threads: int) -> float:
    """Images per second of the in-process predictor in a loop: read, prepare, score batches of 64."""
    from torchferry.batch.scorer import load_proven, score
    from torchferry.serve.predictor import read_model_file

    data = read_model_file(model)
    predictor = load_proven(data, model, __import__("hashlib").sha256(data).hexdigest(), threads)
    started = time.perf_counter()
    for start in range(0, len(paths), BATCH):
        chunk = paths[start:start + BATCH]
        score(predictor, [str(p) for p in chunk], [p.read_bytes() for p in chunk], 5, 40_000_000)
    return len(paths) / (time.perf_counter() - started)


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


def measure(arch: str, count: int, tmp: Path, rounds: int) -> dict[str, Any]:
    """One model: `rounds` alternating rounds of the loop (1 thread, ORT's own) and the command with 2 actors; the
    best of each side (the machine is shared: the best round is the one least disturbed), every round kept."""
    model = make_model(arch, tmp)
    paths = sorted((tmp / "images").rglob("*.jpg"))
    load_before, each = os.getloadavg()[0], []
    for _ in range(rounds):
        one, own = loop(model, paths, 1), loop(model, paths, 0)
        each.append({"loop_1_thread_img_s": one, "loop_ort_threads_img_s": own, **command(model, tmp, 2),
                     "load_average": os.getloadavg()[0]})
    one, own = max(r["loop_1_thread_img_s"] for r in each), max(r["loop_ort_threads_img_s"] for r in each)
    ray = max(each, key=lambda r: r["img_s"])
    row = {"model": arch, "images": count, "rounds": each, "loop_1_thread_img_s": one, "loop_ort_threads_img_s": own,
           "ray_2_actors_img_s": ray["img_s"], "ray_pipeline_img_s": ray["pipeline_img_s"],
           "ray_pipeline_s": ray["pipeline_s"], "ray_first_rows_s": ray["first_rows_s"],
           "ray_command_wall_s": ray["wall_s"],
           "ray_over_loop_1_thread": ray["img_s"] / one, "ray_over_loop_ort_threads": ray["img_s"] / own,
           "load_average_before": load_before, "load_average_after": os.getloadavg()[0]}
    print(f"{arch}: loop 1 thread {one:.1f} img/s, loop ORT threads {own:.1f} img/s, serve.batch 2 actors "
          f"{ray['img_s']:.1f} img/s ({row['ray_over_loop_1_thread']:.2f}x, {row['ray_over_loop_ort_threads']:.2f}x); "
          f"command wall {ray['wall_s']:.1f} s (best of {rounds} round(s))", flush=True)
    return row


def render(b: dict[str, Any]) -> list[str]:
    """The RESULTS.md section for a batch result."""
    out = ["## Batch prediction (CPU)", "", b["method"][0].upper() + b["method"][1:] + ".", "",
           ("| model | images | loop, 1 thread img/s | loop, ORT threads img/s | serve.batch, 2 actors img/s | "
            "vs loop 1 thread | vs loop ORT threads | pipeline img/s (first answers at s) | command wall s | "
            "load average |"), "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in b["rows"]:
        out.append(f"| {r['model']} | {r['images']} | {r['loop_1_thread_img_s']:.1f} | "
                   f"{r['loop_ort_threads_img_s']:.1f} | {r['ray_2_actors_img_s']:.1f} | "
                   f"{r['ray_over_loop_1_thread']:.2f}x | {r['ray_over_loop_ort_threads']:.2f}x | "
                   f"{r['ray_pipeline_img_s']:.1f} ({r['ray_first_rows_s']:.1f}) | {r['ray_command_wall_s']:.1f} | "
                   f"{r['load_average_before']:.1f} |")
    return [*out, ""]


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
    result = {**result_header("batch"), "machine": machine_info("onnxruntime", "ray"), "rows": rows,
              "method": METHOD}
    write_result(result, Path(args.out) if args.out else result_path("batch"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
