"""Shared fixtures: tiny generated image sets in every layout, a small model made without Ray for the serving and
export tests, one trained run reused by the tests that need a real one, real servers (`live_server`).

Plain helpers (data writers, request bodies, server processes) are in helpers.py."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import (
    FAST_FLAGS,
    LiveServer,
    free_port,
    once_per_run,
    start_dev,
    start_gunicorn,
    stop,
    wait_ready,
    write_checkpoint,
    write_cifar10,
    write_class_tree,
    write_digits_folder,
    write_split_tree,
)


@pytest.fixture
def digits_folder(tmp_path: Path) -> Path:
    """300 of the 8×8 grayscale digits as PNGs in train/ and val/ (a user's own small grayscale data)."""
    return write_digits_folder(tmp_path / "digits", limit=300)


@pytest.fixture
def flat_folder(tmp_path: Path) -> Path:
    """DIR/<class>/*.png, 3 classes × 20 images, for --val-split."""
    write_class_tree(tmp_path / "flat", 20)
    return tmp_path / "flat"


@pytest.fixture
def split_folder(tmp_path: Path) -> Path:
    """DIR/train/<class>/* and DIR/val/<class>/*, 3 classes × 24 + 8 images."""
    return write_split_tree(tmp_path / "ds")


@pytest.fixture
def annotation_files(tmp_path: Path) -> dict[str, Path]:
    """images/ plus train.txt, val.txt ('relative/path label') and train.csv, val.csv (path,label)."""
    root = tmp_path / "ann"
    train = write_class_tree(root / "images" / "train", 24, seed=3)
    val = write_class_tree(root / "images" / "val", 8, seed=4)
    files = {}
    for part, rows in (("train", train), ("val", val)):
        rel = [(p.relative_to(root).as_posix(), label) for p, label in rows]
        files[f"{part}.txt"] = root / f"{part}.txt"
        files[f"{part}.txt"].write_text("# path label\n" + "".join(f"{p} {label}\n" for p, label in rel))
        files[f"{part}.csv"] = root / f"{part}.csv"
        files[f"{part}.csv"].write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rel))
    return files


@pytest.fixture
def cifar10_root(tmp_path: Path) -> Path:
    """A tiny CIFAR-10-format directory written by the test."""
    return write_cifar10(tmp_path / "cifar")


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the digits cache and torch.hub out of the user's home."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    monkeypatch.setenv("TORCHFERRY_CACHE", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(cache / "torch"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> dict:
    """One real 2-worker Ray run on an ImageFolder tree, made once per pytest run; later tests read its outputs."""
    saved = once_per_run(tmp_path_factory, worker_id, "trained", _train_run)
    return {"code": saved["code"], "run_dir": Path(saved["run_dir"]), "data": Path(saved["data"])}


def _train_run(base: Path) -> dict:
    from torchferry.distributed import launch

    write_split_tree(base / "data")
    old = os.environ.get("TORCHFERRY_CACHE")
    os.environ["TORCHFERRY_CACHE"] = str(base / "cache")
    try:
        code = launch.main([*FAST_FLAGS, "--data", str(base / "data"), "--output-dir", str(base / "runs"),
                            "--name", "folder"])
    finally:
        if old is None:
            os.environ.pop("TORCHFERRY_CACHE", None)
        else:
            os.environ["TORCHFERRY_CACHE"] = old
    return {"code": code, "run_dir": str(base / "runs" / "folder"), "data": str(base / "data")}


