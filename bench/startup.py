"""Start-up and shut-down, broken down: torchferry's command beside torchrun and a bare Ray TorchTrainer.

    python -m bench.startup [--rounds 3] [--epochs 1] [--out PATH]

Every round runs each of these once, one after another, so that other load on the machine falls on
each alike (smallcnn on digits, 2 CPU workers of 1 thread and 1 DataLoader process each, batch 64 per
worker, as bench.train_throughput):

- torchferry: `python -m distributed.launch --gpus 0 --workers 2 ...`;
- torchrun: `torchrun --standalone --nproc-per-node 2 -m bench.plain_train ...`, the same work by hand;
- bare Ray: `python -m bench.startup --bare`: ray.init and a TorchTrainer of 2 workers whose function
  does nothing; what is left is Ray's own floor (local Ray, Train controller, worker processes, gloo);
- `python -m distributed.launch --help`.

Each process appends timestamps to the file named by $TORCHFERRY_TIMELINE (torchferry.distributed.timeline;
the Ray workers inherit it); the command's start and exit are taken here. Reported: each phase's median
seconds over the rounds, command → first step, end of the last epoch → exit, the niceness of every process of a
run, and the CPU-seconds its processes used before the first step, by kind of process (read from /proc every
0.5 s while it runs): on a machine of few cores the start is CPU-bound, and that CPU divided by the cores is the
least time any schedule of the same work could take. Writes bench/results/<date>-<host>-startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import machine_info, repo_env, result_header, result_path, show, write_result

BATCH_PER_WORKER = 64
WORKERS = 2
# (phase, from event, to event): consecutive points of one run; a worker event counts when its last rank gets there.
PHASES = {
    "torchferry": [
        ("interpreter and driver imports", "command", "driver_main"),
        ("flags and data check", "driver_main", "data_checked"),
        ("model build and forward-pass check (imports torch)", "data_checked", "model_checked"),
        ("run folder", "model_checked", "ray_init"),
        ("ray.init (local Ray)", "ray_init", "ray_ready"),
        ("Ray Train imports, TorchTrainer, event queue", "ray_ready", "fit_called"),
        ("Train controller until the worker processes exist", "fit_called", "worker_process"),
        ("worker imports, process group, train_func", "worker_process", "worker_entry"),
        ("worker: data and loaders", "worker_entry", "loaders_built"),
        ("worker: model, DDP, optimizer", "loaders_built", "model_built"),
        ("worker: DataLoader processes, first batch, first step", "model_built", "first_step"),
        ("training", "first_step", "last_epoch_end"),
        ("Ray Train winds down (workers, controller)", "last_epoch_end", "fit_returned"),
        ("best.pth and metrics.csv", "fit_returned", "best_written"),
        ("driver until ray.shutdown", "best_written", "ray_shutdown"),
        ("ray.shutdown, the pictures drawn meanwhile", "ray_shutdown", "ray_shutdown_done"),
        ("the pictures' rest after ray.shutdown (curves.png, val_predictions.png)", "ray_shutdown_done",
         "pictures_done"),
        ("interpreter exit", "pictures_done", "exit"),
    ],
    "torchrun": [
        ("torchrun agent until the worker processes exist", "command", "worker_process"),
        ("worker imports", "worker_process", "worker_entry"),
        ("process group", "worker_entry", "pg_ready"),
        ("data and loaders", "pg_ready", "loaders_built"),
        ("model, DDP, optimizer", "loaders_built", "model_built"),
        ("DataLoader processes, first batch, first step", "model_built", "first_step"),
        ("training", "first_step", "last_epoch_end"),
        ("process group teardown and exit", "last_epoch_end", "exit"),
    ],
    "bare Ray": [
        ("interpreter and imports", "command", "driver_main"),
        ("ray.init (local Ray)", "driver_main", "ray_ready"),
        ("TorchTrainer", "ray_ready", "fit_called"),
        ("Train controller until the worker processes exist", "fit_called", "worker_process"),
        ("worker imports, process group, train_func", "worker_process", "worker_entry"),
        ("Ray Train winds down (workers, controller)", "last_epoch_end", "fit_returned"),
        ("ray.shutdown", "ray_shutdown", "ray_shutdown_done"),
        ("interpreter exit", "ray_shutdown_done", "exit"),
    ],
}
TARGETS = {"command_to_first_step_s": 12.0, "last_epoch_end_to_exit_s": 3.0, "help_s": 1.0}


def points(lines: list[dict[str, Any]], start: float, end: float) -> dict[str, float]:
    """Each event's time in seconds after the command started (a worker event: its last rank's)."""
    out = {"command": 0.0, "exit": end - start}
    for line in lines:
        out[line["event"]] = max(out.get(line["event"], -1e9), line["t"] - start)
        if line.get("process_started") is not None:
            out["worker_process"] = max(out.get("worker_process", -1e9), line["process_started"] - start)
    return out


def breakdown(runner: str, at: dict[str, float]) -> dict[str, float]:
    """Seconds per phase; a point earlier than the one before it (a worker process Ray started in advance)
    counts as reached then, so the phases add up to the whole."""
    phases, last = {}, 0.0
    for name, a, b in PHASES[runner]:
        if a in at and b in at:
            begin = max(at[a], last) if a != "command" else 0.0
            phases[name] = max(at[b], begin) - begin
            last = max(at[b], begin)
    return phases


def _summary(at: dict[str, float]) -> dict[str, float | None]:
    first = at.get("first_step", at.get("worker_entry"))
    end = at.get("last_epoch_end")
    return {"command_to_first_step_s": first, "last_epoch_end_to_exit_s": at["exit"] - end if end is not None else None,
            "wall_s": at["exit"]}


class ProcessProbe(threading.Thread):
    """Every 0.5 s, reads from /proc the niceness, the command and the CPU time so far of every process whose
    environment carries this run's timeline path (every process of a run inherits it: Ray's GCS, raylet and
    workers, torchrun's agent and workers, the DataLoader processes)."""

    def __init__(self, marker: str):
        super().__init__(daemon=True)
        self.marker, self.seen, self.stopping = marker.encode(), {}, threading.Event()
        self.tick = os.sysconf("SC_CLK_TCK")

    def run(self) -> None:
        while not self.stopping.wait(0.5):
            now = time.time()
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    if self.marker not in Path(f"/proc/{pid}/environ").read_bytes():
                        continue
                    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                seen = self.seen.setdefault(pid, {"samples": []})
                seen.update(nice=int(stat[16]), command=_short(cmd))  # fields 19 and 14-15 of proc(5)
                seen["samples"].append((now, (int(stat[11]) + int(stat[12])) / self.tick))

    def cpu_until(self, t: float) -> dict[str, float]:
        """CPU-seconds each kind of process had used by wall-clock time `t` (its last sample then; a process that
        ended in between counts up to its last sample, at most 0.5 s short)."""
        out: dict[str, float] = {}
        for p in self.seen.values():
            before = [cpu for when, cpu in p["samples"] if when <= t]
            if before:
                out[p["command"]] = out.get(p["command"], 0.0) + before[-1]
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _short(cmd: str) -> str:
    for key in ("ray::", "raylet", "gcs_server", "log_monitor", "monitor.py", "dashboard", "runtime_env",
                "distributed.launch", "torch.distributed.run", "bench.plain_train", "bench.startup"):
        if key in cmd:  # a Ray worker by its actor class: ray::TrainController.run -> ray::TrainController
            return cmd[cmd.index(key):].split()[0].split(".")[0][:60] if key == "ray::" else key
    return cmd[:60]


