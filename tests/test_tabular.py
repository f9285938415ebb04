"""The tabular regression task: CSV typing, encoding and standardisation, the `features` spec and its bounds,
the checkpoint → ONNX → server round trip on a small in-process model, request validation, and one real
train → export → serve run on scikit-learn's diabetes set against a LinearRegression baseline."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from torchferry.contract import ContractError, task_of
from torchferry.distributed import TorchferryError
from torchferry.distributed.config import TrainConfig
from torchferry.distributed.tabular_data import read_table
from torchferry.inputs.tabular import InputRefused, encode_rows, features_problems, width

REPO = Path(__file__).resolve().parents[1]
WEEK = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]


def write_weather(path: Path, rows: int = 60, seed: int = 0) -> Path:
    """A temperature table as the tutorial has it: numbers, a weekday to one-hot, the next day's maximum."""
    rng = np.random.default_rng(seed)
    lines = ["year,week,temp_1,temp_2,actual"]
    for i in range(rows):
        t1, t2 = rng.normal(60, 10), rng.normal(60, 10)
        lines.append(f"2016,{WEEK[i % 7]},{t1:.1f},{t2:.1f},{0.7 * t1 + 0.2 * t2 + 5 + rng.normal(0, 1):.2f}")
    path.write_text("\n".join(lines) + "\n")
    return path


def weather_cfg(path: Path, **kw) -> TrainConfig:
    return TrainConfig(task="tabular", data=str(path), target="actual", model="mlp", opt="adam", **kw)


# ------------------------------------------------------------------------------------------------
# the table: types, split, standardisation, one-hot


def test_columns_are_typed_and_standardised_with_the_training_rows_only(tmp_path: Path) -> None:
    split = read_table(weather_cfg(write_weather(tmp_path / "w.csv")))
    assert split.kinds == {"year": "numeric", "week": "categorical", "temp_1": "numeric", "temp_2": "numeric"}
    assert (len(split.train), len(split.val)) == (48, 12)
    cols = {c["name"]: c for c in split.features["columns"]}
    train_t1 = np.array([r["temp_1"] for r in split.train])
    every_t1 = np.array([r["temp_1"] for r in split.train + split.val])
    assert cols["temp_1"]["mean"] == pytest.approx(train_t1.mean()) != pytest.approx(every_t1.mean())
    assert cols["temp_1"]["std"] == pytest.approx(train_t1.std())
    assert cols["year"]["std"] == 1.0  # a constant column is centred, not divided by zero
    assert cols["week"]["categories"] == sorted(WEEK)
    x = encode_rows(split.train, split.features, with_target=True)
    assert x.shape == (48, width(split.features)) == (48, 3 + 7) and x.dtype == np.float32
    assert np.allclose(x[:, 8].mean(), 0, atol=1e-5) and np.allclose(x[:, 8].std(), 1, atol=1e-4)
    hot = x[:, 1:8]
    assert (hot.sum(1) == 1).all() and sorted(WEEK)[int(hot[0].argmax())] == split.train[0]["week"]


def test_named_categorical_columns_and_the_same_split_every_time(tmp_path: Path) -> None:
    path = write_weather(tmp_path / "w.csv")
    first = read_table(weather_cfg(path, categorical=["year"]))
    assert first.kinds["year"] == "categorical" and first.features["columns"][0]["categories"] == ["2016"]
    assert read_table(weather_cfg(path, categorical=["year"])).val == first.val  # the workers find the driver's
    assert read_table(weather_cfg(path, seed=1)).val != first.val


def test_the_built_in_diabetes_set_needs_no_flag_but_data() -> None:
    split = read_table(TrainConfig(task="tabular", data="diabetes"))
    assert split.target == "target" and len(split.kinds) == 10 and len(split.train) + len(split.val) == 442