@pytest.fixture
def ray_2_cpus(monkeypatch: pytest.MonkeyPatch):
    """A local Ray with 2 CPUs on 127.0.0.1 and the launcher's settings for a Ray it starts, shut down afterwards
    as the launcher does; workers can import the test modules."""
    import ray

    from torchferry.rayinit import keep_ray_on_loopback, local_ray_settings, shutdown_ray

    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p))
    before = dict(os.environ)
    keep_ray_on_loopback()
    local_ray_settings()
    for key in set(os.environ) - set(before):  # set through monkeypatch, so that they end with the test
        monkeypatch.setenv(key, os.environ.pop(key))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    shutdown_ray()


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A smallcnn checkpoint made in this process, no Ray: random weights fitted 3 epochs on the colour set
    (train/ and val/, 3 classes × 24 + 8 images at 16 px), so a red image is predicted "red"."""
    base = tmp_path_factory.mktemp("small")
    data = write_split_tree(base / "data")
    checkpoint = write_checkpoint(base / "best.pth", "smallcnn", data, size=16, fit_epochs=3)
    from torchferry.distributed.checkpoint import load_checkpoint

    assert load_checkpoint(str(checkpoint))["metrics"]["val_acc"] == 1.0  # the serving tests' "red" is red
    return {"checkpoint": checkpoint, "data": data}


@pytest.fixture(scope="session")
def exported_model(small_checkpoint: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`small_checkpoint` exported to ONNX (verified) once by the project's export, for the serving tests."""
    from torchferry.export.onnx import export_checkpoint

    out = tmp_path_factory.mktemp("served") / "model.onnx"
    report = export_checkpoint(str(small_checkpoint["checkpoint"]), str(out))
    assert report["passed"], report
    return {"model": out, **small_checkpoint}


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """Starts real servers on 127.0.0.1 and stops them (SIGTERM, bounded) after the test:
    `live_server("dev" | "gunicorn", model, args=..., env=..., ready=True, **gunicorn_settings)` waits (bounded)
    until /readyz answers 200 unless `ready=False`, and returns the LiveServer (base URL, port, process, log)."""
    started: list[LiveServer] = []

    def start(kind: str, model: Path | None = None, *, args: list[str] | None = None,
              env: dict[str, str] | None = None, ready: bool = True, **settings: int) -> LiveServer:
        port, tmp = free_port(), tmp_path / f"{kind}-{len(started)}"
        if kind == "dev":
            proc = start_dev(model, port, tmp, args=args, env=env)
        elif kind == "gunicorn":
            proc = start_gunicorn(model, port, tmp, env=env, **settings)
        else:
            raise ValueError(f"unknown server kind {kind!r}; choose dev or gunicorn")
        server = LiveServer(kind, port, proc)
        started.append(server)
        if ready:
            wait_ready(server.base, proc)
        return server

    yield start
    for server in started:
        stop(server.proc)


@pytest.fixture
def ray_two_nodes(tmp_path: Path):
    """A real two-node Ray cluster on loopback addresses: a head (`ray start --head`) and a second node
    (`ray start --address`), each with one CPU, token auth on; torn down afterwards.

    The nodes take 127.0.0.3 and 127.0.0.2 (Ray rewrites the literal 127.0.0.1 to the machine's routable
    address when nodes join), so every connection stays on the loopback range.
    """
    import secrets
    import socket
    import subprocess
    import sys
    import time

    ray_bin = str(Path(sys.executable).parent / "ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # A cluster of several nodes: Ray's single-machine switch (set by the launcher's local mode) must be off.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    env.pop("RAY_ADDRESS", None)
    common = ["--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats", "--block"]
    head = subprocess.Popen([ray_bin, "start", "--head", "--node-ip-address", "127.0.0.3", "--port", str(port),
                             "--include-dashboard=false", *common], env=env,
                            stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT)
    address = f"127.0.0.3:{port}"
    procs = [head]
    try:
        time.sleep(5)
        procs.append(subprocess.Popen([ray_bin, "start", "--address", address, "--node-ip-address", "127.0.0.2",
                                       *common], env=env, stdout=open(tmp_path / "second.log", "w"),
                                      stderr=subprocess.STDOUT))
        probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
                 "print(sum(1 for n in ray.nodes() if n['Alive']))")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), (tmp_path / "head.log").read_text()[-2000:]
            out = subprocess.run([sys.executable, "-c", probe, address], env=env, capture_output=True, text=True,
                                 timeout=60).stdout.strip()
            if out.endswith("2"):
                break
            time.sleep(1)
        else:
            raise AssertionError("the second node did not join")
        yield {"address": address, "env": env}
    finally:
        # A throwaway cluster: every process of both nodes is killed at once (a graceful `ray start --block`
        # teardown takes half a minute); the workers end with their raylet.
        import psutil

        doomed = []
        for p in procs:
            try:
                doomed += psutil.Process(p.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for p in [*procs, *doomed]:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                p.kill()
        for p in procs:
            p.wait(timeout=60)
        psutil.wait_procs(doomed, timeout=60)
        marker = Path("/tmp/ray/ray_current_cluster")
        if marker.is_file() and marker.read_text().strip() == address:
            marker.unlink()  # what `ray stop` would remove; our own cluster's only


@pytest.fixture
def app(exported_model: dict):
    """The serving app on the trained smallcnn, model loaded before the first request."""
    from torchferry.serve.app import create_app

    return create_app({"MODEL": str(exported_model["model"]), "LOAD_SYNC": True})


@pytest.fixture
def client(app):
    """Flask's test client for `app`."""
    return app.test_client()
