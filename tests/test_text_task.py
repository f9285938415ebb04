"""The text task end to end: a generated text set trained with Ray (2 CPU workers), exported with its parity
proof on real validation rows, served by a real server process answering a real HTTP client."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import requests
from helpers import write_text_csv

from torchferry.inputs.text import Encoder


def _ort_logits(model: Path, ids: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"input": ids})[0]


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _train_and_export(tmp_path: Path) -> tuple[Path, Path, dict]:
    from torchferry.distributed import launch
    from torchferry.distributed.checkpoint import load_checkpoint
    from torchferry.export.onnx import export_checkpoint

    data = write_text_csv(tmp_path / "texts.csv", per_class=60)
    code = launch.main(["--gpus", "0", "--workers", "2", "--data", str(data), "--epochs", "4", "--batch-size", "16",
                        "--lr", "0.01", "--num-workers", "0", "--max-length", "16", "--output-dir",
                        str(tmp_path / "runs"), "--name", "text"])
    assert code == 0
    run = tmp_path / "runs" / "text"
    best = load_checkpoint(str(run / "best.pth"))
    assert best["task"] == "text" and best["arch"] == "lstm" and best["classes"] == ["food", "sports", "weather"]
    assert best["metrics"]["val_acc"] >= 0.8, best["metrics"]  # chance is 1/3
    with open(run / "metrics.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1, 2, 3]
    assert (run / "curves.png").stat().st_size and (run / "confusion_matrix.png").stat().st_size
    report = export_checkpoint(str(run / "best.pth"), str(run / "model.onnx"), data=str(data))
    real = [c for c in report["cases"] if c["kind"] == "real"]
    assert report["passed"] and real and real[0]["top1_agreement"] == 1.0 and real[0]["images"] == 36, report
    assert real[0]["case"] == "validation texts"
    return data, run / "model.onnx", best


@pytest.mark.slow
def test_a_text_set_trains_exports_and_serves(tmp_path: Path, live_server) -> None:
    from torchferry.distributed.text_data import text_split

    data, model, best = _train_and_export(tmp_path)
    base = live_server("dev", model).base
    texts = [text for text, _ in text_split(str(data), val_split=0.2, seed=0).val]
    logits = _ort_logits(model, Encoder(best["text"]).encode(texts))  # training's encode, the exported model's answers
    expected = _softmax(logits)
    got = []
    for i in range(0, len(texts), 16):
        r = requests.post(f"{base}/predict?top_k=3", json={"texts": texts[i:i + 16]}, timeout=30)
        assert r.status_code == 200, r.text
        got += r.json()["predictions"]
    assert [p["index"] for p in got] == expected.argmax(axis=1).tolist()
    assert [p["label"] for p in got] == [best["classes"][i] for i in expected.argmax(axis=1)]
    scores = np.array([[t["score"] for t in sorted(p["top_k"], key=lambda t: best["classes"].index(t["label"]))]
                       for p in got])
    np.testing.assert_allclose(scores, expected, atol=1e-6)

    v2 = requests.post(f"{base}/v2/models/lstm/infer", timeout=30, json={
        "inputs": [{"name": "input", "datatype": "BYTES", "shape": [2], "data": texts[:2]}]}).json()
    np.testing.assert_allclose(np.array(v2["outputs"][0]["data"]).reshape(2, 3), logits[:2], atol=1e-5)

    def refused(body: bytes, content_type: str = "application/json") -> tuple[int, str]:
        r = requests.post(f"{base}/predict", data=body, headers={"Content-Type": content_type}, timeout=60)
        return r.status_code, r.json()["error"]["code"]

    assert refused(b'{"texts": ["caf\xe9"]}') == (400, "not_utf8")
    assert refused(b'{"texts": [NaN]}') == (400, "bad_json")
    assert refused(b'{"texts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}") == (400, "bad_json")
    assert refused(json.dumps({"texts": ["x" * 10_000_000]}).encode()) == (413, "text_too_long")
    assert refused(json.dumps({"texts": ["a"] * 17}).encode()) == (413, "too_many_texts")
    assert refused(b"goal!", "text/plain") == (415, "unsupported_media_type")
    metrics = requests.get(f"{base}/metrics", timeout=5).text
    assert 'torchferry_requests_total{route="/predict",status="413"} 2.0' in metrics
    assert 'torchferry_requests_total{route="/predict",status="200"}' in metrics