def _niceness_table(seen: dict[str, dict[str, Any]]) -> dict[str, list[int]]:
    table: dict[str, list[int]] = {}
    for p in seen.values():
        table.setdefault(p["command"], []).append(p["nice"])
    return {k: sorted(v) for k, v in sorted(table.items())}


def command(runner: str, data: str, epochs: int, tmp: str) -> list[str]:
    if runner.startswith("torchferry"):
        return [sys.executable, "-m", "distributed.launch", "--gpus", "0", "--workers", str(WORKERS),
                "--cpus-per-worker", "1", "--model", "smallcnn", "--data", data,
                "--batch-size", str(BATCH_PER_WORKER * WORKERS), "--epochs", str(epochs), "--lr", "0.05",
                "--num-workers", "1", "--output-dir", os.path.join(tmp, "runs"),
                "--name", f"startup-{time.monotonic_ns()}", "--progress", "off"]
    if runner == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORKERS),
                "-m", "bench.plain_train", "--model", "smallcnn", "--data", data, "--batch-size", str(BATCH_PER_WORKER),
                "--epochs", str(epochs), "--num-workers", "1", "--threads", "1",
                "--out", os.path.join(tmp, f"plain-{time.monotonic_ns()}.json")]
    if runner == "bare Ray":
        return [sys.executable, "-m", "bench.startup", "--bare"]
    return [sys.executable, "-m", "distributed.launch", "--help"]


