"""serve/repository.py: versioned models in Triton's layout, the highest proven one served, new versions
swapped in without dropping a request (Flask's test client, then real dev and gunicorn servers under load)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import threading
import time
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import requests
from helpers import png

from torchferry.serve.app import create_app
from torchferry.serve.batcher import MicroBatcher
from torchferry.serve.repository import ModelRepository

NAME = "colours"


def place_version(
    root: Path, version: int, source: Path, *, note: str = "", broken: bool = False, name: str = NAME
) -> Path:
    """root/name/version/model.onnx (+ sidecar), written aside and renamed into place as docs/deploy.md says.

    `note` makes a distinguishable copy that still passes its proof (metadata differs, so the sha256 does);
    `broken` alters the golden logits and writes no sidecar, so only the proof can refuse it."""
    proto = onnx.load(str(source))
    if note:
        entry = proto.metadata_props.add()
        entry.key, entry.value = "note", note
    if broken:
        for prop in proto.metadata_props:
            if prop.key == "golden":
                golden = json.loads(prop.value)
                golden["logits"][0][0] += 0.5
                prop.value = json.dumps(golden)
    staging = root / f".staging-{version}"
    staging.mkdir(parents=True)
    onnx.save(proto, str(staging / "model.onnx"))
    if not broken:
        digest = hashlib.sha256((staging / "model.onnx").read_bytes()).hexdigest()
        (staging / "model.onnx.sha256").write_text(f"{digest}  model.onnx\n")
    target = root / name / str(version)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staging, target)
    return target


def app_on(root: Path, **config):
    """The serving app on the versioned folder `root`, loaded before the first request."""
    return create_app({"MODEL_DIR": str(root), "LOAD_SYNC": True, **config})


RED = png((210, 30, 30))


def served_version(client) -> str:
    r = client.post("/predict", data=RED, content_type="image/png")
    assert r.status_code == 200 and r.json["predictions"][0]["label"] == "red", r.json
    return r.json["model"]["version"]


def test_the_highest_proven_version_is_served_and_a_broken_one_reported(
    exported_model: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for version, kw in ((1, {}), (2, {"note": "v2"}), (3, {"broken": True})):
        place_version(tmp_path, version, exported_model["model"], **kw)
    (tmp_path / NAME / "latest").mkdir()  # not a version: ignored
    client = app_on(tmp_path).test_client()
    assert served_version(client) == "2"
    meta = client.get(f"/v2/models/{NAME}").json
    assert meta["versions"] == ["2"] and meta["parameters"]["version"] == "2"
    states = meta["parameters"]["model_versions"]
    assert [states[v]["state"] for v in ("3", "2", "1")] == ["refused", "serving", "available"]
    assert "golden outputs do not reproduce" in states["3"]["reason"]
    legacy = client.get("/metadata").json
    assert legacy["name"] == NAME and legacy["version"] == "2" and legacy["model_versions"]["3"]["state"] == "refused"
    refused = [json.loads(r.message) for r in caplog.records if '"model_refused"' in r.getMessage()]
    assert [(e["model"], e["version"]) for e in refused] == [(NAME, "3")] and "golden" in refused[0]["reason"]
    r = client.get(f"/v2/models/{NAME}/versions/3")
    assert r.status_code == 404 and "refused" in r.json["error"]


def test_refresh_swaps_in_a_new_version_and_rolls_back_when_it_is_removed(exported_model: dict, tmp_path: Path) -> None:
    place_version(tmp_path, 1, exported_model["model"])
    app = app_on(tmp_path)
    client, repo = app.test_client(), app.extensions["torchferry"]
    assert served_version(client) == "1"
    place_version(tmp_path, 2, exported_model["model"], note="v2")
    assert served_version(client) == "1"  # nothing changes until asked (SIGHUP) or polled
    repo.refresh()
    assert served_version(client) == "2" and client.get("/readyz").json["version"] == "2"
    shutil.rmtree(tmp_path / NAME / "2")
    repo.refresh()
    assert served_version(client) == "1" and set(repo.versions) == {"1"}


def test_a_refused_version_is_retried_only_once_its_files_change(
    exported_model: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    place_version(tmp_path, 1, exported_model["model"])
    place_version(tmp_path, 2, exported_model["model"], broken=True)
    app = app_on(tmp_path)
    repo = app.extensions["torchferry"]
    repo.refresh()
    repo.refresh()
    assert caplog.text.count('"model_refused"') == 1 and repo.active.version == "1"
    shutil.rmtree(tmp_path / NAME / "2")
    place_version(tmp_path, 2, exported_model["model"], note="fixed")
    repo.refresh()
    assert served_version(app.test_client()) == "2"


class PublishedOnce(ModelRepository):
    """A repository whose `versions`, once published, cannot change: requests read it while the watcher works."""

    def __setattr__(self, key: str, value) -> None:
        super().__setattr__(key, types.MappingProxyType(value) if key == "versions" else value)


def test_nothing_on_disk_proves_itself_keeps_the_model_in_memory(
    exported_model: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    place_version(tmp_path, 1, exported_model["model"])
    app = app_on(tmp_path)
    shutil.rmtree(tmp_path / NAME / "1")
    place_version(tmp_path, 4, exported_model["model"], broken=True)
    repo = app.extensions["torchferry"]
    repo.__class__ = PublishedOnce  # the states are built, then published whole: never edited in place
    repo.refresh()
    assert "model re-check failed" not in caplog.text
    assert repo.versions["4"]["state"] == "refused" and "kept in memory" in repo.versions["1"]["reason"]
    repo.__class__, repo.versions = ModelRepository, dict(repo.versions)
    client = app.test_client()
    assert served_version(client) == "1"
    states = client.get("/metadata").json["model_versions"]
    assert states["4"]["state"] == "refused" and "kept in memory" in states["1"]["reason"]


def test_folders_that_are_not_plain_version_numbers_are_ignored(exported_model: dict, tmp_path: Path) -> None:
    place_version(tmp_path, 1, exported_model["model"])
    place_version(tmp_path, 3, exported_model["model"], note="v3").rename(tmp_path / NAME / "03")
    # "²".isdigit() is True and int("²") raises: such a folder used to fail every re-check, so nothing loaded.
    for odd in ("²", "٣", "0", "9" * 40, "-2", "2.0"):
        (tmp_path / NAME / odd).mkdir()
    app = app_on(tmp_path)
    client, repo = app.test_client(), app.extensions["torchferry"]
    assert served_version(client) == "1" and set(repo.versions) == {"1"}
    place_version(tmp_path, 2, exported_model["model"], note="v2")
    repo.refresh()
    assert served_version(client) == "2" and set(repo.versions) == {"1", "2"}


def test_a_version_that_is_no_regular_file_or_too_large_is_refused_unread(
    exported_model: dict, tmp_path: Path
) -> None:
    """A FIFO (whose read would block the re-check) and a sparse 3 GB file (read whole, it took 6 GiB to refuse) in a
    version folder are refused without reading them, measured with tracemalloc; the good version serves."""
    import tracemalloc

    root = tmp_path / "models"
    place_version(root, 1, exported_model["model"])
    (root / NAME / "2").mkdir()
    os.mkfifo(root / NAME / "2" / "model.onnx")
    (root / NAME / "3").mkdir()
    with open(root / NAME / "3" / "model.onnx", "wb") as f:
        f.truncate(3 * 2**30)  # sparse: no disk used
    tracemalloc.start()
    try:
        app = app_on(root)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    client = app.test_client()
    assert served_version(client) == "1" and peak < 64 * 2**20, peak
    versions = app.extensions["torchferry.state"].repo.versions
    assert "is not a regular file" in versions["2"]["reason"]
    assert "is over 2147483647 bytes" in versions["3"]["reason"]


@pytest.mark.parametrize(
    "layout,config,reason",
    [
        ("empty", {}, "no model in"),
        ("two models", {}, "several models (a, b); choose one with --name"),
        ("two models", {"MODEL_NAME": "c"}, "no model 'c'"),
        ("no versions", {}, "no version folders"),
        ("missing folder", {}, "does not exist"),
        ("both sources", {"MODEL": "/m.onnx"}, "not both"),
    ],
)
def test_a_folder_that_does_not_fit_the_layout_stays_not_ready(
    tmp_path: Path, layout: str, config: dict, reason: str
) -> None:
    root = tmp_path / "models"
    if layout == "two models":
        (root / "a" / "1").mkdir(parents=True)
        (root / "b" / "1").mkdir(parents=True)
    elif layout == "no versions":
        (root / NAME / "v1").mkdir(parents=True)
    elif layout != "missing folder":
        root.mkdir()
    r = app_on(root, **config).test_client().get("/readyz")
    assert r.status_code == 503 and reason in r.json["reason"], r.json


def test_name_selects_one_of_several_models(exported_model: dict, tmp_path: Path) -> None:
    place_version(tmp_path, 1, exported_model["model"], name="a")
    place_version(tmp_path, 5, exported_model["model"], name="b")
    client = app_on(tmp_path, MODEL_NAME="b").test_client()
    assert client.get("/v2/models/b").json["versions"] == ["5"]


def test_a_request_holding_the_old_model_finishes_after_the_swap(exported_model: dict, tmp_path: Path) -> None:
    place_version(tmp_path, 1, exported_model["model"])
    app = app_on(tmp_path, BATCH_WINDOW_MS=2)
    repo = app.extensions["torchferry"]
    old = repo.active
    place_version(tmp_path, 2, exported_model["model"], note="v2")
    repo.refresh()
    assert repo.active.version == "2" and old.batcher is not None and old.batcher._closed
    x = np.zeros((1, 3, 16, 16), np.float32)
    np.testing.assert_array_equal(old.run(x), repo.active.run(x))  # the retired batcher answers directly


def test_a_closed_micro_batcher_answers_directly() -> None:
    batcher = MicroBatcher(lambda b: b * 2, window_ms=1, max_batch=8)
    assert batcher.submit(np.ones((1, 2), np.float32)).tolist() == [[2.0, 2.0]]
    batcher.close()
    batcher.close()
    assert batcher.submit(np.ones((1, 2), np.float32)).tolist() == [[2.0, 2.0]] and not batcher.thread.is_alive()


def test_a_poll_interval_finds_new_versions_without_a_signal(exported_model: dict, tmp_path: Path) -> None:
    place_version(tmp_path, 1, exported_model["model"])
    app = app_on(tmp_path, POLL_SECONDS=0.1)
    repo = app.extensions["torchferry"]
    try:
        place_version(tmp_path, 2, exported_model["model"], note="v2")
        for _ in range(300):  # bounded: the watcher looks every 0.1 s
            if repo.active.version == "2":
                break
            time.sleep(0.1)
        assert repo.active.version == "2"
    finally:
        repo.stop()


# --- a real server under load while versions come and go -----------------------------------------------------------


class RequestStream:
    """Client threads sending /predict and /v2 infer requests (bounded), recording (start, status, version, end)."""

    def __init__(self, base: str, threads: int = 2, limit: int = 4000):
        self.base, self.limit = base, limit
        self.records: list[tuple[float, object, str | None, float]] = []
        self.lock, self.done = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]
        self.infer = {
            "inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(RED).decode()]}]
        }

    def _one(self, i: int) -> tuple[object, str | None]:
        if i % 2:
            r = requests.post(f"{self.base}/v2/models/{NAME}/infer", json=self.infer, timeout=30)
            return r.status_code, r.json().get("model_version")
        r = requests.post(f"{self.base}/predict", data=RED, headers={"Content-Type": "image/png"}, timeout=30)
        return r.status_code, r.json().get("model", {}).get("version")

    def _run(self, offset: int) -> None:
        for i in range(self.limit):
            if self.done.is_set():
                return
            started = time.monotonic()
            try:
                status, version = self._one(i + offset)
            except requests.RequestException as exc:
                status, version = type(exc).__name__, None
            with self.lock:
                self.records.append((started, status, version, time.monotonic()))
            time.sleep(0.005)  # leave the CPU to the model being loaded

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.done.set()
        for t in self.threads:
            t.join(timeout=60)

    def wait_for(self, n: int, since: float) -> None:
        """Until `n` requests started after `since` were answered (bounded)."""
        for _ in range(600):
            if len(self.since(since)) >= n:
                return
            time.sleep(0.05)
        raise AssertionError(f"fewer than {n} requests answered: {self.since(since)[-5:]}")

    def since(self, t: float) -> list[tuple[float, object, str | None, float]]:
        with self.lock:
            return [r for r in self.records if r[0] > t]


def wait_for_log(proc, pattern: dict, count: int) -> None:
    """Until the server's log holds `count` JSON events matching `pattern` (bounded), e.g. one per worker."""
    for _ in range(600):
        events = []
        for line in Path(proc.log_path).read_text().splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue
        if sum(all(e.get(k) == v for k, v in pattern.items()) for e in events) >= count:
            return
        assert proc.poll() is None, Path(proc.log_path).read_text()[-3000:]
        time.sleep(0.1)
    raise AssertionError(f"no {count} × {pattern} in the log: {Path(proc.log_path).read_text()[-3000:]}")


