"""The package bench: its modules run as `python -m bench.<name>`, share one module, and bench.run_all's verdicts
and table on a merged result written here (the benchmarks themselves run in bench/, not in the suite)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import common, run_all

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in (REPO / "bench").glob("*.py") if p.stem != "__init__")


def _result() -> dict:
    run = {"runner": "torchferry Ray x2", "workers": 2, "threads": 1, "img_s": 90.0, "startup_s": 30.0}
    tr = {"runner": "torchrun x2", "workers": 2, "threads": 1, "img_s": 100.0, "startup_s": 9.0}
    return {
        "date": "2026-11-26", "quick": True,
        "machine": {"cpus": 2, "processor": "x86_64", "python": "3.11", "torch": "2", "onnxruntime": "1", "ray": "2"},
        "train": {"method": "m", "models": [{"model": "smallcnn", "data": "digits", "loader_workers": 1,
                                             "plain_img_s": 100.0, "runs": [tr, run],
                                             "summary": {"N=2": {"torchrun_img_s": 100.0, "torchferry_img_s": 90.0,
                                                                 "torchferry_over_torchrun": 0.9}}}]},
        "infer": {"method": "m", "rows": [{"model": "resnet18", "input": [3, 224, 224], "batch": 1, "torch_img_s": 10.0,
                                          "ort_img_s": 21.0, "ort_over_torch": 2.1, "ort_int8_img_s": 42.0,
                                          "int8_over_ort": 2.0}],
                  "int8_accuracy": [{"fp32_top1": 0.98, "int8_top1": 0.97, "top1_delta_pp": -1.0}]},
    }


def test_targets_say_met_missed_and_by_how_much() -> None:
    checks = {c["target"]: c for c in run_all.check_targets(_result())}
    smallcnn = checks["torchferry on Ray, 2 workers, vs torchrun, 2 processes (smallcnn/digits)"]
    assert smallcnn["met"] is False and smallcnn["short_by"] == "short by 7.7 %"
    assert checks["ORT fp32 vs torch eager, resnet18, batch 1"]["met"] is True
    assert checks["ORT INT8 vs ORT fp32, resnet18, batch 1"]["met"] is True
    assert checks["INT8 top-1 loss in percentage points (a model torchferry trained on digits)"]["met"] is False
    assert checks["server vs in-process throughput, 4 clients (resnet18)"]["met"] is None  # not measured


def test_startup_targets_are_seconds_and_checked_when_measured() -> None:
    result = {**_result(), "startup": {"summary": {"torchferry": {"command_to_first_step_s": 20.0,
                                                                  "last_epoch_end_to_exit_s": 2.0},
                                                   "--help": {"help_s": 0.5}}}}
    checks = {c["target"]: c for c in run_all.check_targets(result)}
    first = checks["seconds from the command to the first step (torchferry, smallcnn/digits, 2 CPU workers)"]
    assert first["met"] is False and first["bar"] == "<= 12 s" and first["short_by"] == "8.00 s over"
    assert checks["seconds from the end of the last epoch to exit (torchferry, smallcnn/digits, 2 CPU workers)"]["met"]
    assert checks["seconds for python -m distributed.launch --help"]["met"] is True
    assert {c["met"] for c in run_all.check_targets(_result()) if c["target"].startswith("seconds")} == {None}


def test_results_table_names_the_machine_the_misses_and_the_commands() -> None:
    result = _result()
    result["targets"] = run_all.check_targets(result)
    text = run_all.render(result, "bench/results/x.json")
    assert "2 CPU cores" in text and "python -m bench.run_all --quick" in text
    assert "**no** (short by 7.7 %)" in text and "| smallcnn | digits | torchferry Ray x2 | 2 | 1 | 90.0 |" in text
    assert "| resnet18 | 3x224x224 | 1 | 10.0 | 21.0 | 2.10 | 42.0 | 2.00 |" in text


def test_batch_bench_is_a_target_and_a_table() -> None:
    row = {"model": "smallcnn", "images": 4000, "loop_1_thread_img_s": 150.0, "loop_ort_threads_img_s": 70.0,
           "ray_2_actors_img_s": 225.0, "ray_over_loop_1_thread": 1.5, "ray_over_loop_ort_threads": 3.2,
           "ray_pipeline_img_s": 100.0, "ray_first_rows_s": 20.0, "ray_command_wall_s": 60.0,
           "load_average_before": 2.0}
    result = {**_result(), "batch": {"method": "the same files", "rows": [row]}}
    checks = {c["target"]: c for c in run_all.check_targets(result)}
    batch = next(c for name, c in checks.items() if name.startswith("python -m serve.batch, 2 actors"))
    assert batch["met"] is False and batch["short_by"] == "short by 6.2 %"
    text = run_all.render({**result, "targets": run_all.check_targets(result)}, "x.json")
    assert "## Batch prediction (CPU)" in text and "| smallcnn | 4000 | 150.0 | 70.0 | 225.0 | 1.50x |" in text


def test_no_benchmark_changes_sys_path_and_each_runs_as_a_module() -> None:
    for name in MODULES:
        source = (REPO / "bench" / f"{name}.py").read_text()
        tree = ast.parse(source)
        touches = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "path"
                   and isinstance(n.value, ast.Name) and n.value.id == "sys"]
        assert not touches, f"bench/{name}.py changes sys.path at lines {touches}"
        local = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                 and n.module.split(".")[0] in MODULES]
        assert not local, f"bench/{name}.py imports {local} as top-level modules; import them from the package bench"
        if name != "common":
            assert 'if __name__ == "__main__":' in source and "python -m bench." + name in source, name


def test_machine_info_and_result_path_are_written_once() -> None:
    info = common.machine_info("json", extra="x")
    assert info["cpus"] == os.cpu_count() and len(info["load_average"]) == 3 and info["json"] and info["extra"] == "x"
    path = common.result_path("train")
    assert path.parent == REPO / "bench" / "results"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-.+-train\.json", path.name)
    assert common.result_path("gpu-train", host="nvidia-h100").name.endswith("-nvidia-h100-gpu-train.json")
    for name in MODULES:  # the machine dict and the result path are built in bench/common.py alone
        if name != "common":
            source = (REPO / "bench" / f"{name}.py").read_text()
            assert "platform.python_version()" not in source and '"results" /' not in source, name


def test_run_all_runs_as_a_module_from_the_repository_root() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.run_all", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=common.repo_env(), check=False)
    assert proc.returncode == 0, proc.stderr
    assert "--render" in proc.stdout


@pytest.mark.slow
def test_every_benchmark_module_imports() -> None:
    code = "; ".join(f"import bench.{name}" for name in MODULES)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=common.repo_env(), check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_startup_breakdown_adds_up_and_takes_the_last_rank() -> None:
    from bench import startup

    start = 1000.0
    lines = [{"event": "driver_main", "t": 1000.5}, {"event": "data_checked", "t": 1002.0},
             {"event": "model_checked", "t": 1003.0}, {"event": "ray_init", "t": 1003.1},
             {"event": "ray_ready", "t": 1006.0}, {"event": "fit_called", "t": 1007.0},
             # rank 1's process was started by Ray in advance (before fit): it counts as reached at fit_called
             {"event": "worker_entry", "t": 1010.0, "rank": 0, "process_started": 1008.0},
             {"event": "worker_entry", "t": 1011.0, "rank": 1, "process_started": 1004.0},
             {"event": "loaders_built", "t": 1011.5}, {"event": "model_built", "t": 1011.6},
             {"event": "first_step", "t": 1012.0}, {"event": "first_step", "t": 1012.5},
             {"event": "last_epoch_end", "t": 1020.0}, {"event": "fit_returned", "t": 1021.0},
             {"event": "best_written", "t": 1021.2}, {"event": "pictures_done", "t": 1022.0},
             {"event": "ray_shutdown", "t": 1022.0}, {"event": "ray_shutdown_done", "t": 1023.0}]
    at = startup.points(lines, start, 1023.5)
    assert at["first_step"] == 12.5 and at["worker_process"] == 8.0
    phases = startup.breakdown("torchferry", at)
    assert abs(sum(phases.values()) - 23.5) < 1e-9
    assert phases["Train controller until the worker processes exist"] == 1.0
    assert phases["worker imports, process group, train_func"] == 3.0
    summary = startup.summarise([{"runner": "torchferry", "phases": phases, **startup._summary(at)},
                                 {"runner": "--help", "help_s": 0.4}])
    checks = {c["target"].split()[1]: c for c in summary["targets"]}
    assert checks["command_to_first_step_s"]["met"] is False and checks["last_epoch_end_to_exit_s"]["met"] is False
    assert checks["help_s"]["met"] is True and summary["torchferry"]["last_epoch_end_to_exit_s"] == 3.5


def test_gpu_serve_bench_says_it_needs_a_gpu_and_writes_nothing_without_one(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: bench/gpu_check.sh runs the benchmark itself")
    out = tmp_path / "gpu-serve.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_serve", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=common.repo_env(), check=False)
    assert proc.returncode == 0, proc.stderr
    assert "skipped, torch sees no CUDA GPU; nothing measured, nothing written" in proc.stdout
    assert not out.exists()
    assert "bench.gpu_serve" in (REPO / "bench" / "gpu_check.sh").read_text()


def test_smallcnn_serving_is_held_to_the_bare_flask_app_and_resnet18_to_in_process() -> None:
    rows = [{"model": "smallcnn", "mode": "in-process", "batch_window_ms": 0, "clients": 4, "req_s": 800.0, "p50_ms": 1.5},
            {"model": "smallcnn", "mode": "bare-flask", "batch_window_ms": 0, "clients": 4, "req_s": 400.0, "p50_ms": 9.0},
            {"model": "smallcnn", "mode": "server", "batch_window_ms": 0.0, "clients": 4, "req_s": 390.0, "p50_ms": 9.2,
             "p99_ms": 20.0}]
    from bench.load import _ratios

    result = {**_result(), "load": {"method": "m", "seconds_per_point": 3.0, "rows": rows, "ratios": _ratios(rows)}}
    checks = {c["target"]: c for c in run_all.check_targets(result)}
    flask = checks["server vs a bare Flask app (gunicorn gthread, same workers and threads), 4 clients (smallcnn)"]
    assert flask["met"] is True and abs(flask["measured"] - 0.975) < 1e-9  # 0.49x in-process is not its bar
    assert not any(name.startswith("server") and "in-process" in name and "smallcnn" in name for name in checks)
    assert checks["server vs in-process throughput, 4 clients (resnet18)"]["met"] is None  # not measured
    text = run_all.render({**result, "targets": run_all.check_targets(result)}, "x.json")
    assert "| smallcnn | 0 ms | 4 | 800.0 | 400.0 | 390.0 | 0.49 | 0.97 | 1.50 | 9.00 | 9.20 | 20.00 |" in text


def test_startup_counts_the_cpu_each_kind_of_process_used_before_the_first_step() -> None:
    from bench import startup

    probe = startup.ProcessProbe("unused")
    probe.seen = {  # (wall-clock time, CPU-seconds so far) every 0.5 s, as read from /proc
        "10": {"command": "distributed.launch", "nice": 0, "samples": [(100.0, 1.0), (100.5, 2.0), (101.0, 2.5)]},
        "11": {"command": "ray::RayTrainWorker", "nice": 0, "samples": [(100.5, 0.5), (101.0, 1.5)]},
        "12": {"command": "ray::RayTrainWorker", "nice": 0, "samples": [(100.5, 0.25), (101.0, 1.0)]},
        "13": {"command": "gcs_server", "nice": 0, "samples": [(101.5, 0.25)]},  # first seen after the step
    }
    assert probe.cpu_until(100.9) == {"distributed.launch": 2.0, "ray::RayTrainWorker": 0.75}
    assert startup._short("ray::TrainController.run                ") == "ray::TrainController"
    rows = [{"cpu_s_to_first_step": {"total": t, "by_process": {"driver": t / 2, "worker": t / 2}}} for t in (20, 24, 30)]
    summary = startup._cpu_summary(rows)
    assert summary["cpu_s_to_first_step"] == 24 and summary["cpu_s_to_first_step_by_process"] == {"driver": 12,
                                                                                                 "worker": 12}
    assert summary["cpu_bound_to_first_step_s"] == 24 / summary["cores"]
