"""Training throughput, side by side: a plain PyTorch loop, torchrun DDP, and torchferry on Ray Train.

    python -m bench.train_throughput [--quick] [--models smallcnn,resnet18] [--workers 1,2]

For each model: (a) `python -m bench.plain_train` in one process, (b) the same script under `torchrun` with N
processes (DDP over gloo), (c) `python -m distributed.launch --gpus 0 --workers N` — the same data files
and transform objects, the same batch size per worker, the same torch threads per process (the cores
divided by N) and DataLoader processes per worker. Steady-state images/s is the median over the epochs
after the first (the first pays for DataLoader start-up and allocator warm-up); start-up is reported
separately: the command's wall time minus the time its epochs took. Prints (c)/(b) and (c)/(a).
Results go to bench/results/<date>-<host>-train.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import machine_info, repo_env, result_header, result_path, show, write_result

SETUPS = {  # model: input flags common to every runner
    "smallcnn": [],
    "resnet18": ["--image-size", "64", "--channels", "3"],
}
BATCH_PER_WORKER = 64


def subset_of_digits(root: str, fraction: float, cache: str) -> str:
    """Every k-th digit image of each class, copied into ROOT/<class>/: a smaller set with the same classes."""
    from torchferry.distributed.data import materialize_digits

    source = materialize_digits(cache)
    step = max(1, round(1 / fraction))
    for cls in sorted(os.listdir(source)):
        if not os.path.isdir(os.path.join(source, cls)):
            continue
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for name in sorted(os.listdir(os.path.join(source, cls)))[::step]:
            shutil.copyfile(os.path.join(source, cls, name), os.path.join(root, cls, name))
    return root


def _data_flags(model: str, data: str) -> list[str]:
    return ["--data", data, *SETUPS[model]]


def _steady(rates: list[float]) -> float:
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def run_plain(model: str, data: str, world: int, torchrun: bool, epochs: int, loader_workers: int, cores: int,
              env: dict[str, str], tmp: str) -> dict[str, Any]:
    out = os.path.join(tmp, f"plain-{model}-{world}-{int(torchrun)}-{time.monotonic_ns()}.json")
    threads = max(1, cores // world)
    script = ["-m", "bench.plain_train", "--model", model, *_data_flags(model, data),
              "--batch-size", str(BATCH_PER_WORKER), "--epochs", str(epochs), "--num-workers", str(loader_workers),
              "--threads", str(threads), "--out", out]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), *script]
    else:
        cmd = [sys.executable, *script]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=repo_env(env, OMP_NUM_THREADS=str(threads)),
                          cwd=tmp, check=False, timeout=1800)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(Path(out).read_text())
    rates = [e["images_per_s"] for e in result["epochs"]]
    return {"runner": f"torchrun x{world}" if torchrun else "plain loop", "workers": world, "threads": threads,
            "img_s": _steady(rates), "img_s_epochs": rates, "wall_s": wall,
            "startup_s": wall - sum(e["seconds"] for e in result["epochs"]),
            "val_acc": result["epochs"][-1]["val_acc"], "command": show(cmd)}


def run_torchferry(model: str, data: str, world: int, epochs: int, loader_workers: int, cores: int,
                   env: dict[str, str], tmp: str, variant: dict[str, str] | None = None) -> dict[str, Any]:
    name = f"tf-{model}-{world}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "distributed.launch", "--gpus", "0", "--workers", str(world),
           "--cpus-per-worker", str(max(1, cores // world)), "--model", model, *_data_flags(model, data),
           "--batch-size", str(BATCH_PER_WORKER * world), "--epochs", str(epochs), "--lr", "0.05",
           "--num-workers", str(loader_workers), "--output-dir", os.path.join(tmp, "runs"), "--name", name,
           "--progress", "off"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=repo_env(env, **(variant or {})), cwd=tmp,
                          check=False, timeout=1800)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(tmp, "runs", name, "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    rates = [float(r["images_per_s"]) for r in rows]
    label = f" ({' '.join(f'{k}={v}' for k, v in variant.items())})" if variant else ""
    return {"runner": f"torchferry Ray x{world}{label}", "workers": world, "threads": max(1, cores // world),
            "img_s": _steady(rates), "img_s_epochs": rates, "wall_s": wall,
            "startup_s": wall - sum(float(r["seconds"]) for r in rows), "val_acc": float(rows[-1]["val_acc"]),
            "command": show(cmd)}


def bench_model(model: str, worlds: list[int], epochs: int, reps: int, fraction: float, loader_workers: int,
                cores: int, env: dict[str, str], variant: dict[str, str] | None = None) -> dict[str, Any]:
    """Plain loop once, then for each N: torchrun and torchferry alternately, `reps` times each (and torchferry
    with the environment `variant`, when given, after each)."""
    with tempfile.TemporaryDirectory(prefix="tf-bench-") as tmp:
        data = "digits" if fraction >= 1 else subset_of_digits(os.path.join(tmp, "data"), fraction,
                                                                 env["TORCHFERRY_CACHE"])
        runs = [run_plain(model, data, 1, False, epochs, loader_workers, cores, env, tmp)]
        print(_line(model, runs[-1]), flush=True)
        for world in worlds:
            for _ in range(reps):
                runs.append(run_plain(model, data, world, True, epochs, loader_workers, cores, env, tmp))
                print(_line(model, runs[-1]), flush=True)
                runs.append(run_torchferry(model, data, world, epochs, loader_workers, cores, env, tmp))
                print(_line(model, runs[-1]), flush=True)
                if variant:
                    runs.append(run_torchferry(model, data, world, epochs, loader_workers, cores, env, tmp, variant))
                    print(_line(model, runs[-1]), flush=True)
    plain = runs[0]["img_s"]
    summary = {}
    for world in worlds:
        tr = statistics.median(r["img_s"] for r in runs if r["runner"] == f"torchrun x{world}")
        tf = statistics.median(r["img_s"] for r in runs if r["runner"] == f"torchferry Ray x{world}")
        summary[f"N={world}"] = {
            "torchrun_img_s": tr, "torchferry_img_s": tf, "torchferry_over_torchrun": tf / tr,
            "torchferry_over_plain": tf / plain,
            "torchrun_startup_s": statistics.median(r["startup_s"] for r in runs if r["runner"] == f"torchrun x{world}"),
            "torchferry_startup_s": statistics.median(r["startup_s"] for r in runs
                                                      if r["runner"] == f"torchferry Ray x{world}")}
        print(f"{model:<9} N={world}: torchferry/torchrun {tf / tr:.3f}x   torchferry/plain {tf / plain:.3f}x",
              flush=True)
        other = [r for r in runs if r["workers"] == world and r["runner"].startswith("torchferry Ray") and "(" in r["runner"]]
        if other:
            v = statistics.median(r["img_s"] for r in other)
            summary[f"N={world}"].update({"variant": other[0]["runner"], "variant_img_s": v,
                                          "variant_over_torchrun": v / tr,
                                          "variant_startup_s": statistics.median(r["startup_s"] for r in other)})
            print(f"{model:<9} N={world}: {other[0]['runner']}/torchrun {v / tr:.3f}x", flush=True)
    return {"model": model, "data": "digits" if fraction >= 1 else f"digits, 1 image in {round(1 / fraction)}",
            "input_flags": SETUPS[model], "batch_per_worker": BATCH_PER_WORKER, "epochs": epochs, "reps": reps,
            "loader_workers": loader_workers, "plain_img_s": plain, "summary": summary, "runs": runs}


def _line(model: str, run: dict[str, Any]) -> str:
    epochs = ", ".join(f"{r:.0f}" for r in run["img_s_epochs"])
    return (f"{model:<9} {run['runner']:<20} {run['img_s']:7.1f} img/s  (epochs {epochs})  "
            f"start-up {run['startup_s']:5.1f} s  val_acc {run['val_acc']:.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 epochs, one run each; resnet18 on a third of digits "
                   "and N=2 only (about 4 minutes on 2 cores)")
    p.add_argument("--resnet-data-fraction", type=float, default=None, help="resnet18 trains on this fraction of "
                   "digits (default: 1; --quick: 1/3)")
    p.add_argument("--models", default=",".join(SETUPS), help=f"comma-separated of {', '.join(SETUPS)}")
    p.add_argument("--workers", default="1,2", help="worker counts N (default: 1,2)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: 5; --quick: 3)")
    p.add_argument("--reps", type=int, default=None, help="runs of each N for torchrun and torchferry, alternating "
                   "(default: 3; --quick: 1)")
    p.add_argument("--loader-workers", type=int, default=1, help="DataLoader processes per worker (default: 1)")
    p.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE",
                   help="also run torchferry with this environment variable, interleaved (repeatable; e.g. "
                        "RAY_worker_niceness=15)")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/<date>-<host>-train.json)")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    epochs = args.epochs or (3 if args.quick else 5)
    env = {**os.environ, "TORCHFERRY_CACHE": os.environ.get("TORCHFERRY_CACHE", os.path.join(
        tempfile.gettempdir(), "torchferry-bench-cache"))}
    reps = args.reps or (1 if args.quick else 3)
    worlds = [int(w) for w in args.workers.split(",")]
    # --quick: resnet18 on a third of digits and at N=2 only, so that run_all --quick fits in 10 minutes here.
    fraction = args.resnet_data_fraction or (1 / 3 if args.quick else 1.0)
    models = [bench_model(m, worlds if not (args.quick and m != "smallcnn") else [w for w in worlds if w > 1] or worlds,
                          epochs, reps, fraction if m != "smallcnn" else 1.0, args.loader_workers, cores, env,
                          dict(v.split("=", 1) for v in args.variant))
              for m in args.models.split(",")]
    result = {**result_header("train"), "machine": machine_info("torch"),
              "method": "steady-state training images/s (median over epochs 2..E of each run, the training phase "
                        "only; median over the alternating runs), start-up = wall time minus the epochs' time; same data, transforms, batch per "
                        "worker, threads per process (cores / N) and DataLoader processes for every runner",
              "models": models}
    write_result(result, Path(args.out) if args.out else result_path("train"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