@pytest.mark.parametrize("server", ["dev", pytest.param("gunicorn", marks=pytest.mark.slow)])
def test_hot_swap_under_load_drops_no_request(server: str, exported_model: dict, tmp_path: Path,
                                              live_server) -> None:
    root = tmp_path / "models"
    place_version(root, 1, exported_model["model"])
    workers = 2 if server == "gunicorn" else 1
    live = (live_server("dev", args=["--model-dir", str(root)]) if server == "dev"
            else live_server("gunicorn", workers=workers, env={"TORCHFERRY_MODEL_DIR": str(root)}))
    base, proc = live.base, live.proc
    stream = RequestStream(base)
    stream.start()
    try:
        stream.wait_for(20, since=0)  # the stream is flowing on version 1
        wait_for_log(proc, {"event": "model_ready", "version": "1"}, workers)  # and every worker serves it
        place_version(root, 2, exported_model["model"], note="v2")
        proc.send_signal(signal.SIGHUP)
        wait_for_log(proc, {"event": "model_swapped", "version": "2"}, workers)
        on_v2 = time.monotonic()

        place_version(root, 3, exported_model["model"], broken=True)
        proc.send_signal(signal.SIGHUP)
        wait_for_log(proc, {"event": "model_refused", "version": "3"}, workers)
        meta = requests.get(f"{base}/v2/models/{NAME}", timeout=10).json()
        assert meta["versions"] == ["2"] and meta["parameters"]["model_versions"]["3"]["state"] == "refused"
        time.sleep(0.5)  # let the stream run on past the refusal

        rollback = time.monotonic()
        shutil.rmtree(root / NAME / "3")
        shutil.rmtree(root / NAME / "2")
        proc.send_signal(signal.SIGHUP)
        wait_for_log(proc, {"event": "model_swapped", "version": "1", "from_version": "2"}, workers)
        on_v1 = time.monotonic()
        stream.wait_for(10, since=on_v1)
    finally:
        stream.stop()
    records = stream.since(0)
    failures = [r for r in records if r[1] != 200]
    assert not failures, failures[:10]
    assert {r[2] for r in records} == {"1", "2"}  # version 3 never answered
    # Sent after the swap to 2 and answered before the rollback began: 2 (one sent just before the rollback may
    # be taken after it, and rightly answered by 1).
    assert {v for t, _, v, end in records if on_v2 < t and end < rollback} == {"2"}
    assert {v for t, _, v, _ in records if t > on_v1} == {"1"}
    assert proc.poll() is None