@pytest.mark.parametrize(("content", "flags", "message"), [
    ("a,b,actual\n1,2,3\n4,5,6\n7,8,9\n1,1,1\n", {"target": None}, "with --target"),
    ("a,b,actual\n1,2,3\n", {"target": "nope"}, "--target 'nope' is not a column"),
    ("a,b,actual\n1,2,3\n4,5\n", {}, "line 3: 2 fields"),
    ("a,b,actual\n1,,3\n4,5,6\n7,8,9\n1,1,1\n", {}, "column 'b' is empty"),
    ("a,b,actual\n1,2,inf\n4,5,6\n7,8,9\n1,1,1\n", {}, "the target is 'inf', not a finite number"),
    ("a,b,actual\n1,2,x\n4,5,6\n7,8,9\n1,1,1\n", {}, "the target is 'x'"),
    ("a,b,actual\n1,2,3\n4,5,6\n7,8,9\n1,1,1\n", {"categorical": ["c"]}, "--categorical 'c' is not a column"),
    ("", {}, "the file is empty"),
    ("a,a,actual\n1,2,3\n", {}, "distinct columns"),
])
def test_bad_tables_are_refused_in_one_line(tmp_path: Path, content: str, flags: dict, message: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text(content)
    cfg = weather_cfg(path)
    for key, value in flags.items():
        setattr(cfg, key, value)
    with pytest.raises(TorchferryError, match=re.escape(message)):
        read_table(cfg)


# ------------------------------------------------------------------------------------------------
# the spec a file carries, and the rows a request sends

SPEC = {"columns": [{"name": "temp_1", "kind": "numeric", "mean": 60.0, "std": 10.0},
                    {"name": "week", "kind": "categorical", "categories": ["Fri", "Mon"]}], "target": "actual"}


def test_rows_encode_by_the_spec() -> None:
    x = encode_rows([{"temp_1": 70, "week": "Mon"}, {"week": "Fri", "temp_1": 50.5}], SPEC)
    assert np.allclose(x, [[1.0, 0.0, 1.0], [-0.95, 1.0, 0.0]])


@pytest.mark.parametrize(("row", "message"), [
    ({"temp_1": 1, "week": "Mon", "humidity": 3}, "unknown column 'humidity'"),
    ({"temp_1": 1, "week": "Mon", "actual": 3}, "(the target, which the model predicts)"),
    ({"week": "Mon"}, "column 'temp_1' is missing"),
    ({"temp_1": None, "week": "Mon"}, "column 'temp_1' is missing"),
    ({"temp_1": "70", "week": "Mon"}, "must be a number, got str"),
    ({"temp_1": True, "week": "Mon"}, "must be a number, got bool"),
    ({"temp_1": float("nan"), "week": "Mon"}, "must be finite"),
    ({"temp_1": float("inf"), "week": "Mon"}, "must be finite"),
    ({"temp_1": 10**400, "week": "Mon"}, "too large"),
    ({"temp_1": 1, "week": "Someday"}, "unknown category 'Someday'; the model knows 'Fri', 'Mon'"),
    ({"temp_1": 1, "week": ["Mon"]}, "must be a category (a string), got list"),
    ([1, 2], "row 0 must be an object"),
])
def test_every_field_of_a_row_is_checked(row: object, message: str) -> None:
    with pytest.raises(InputRefused, match=re.escape(message)):
        encode_rows([row], SPEC)


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s["columns"][0].update(std=0), "std must be a positive finite number"),
    (lambda s: s["columns"][0].update(mean=float("nan")), "mean must be a finite number"),
    (lambda s: s["columns"][1].update(categories=[str(i) for i in range(1001)]), "categories must be 1 to 1000"),
    (lambda s: s["columns"][1].update(categories=["a", "a"]), "distinct"),
    (lambda s: s["columns"][1].update(kind="date"), "kind must be 'numeric' or 'categorical'"),
    (lambda s: s.update(columns=[{"name": f"c{i}", "kind": "numeric", "mean": 0, "std": 1} for i in range(1025)]),
     "1 to 1024 columns"),
    (lambda s: s.update(columns=[{"name": f"c{i}", "kind": "categorical", "categories": [str(j) for j in range(999)]}
                                 for i in range(20)]), "the limit is 16384"),
    (lambda s: s.update(target="temp_1"), "none of them the target"),
])
def test_a_files_features_spec_is_bounded_and_checked(change, message: str) -> None:
    spec = json.loads(json.dumps(SPEC))
    assert list(features_problems(spec)) == []
    change(spec)
    assert message in " ".join(features_problems(spec))