def run_once(runner: str, data: str, epochs: int, tmp: str, env: dict[str, str]) -> dict[str, Any]:
    """One run of `runner` with its timeline: points, phases, the summary, the niceness seen and the CPU used
    before the first step.

    "torchferry baseline" is torchferry from the checkout in $BENCH_BASELINE (another commit, for before/after).
    """
    timeline = os.path.join(tmp, f"timeline-{time.monotonic_ns()}.jsonl")
    cmd = command(runner, data, epochs, tmp)
    if runner == "torchferry baseline":
        env = {**env, "PYTHONPATH": env["BENCH_BASELINE"]}
    probe = ProcessProbe(timeline) if runner != "--help" else None
    if probe:
        probe.start()
    start = time.time()
    proc = subprocess.run(cmd, cwd=tmp, env={**env, "TORCHFERRY_TIMELINE": timeline, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=900, check=False)
    end = time.time()
    if probe:
        probe.stopping.set()
        probe.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{show(cmd)} failed:\n{proc.stderr[-3000:]}")
    if runner == "--help":
        return {"runner": runner, "command": show(cmd), "help_s": end - start}
    lines = [json.loads(x) for x in Path(timeline).read_text().splitlines()] if os.path.exists(timeline) else []
    at = points(lines, start, end)
    phases = breakdown("torchferry" if runner.startswith("torchferry") else runner, at)
    row = {"runner": runner, "command": show(cmd), "points": at, "phases": phases, **_summary(at)}
    if probe:
        row["niceness"] = _niceness_table(probe.seen)
        if row["command_to_first_step_s"] is not None:
            by_kind = probe.cpu_until(start + row["command_to_first_step_s"])
            row["cpu_s_to_first_step"] = {"total": sum(by_kind.values()), "by_process": by_kind}
    return row


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per runner: the median of each phase and total over the rounds; the targets checked on torchferry's."""
    out: dict[str, Any] = {}
    for runner in dict.fromkeys(r["runner"] for r in runs):
        rows = [r for r in runs if r["runner"] == runner]
        keys = ["help_s"] if runner == "--help" else ["command_to_first_step_s", "last_epoch_end_to_exit_s", "wall_s"]
        out[runner] = {k: _median(rows, k) for k in keys}
        if runner != "--help":
            kind = "torchferry" if runner.startswith("torchferry") else runner
            names = [name for name, _, _ in PHASES[kind] if any(name in r["phases"] for r in rows)]
            out[runner]["phases"] = {n: statistics.median(r["phases"][n] for r in rows if n in r["phases"])
                                     for n in names}
            out[runner].update(_cpu_summary(rows))
    tf = out.get("torchferry", {})
    checks = {"command_to_first_step_s": tf.get("command_to_first_step_s"),
              "last_epoch_end_to_exit_s": tf.get("last_epoch_end_to_exit_s"),
              "help_s": out.get("--help", {}).get("help_s")}
    out["targets"] = [{"target": f"torchferry {k} (smallcnn/digits, 2 CPU workers)", "bar": f"<= {TARGETS[k]:g} s",
                       "measured": v, "met": None if v is None else v <= TARGETS[k]} for k, v in checks.items()]
    return out


def _cpu_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The median CPU-seconds all of a runner's processes used before its first step, by kind of process, and
    what that means on this machine: no schedule of that work on its cores starts training sooner than
    CPU-seconds / cores."""
    cpu = [r["cpu_s_to_first_step"] for r in rows if r.get("cpu_s_to_first_step")]
    if not cpu:
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    total = statistics.median(c["total"] for c in cpu)
    kinds = dict.fromkeys(k for c in cpu for k in c["by_process"])
    by_kind = {k: statistics.median(c["by_process"].get(k, 0.0) for c in cpu) for k in kinds}
    return {"cpu_s_to_first_step": total, "cores": cores, "cpu_bound_to_first_step_s": total / cores,
            "cpu_s_to_first_step_by_process": dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))}


def bare_ray() -> int:
    """Ray's floor: a local Ray and a TorchTrainer of 2 CPU workers (gloo) whose function only marks the time."""
    from torchferry.distributed.timeline import mark

    mark("driver_main")
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    def nothing(_: dict[str, Any]) -> None:
        from ray import train

        from torchferry.distributed.timeline import mark, process_started

        rank = train.get_context().get_world_rank()
        mark("worker_entry", rank=rank, process_started=process_started())
        mark("last_epoch_end", rank=rank)

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only, as distributed.launch starts it
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    mark("ray_ready")
    with tempfile.TemporaryDirectory(prefix="bare-ray-") as storage:
        trainer = TorchTrainer(nothing, train_loop_config={},
                               scaling_config=ScalingConfig(num_workers=WORKERS, resources_per_worker={"CPU": 1}),
                               run_config=ray.train.RunConfig(storage_path=storage))
        mark("fit_called")
        trainer.fit()
        mark("fit_returned")
    mark("ray_shutdown")
    ray.shutdown()
    mark("ray_shutdown_done")
    return 0


def _print_summary(summary: dict[str, Any]) -> None:
    for runner, s in summary.items():
        if runner == "targets":
            continue
        print(f"{runner}: " + "  ".join(f"{k} {v:.2f}" for k, v in s.items() if isinstance(v, float)))
        for name, seconds in s.get("phases", {}).items():
            print(f"    {seconds:6.2f} s  {name}")
        if "cpu_s_to_first_step" in s:
            print(f"    CPU before the first step: {s['cpu_s_to_first_step']:.1f} CPU-s on {s['cores']} cores, so "
                  f"{s['cpu_bound_to_first_step_s']:.1f} s at the least; by process: " + ", ".join(
                      f"{k} {v:.1f}" for k, v in s["cpu_s_to_first_step_by_process"].items() if v >= 0.1))
    for t in summary["targets"]:
        met = "no data" if t["met"] is None else "MET" if t["met"] else "MISS"
        print(f"{met:<4} {t['target']}: {t['measured'] if t['measured'] is None else round(t['measured'], 2)} "
              f"(bar {t['bar']})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every runner (default: 3)")
    p.add_argument("--epochs", type=int, default=1, help="epochs per training run (default: 1)")
    p.add_argument("--runners", default="torchferry,torchrun,bare Ray,--help",
                   help="comma-separated (default: torchferry,torchrun,bare Ray,--help)")
    p.add_argument("--baseline", metavar="DIR", help="a checkout of another commit: adds the runner 'torchferry "
                   "baseline' (torchferry from DIR), interleaved, for a before/after")
    p.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)  # the bare-Ray child process
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/<date>-<host>-startup.json)")
    args = p.parse_args(argv)
    if args.bare:
        return bare_ray()
    env = repo_env(TORCHFERRY_CACHE=os.environ.get("TORCHFERRY_CACHE", os.path.join(tempfile.gettempdir(),
                                                                                      "torchferry-bench-cache")))
    runners = args.runners.split(",")
    if args.baseline:
        env["BENCH_BASELINE"] = os.path.abspath(args.baseline)
        runners.insert(0, "torchferry baseline")
    runs = []
    load = [os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="tf-startup-") as tmp:
        for _ in range(args.rounds):
            for runner in runners:
                runs.append(run_once(runner, "digits", args.epochs, tmp, env))
                r = runs[-1]
                print(f"{runner:<10} " + "  ".join(f"{k} {r[k]:.2f}" for k in ("help_s", "command_to_first_step_s",
                      "last_epoch_end_to_exit_s", "wall_s") if r.get(k) is not None), flush=True)
            load.append(os.getloadavg())
    summary = summarise(runs)
    _print_summary(summary)
    result = {**result_header("startup"), "machine": machine_info("torch", "ray"), "rounds": args.rounds,
              "epochs": args.epochs, "load_average_per_round": load, "summary": summary, "runs": runs,
              "method": "smallcnn on digits, 2 CPU workers x 1 thread, 1 DataLoader process each, batch 64 per "
                        "worker; the runners interleaved in rounds; times from $TORCHFERRY_TIMELINE marks (wall "
                        "clock) against the command's start and exit taken by the benchmark; medians over rounds"}
    write_result(result, Path(args.out) if args.out else result_path("startup"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
