"""bench/run_all.py's verdicts and table, on a merged result written here (the benchmarks themselves run in bench/)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run_all():
    spec = importlib.util.spec_from_file_location("run_all", REPO / "bench" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_all"] = module
    spec.loader.exec_module(module)
    return module


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
    run_all = _run_all()
    checks = {c["target"]: c for c in run_all.check_targets(_result())}
    smallcnn = checks["torchferry on Ray, 2 workers, vs torchrun, 2 processes (smallcnn/digits)"]
    assert smallcnn["met"] is False and smallcnn["short_by"] == "short by 7.7 %"
    assert checks["ORT fp32 vs torch eager, resnet18, batch 1"]["met"] is True
    assert checks["ORT INT8 vs ORT fp32, resnet18, batch 1"]["met"] is True
    assert checks["INT8 top-1 loss in percentage points (a model torchferry trained on digits)"]["met"] is False
    assert checks["server vs in-process throughput, 4 clients (resnet18)"]["met"] is None  # not measured


def test_results_table_names_the_machine_the_misses_and_the_commands() -> None:
    run_all = _run_all()
    result = _result()
    result["targets"] = run_all.check_targets(result)
    text = run_all.render(result, "bench/results/x.json")
    assert "2 CPU cores" in text and "python bench/run_all.py --quick" in text
    assert "**no** (short by 7.7 %)" in text and "| smallcnn | digits | torchferry Ray x2 | 2 | 1 | 90.0 |" in text
    assert "| resnet18 | 3x224x224 | 1 | 10.0 | 21.0 | 2.10 | 42.0 | 2.00 |" in text