# ------------------------------------------------------------------------------------------------
# checkpoint → ONNX → server, on a small model made in this process


@pytest.fixture(scope="module")
def tabular_model(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An MLP on the weather table with random weights: a checkpoint (resume state included) and its export."""
    from torchferry.distributed import checkpoint as ckpt
    from torchferry.distributed.tasks import get_task
    from torchferry.export.onnx import export_checkpoint

    base = tmp_path_factory.mktemp("tabular")
    data = write_weather(base / "weather.csv")
    task = get_task("tabular")
    cfg, split = task.prepare(weather_cfg(data, name="weather", output_dir=str(base / "runs")))
    torch.manual_seed(0)
    model = task.build_model(cfg, split)
    optimizer = torch.optim.Adam(model.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    row = {"val_rmse": 3.0, "val_mae": 2.0, "val_r2": 0.5, "val_loss": 0.1, "train_loss": 0.2, "train_rmse": 2.5}
    checkpoint = ckpt.build_checkpoint(model, cfg, fields=task.checkpoint_fields(split, cfg), epoch=2, metrics=row,
                                       resume={"history": [{"epoch": e, **row} for e in range(3)],
                                               "best_val_rmse": 3.0, "backbone_frozen": False,
                                               "optimizer": optimizer.state_dict(),
                                               "scheduler": schedule.state_dict(), "scaler": {}})
    path = base / "best.pth"
    ckpt.save_checkpoint(checkpoint, str(path), sidecar=True)
    report = export_checkpoint(str(path), str(base / "model.onnx"), data=str(data))
    assert report["passed"], report
    return {"checkpoint": path, "model": base / "model.onnx", "data": data, "split": split, "report": report}


def test_a_tabular_checkpoint_loads_weights_only_and_resumes(tabular_model: dict) -> None:
    from torchferry.distributed.checkpoint import load_checkpoint, model_from_checkpoint
    from torchferry.distributed.resume import resume_state
    from torchferry.distributed.tasks import get_task

    loaded = load_checkpoint(str(tabular_model["checkpoint"]))
    assert loaded["task"] == "tabular" and loaded["features"] == tabular_model["split"].features
    model = model_from_checkpoint(loaded, factory=None)
    optimizer = torch.optim.Adam(model.parameters())
    past = resume_state(get_task("tabular"), loaded, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1),
                        torch.amp.GradScaler("cpu", enabled=False))
    assert (past.best, past.start_epoch, len(past.history)) == (3.0, 3, 3)


def test_a_tampered_tabular_checkpoint_is_refused(tabular_model: dict, tmp_path: Path) -> None:
    from torchferry.distributed import checkpoint as ckpt

    loaded = ckpt.load_checkpoint(str(tabular_model["checkpoint"]))
    for change, message in ((lambda c: c["features"]["columns"][0].update(std=-1), "std must be a positive"),
                            (lambda c: c.update(task="video"), "task must be one of"),
                            (lambda c: c.update(arch="os:system"), None)):
        bad = {**loaded, "features": json.loads(json.dumps(loaded["features"]))}
        change(bad)
        ckpt.save_checkpoint(bad, str(tmp_path / "bad.pth"))
        if message is None:  # a factory the command line does not name is never imported
            with pytest.raises(TorchferryError, match="name it on the command line"):
                ckpt.model_from_checkpoint(ckpt.load_checkpoint(str(tmp_path / "bad.pth")), factory=None)
            continue
        with pytest.raises(ckpt.CheckpointError, match=message):
            ckpt.load_checkpoint(str(tmp_path / "bad.pth"))


def test_the_classification_report_refuses_a_regression(tabular_model: dict, capsys: pytest.CaptureFixture) -> None:
    from torchferry.distributed import evaluate

    assert evaluate.main([str(tabular_model["checkpoint"]), "--data", str(tabular_model["data"])]) == 2
    assert "is a tabular model" in capsys.readouterr().err


def test_the_onnx_file_carries_the_spec_and_proves_itself(tabular_model: dict) -> None:
    import onnx

    from torchferry.export.metadata import read_metadata
    from torchferry.serve.predictor import Predictor

    values = read_metadata(onnx.load(str(tabular_model["model"])))
    assert values["task"] == "tabular" and values["features"] == tabular_model["split"].features
    assert values["target"] == "actual" and values["val_rmse"] == 3.0 and values["golden"]["shape"] == [2, 10]
    real = [c for c in tabular_model["report"]["cases"] if c["kind"] == "real"]
    assert real and real[0]["images"] == 12 and "top1_agreement" not in real[0]
    assert real[0]["case"] == "validation rows"
    predictor = Predictor(str(tabular_model["model"]))
    assert predictor.prove() <= 1e-3 and predictor.info.input_shape == ["N", 10]
    assert predictor.output_name == "prediction" and predictor.info.classes == []


def test_a_model_file_with_a_hostile_spec_is_never_served(tabular_model: dict, tmp_path: Path) -> None:
    import onnx

    from torchferry.export.metadata import read_metadata, set_metadata
    from torchferry.serve.predictor import ModelRefused, Predictor

    proto = onnx.load(str(tabular_model["model"]))
    features = read_metadata(proto)["features"]
    wide = {**features, "columns": [*features["columns"][:-1], {"name": "x", "kind": "categorical",
                                                                 "categories": [str(i) for i in range(100_000)]}]}
    for bad, message in (({**features, "columns": [{**features["columns"][0], "std": -1}]}, "std must be a positive"),
                         (wide, "categories must be 1 to 1000"), ("nope", "features must be a mapping")):
        set_metadata(proto, {"features": bad})
        onnx.save(proto, str(tmp_path / "bad.onnx"))
        with pytest.raises(ModelRefused, match=message):
            Predictor(str(tmp_path / "bad.onnx"))


def test_files_without_a_task_are_image_files() -> None:
    assert task_of({}) == "image" and task_of({"task": "tabular"}) == "tabular"
    with pytest.raises(ContractError, match="task must be one of"):
        task_of({"task": "video"})


@pytest.fixture(scope="module")
def client(tabular_model: dict):
    from torchferry.serve.app import create_app

    return create_app({"MODEL": str(tabular_model["model"]), "LOAD_SYNC": True, "MAX_IMAGES": 8}).test_client()


def test_predict_answers_json_rows_as_onnx_runtime_does(client, tabular_model: dict) -> None:
    import onnxruntime as ort

    rows = [{k: v for k, v in r.items() if k != "actual"} for r in tabular_model["split"].val[:5]]
    r = client.post("/predict", json={"rows": rows})
    assert r.status_code == 200, r.json
    session = ort.InferenceSession(str(tabular_model["model"]), providers=["CPUExecutionProvider"])
    x = encode_rows(rows, tabular_model["split"].features)
    expected = session.run(None, {"input": x})[0][:, 0]
    assert [p["prediction"] for p in r.json["predictions"]] == pytest.approx(expected.tolist(), abs=1e-4)
    assert r.json["model"]["task"] == "tabular" and r.json["model"]["target"] == "actual"
    v2 = client.post("/v2/models/mlp/infer", json={"inputs": [{"name": "input", "datatype": "FP32",
                                                               "shape": list(x.shape), "data": x.tolist()}]})
    assert v2.status_code == 200, v2.json
    assert v2.json["outputs"][0]["shape"] == [5, 1]
    assert v2.json["outputs"][0]["data"] == pytest.approx(expected.tolist(), abs=1e-4)
    meta = client.get("/v2/models/mlp").json
    assert meta["inputs"][0]["shape"] == [-1, 10] and meta["parameters"]["feature_names"][1] == "week=Fri"
    assert client.get("/metadata").json["features"] == tabular_model["split"].features


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"rows": [{"temp_1": 1}]}, 400, "is missing"),
    ({"rows": [{"year": 2016, "week": "Mon", "temp_1": 1, "temp_2": 2, "wind": 3}]}, 400, "unknown column 'wind'"),
    ({"rows": [{"year": 2016, "week": "Mon", "temp_1": "hot", "temp_2": 2}]}, 400, "must be a number"),
    ({"rows": [{"year": 2016, "week": "Moon", "temp_1": 1, "temp_2": 2}]}, 400, "unknown category 'Moon'"),
    ({"rows": []}, 400, "non-empty list"),
    ({"rows": [{}] * 9}, 413, "the limit is 8"),
    ({"images": []}, 400, '{"rows"'),
    ('{"rows": [{"year": NaN}]}', 400, "NaN is not a number"),
    ('{"rows": [{"year": 1e999, "week": "Mon", "temp_1": 1, "temp_2": 2}]}', 400, "must be finite"),
    ('{"rows": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, "not valid JSON"),
])
def test_bad_requests_get_a_json_4xx(client, body: object, status: int, message: str) -> None:
    kw = {"data": body, "content_type": "application/json"} if isinstance(body, str) else {"json": body}
    r = client.post("/predict", **kw)
    assert r.status_code == status and message in r.json["error"]["message"], r.json


@pytest.mark.parametrize(("body", "code"), [
    ('{"rows": [{"year": 2016, "week": "Mon", "temp_1": 1, "temp_2": 2}]}'.encode("utf-16"), "not_utf8"),
    (b"  ", "no_rows"),
    (b'{"rows": [{}], "top_k": 1}', "bad_request"),
])
def test_a_body_is_read_as_the_text_task_reads_it(client, body: bytes, code: str) -> None:
    r = client.post("/predict", data=body, content_type="application/json")
    assert (r.status_code, r.json["error"]["code"]) == (400, code), r.json


def test_a_body_past_the_upload_limit_is_refused_before_it_is_parsed(tabular_model: dict) -> None:
    from torchferry.serve.app import create_app

    small = create_app({"MODEL": str(tabular_model["model"]), "LOAD_SYNC": True, "MAX_UPLOAD_BYTES": 4096})
    huge = '{"rows": [{"year": "' + "x" * 10_000 + '"}]}'
    r = small.test_client().post("/predict", data=huge, content_type="application/json")
    assert r.status_code == 413 and r.is_json


def test_other_bodies_and_tensors_are_refused(client) -> None:
    assert client.post("/predict", data=b"x", content_type="image/png").status_code == 415
    bad = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}
    r = client.post("/v2/models/mlp/infer", json=bad)
    assert r.status_code == 400 and "[-1, 10]" in r.json["error"]
    r = client.post("/v2/models/mlp/infer", json={"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1],
                                                             "data": ["x"]}]})
    assert r.status_code == 400 and "send FP32" in r.json["error"]
    r = client.post("/v2/models/mlp/infer", json={"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 10],
                                                             "data": [0] * 10}],
                                                  "outputs": [{"name": "prediction", "parameters": {"classification": 1}}]})
    assert r.status_code == 400 and "classification is for classifiers" in r.json["error"]


# ------------------------------------------------------------------------------------------------
# the whole way on 2 CPU workers


def linear_regression_rmse(split) -> float:
    """scikit-learn's LinearRegression on the same split and encoding: the baseline the MLP must reach."""
    from sklearn.linear_model import LinearRegression

    x = encode_rows(split.train, split.features, with_target=True)
    xv = encode_rows(split.val, split.features, unknown="zeros", with_target=True)
    y = np.array([r[split.target] for r in split.train])
    yv = np.array([r[split.target] for r in split.val])
    return float(np.sqrt(np.mean((LinearRegression().fit(x, y).predict(xv) - yv) ** 2)))


@pytest.mark.slow
def test_diabetes_trains_exports_and_serves_at_the_linear_baseline(tmp_path: Path, live_server) -> None:
    """`--data diabetes` through the three commands: val RMSE within 3 % of LinearRegression's (or better), the
    exported model proven on real validation rows, the server answering as ONNX Runtime does."""
    env_cmd = [sys.executable, "-m", "distributed.launch", "--data", "diabetes", "--gpus", "0", "--workers", "2",
               "--epochs", "15", "--batch-size", "32", "--lr", "0.003", "--num-workers", "0",
               "--output-dir", str(tmp_path / "runs"), "--name", "diabetes"]
    proc = subprocess.run(env_cmd, capture_output=True, text=True, cwd=REPO, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r"best val_rmse (\d+\.\d+) at epoch \d+: (\S+best\.pth)", proc.stdout)
    assert match, proc.stdout
    run = tmp_path / "runs" / "diabetes"
    split = read_table(TrainConfig(task="tabular", data="diabetes"))
    baseline, rmse = linear_regression_rmse(split), float(match.group(1))
    print(f"diabetes val RMSE: MLP {rmse:.3f}, LinearRegression {baseline:.3f} ({rmse / baseline:.3f}×)")
    assert rmse <= 1.03 * baseline
    assert (run / "curves.png").stat().st_size > 0 and (run / "val_predictions.png").stat().st_size > 0
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("epoch,train_loss,train_rmse,val_loss,val_mae")
    _resumes_from_its_newest_checkpoint(run, rmse)
    proc = subprocess.run([sys.executable, "-m", "export.onnx", str(run / "best.pth")], capture_output=True,
                          text=True, cwd=REPO, timeout=600, check=False)
    assert proc.returncode == 0 and "88 validation rows" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    server = live_server("dev", run / "model.onnx")
    rows = [{k: v for k, v in r.items() if k != "target"} for r in split.val[:16]]
    got = requests.post(f"{server.base}/predict", json={"rows": rows}, timeout=60)
    import onnxruntime as ort

    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": encode_rows(rows, split.features)})[0][:, 0]
    assert got.status_code == 200 and [p["prediction"] for p in got.json()["predictions"]] == pytest.approx(
        expected.tolist(), rel=1e-5)
    served = np.array([p["prediction"] for p in got.json()["predictions"]])
    actual = np.array([r["target"] for r in split.val[:16]])
    assert math.sqrt(np.mean((served - actual) ** 2)) < 2 * baseline  # the served model is the trained one
    for body, message in (({"rows": [{**rows[0], "bmi": "high"}]}, "must be a number"),
                          ({"rows": [{**rows[0], "target": 100}]}, "unknown column 'target'"),
                          ({"rows": [{k: v for k, v in rows[0].items() if k != "age"}]}, "'age' is missing")):
        r = requests.post(f"{server.base}/predict", json=body, timeout=60)
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def _resumes_from_its_newest_checkpoint(run: Path, best_rmse: float) -> None:
    """What a worker does after a failure or with --resume: the newest epoch checkpoint Ray kept, loaded
    weights-only, restores the model, the optimizer, the schedule and the best val_rmse so far."""
    from torchferry.distributed.checkpoint import model_from_checkpoint
    from torchferry.distributed.loop import build_optimizer, build_scheduler
    from torchferry.distributed.resume import checkpoint_dirs, newest_usable, resume_state
    from torchferry.distributed.tasks import get_task

    found = newest_usable(checkpoint_dirs(str(run)), warn=print)
    assert found is not None and found.checkpoint["task"] == "tabular"
    cfg = TrainConfig.from_dict(found.checkpoint["config"])
    model = model_from_checkpoint(found.checkpoint, factory=None)
    optimizer = build_optimizer(model.parameters(), cfg, float(cfg.lr or 0.003))
    past = resume_state(get_task("tabular"), found.checkpoint, optimizer, build_scheduler(optimizer, cfg, cfg.epochs),
                        torch.amp.GradScaler("cpu", enabled=False))
    assert past.start_epoch == 15 and len(past.history) == 15 and past.best == pytest.approx(best_rmse, abs=1e-3)


def test_the_epoch_line_counts_a_tables_rows_not_images(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchferry.distributed import events

    lines: list[str] = []
    monkeypatch.setattr(events._logger, "info", lines.append)
    row = {"epoch": 0, "train_loss": 0.7, "val_rmse": 60.5, "lr": 0.003, "images_per_s": 1374.2, "seconds": 0.3}
    for task in ("tabular", "image", "text"):
        console = events.Console(None, TrainConfig(task=task, epochs=2))
        console.pictures_warmed = True  # no matplotlib warm-up thread
        console.handle({"kind": "epoch", "row": row})
    assert [line.split("lr 0.003  ")[1] for line in lines] == ["1374 rows/s  0.3s", "1374 img/s  0.3s",
                                                               "1374 texts/s  0.3s"]
