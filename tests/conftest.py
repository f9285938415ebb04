"""Shared fixtures: tiny generated image sets in every layout, and one trained run reused by later tests."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Three classes a small CNN tells apart in a few epochs: the dominant colour of a noisy image.
PALETTE = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}

# Small and quick: 16 px crops, 4 epochs, global batch 16 over 2 CPU workers.
FAST_FLAGS = ["--gpus", "0", "--workers", "2", "--epochs", "4", "--batch-size", "16", "--lr", "0.05",
              "--image-size", "16", "--num-workers", "0", "--hflip", "0.5", "--crop-scale-min", "0.6"]


def colour_image(rng: np.random.Generator, rgb: tuple[int, int, int], size: int = 20) -> Image.Image:
    """A noisy image whose mean colour is `rgb`."""
    noise = rng.integers(-40, 41, size=(size, size, 3))
    return Image.fromarray(np.clip(np.array(rgb) + noise, 0, 255).astype("uint8"), "RGB")


def write_class_tree(root: Path, per_class: int, seed: int = 0, classes: tuple[str, ...] = tuple(PALETTE),
                     ext: str = "png") -> list[tuple[Path, str]]:
    """root/<class>/<i>.<ext> for each class; returns (path, class) pairs."""
    rng = np.random.default_rng(seed)
    written = []
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = root / name / f"{i:03d}.{ext}"
            colour_image(rng, PALETTE[name]).save(path)
            written.append((path, name))
    return written


def write_digits_folder(root: Path, limit: int | None = None) -> Path:
    """scikit-learn's 8×8 grayscale digits as an ImageFolder tree root/train/<digit>/, root/val/<digit>/ (80/20)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images, labels = bunch.images[:limit], bunch.target[:limit]
    parts = train_test_split(range(len(labels)), test_size=0.2, random_state=0, stratify=labels)
    for part, indices in zip(("train", "val"), parts):
        for i in indices:
            (root / part / str(labels[i])).mkdir(parents=True, exist_ok=True)
            Image.fromarray((images[i] * (255.0 / 16.0)).round().astype("uint8"), mode="L").save(
                root / part / str(labels[i]) / f"{i:04d}.png")
    return root


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
    write_class_tree(tmp_path / "ds" / "train", 24, seed=1)
    write_class_tree(tmp_path / "ds" / "val", 8, seed=2)
    return tmp_path / "ds"


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


def write_cifar10(root: Path, per_class_train: int = 24, per_class_test: int = 8) -> Path:
    """A tiny CIFAR-10-format root (cifar-10-batches-py with 5 data batches, a test batch, batches.meta).

    Only the first three classes have images (colour classes), so the set is learnable in a few epochs.
    """
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(5)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

    def batch(per_class: int) -> dict:
        images, labels = [], []
        for label, rgb in enumerate(PALETTE.values()):
            for _ in range(per_class):
                arr = np.asarray(colour_image(rng, rgb, 32))
                images.append(arr.transpose(2, 0, 1).reshape(-1))
                labels.append(label)
        return {"data": np.stack(images).astype(np.uint8), "labels": labels}

    for i in range(1, 6):
        with open(base / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(max(1, per_class_train // 5)), f)
    with open(base / "test_batch", "wb") as f:
        pickle.dump(batch(per_class_test), f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    return root


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
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real 2-worker Ray run on an ImageFolder tree; later tests read its outputs."""
    from torchferry.distributed import launch

    base = tmp_path_factory.mktemp("trained")
    write_class_tree(base / "data" / "train", 24, seed=1)
    write_class_tree(base / "data" / "val", 8, seed=2)
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
    return {"code": code, "run_dir": base / "runs" / "folder", "data": base / "data"}


@pytest.fixture
def ray_2_cpus(monkeypatch: pytest.MonkeyPatch):
    """A local Ray with 2 CPUs on 127.0.0.1, shut down afterwards; workers can import the test modules."""
    import ray

    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p))
    from torchferry.distributed.launch import _keep_ray_on_loopback

    _keep_ray_on_loopback()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def write_checkpoint(path: Path, arch: str, data_dir: Path, size: int = 32, seed: int = 0) -> Path:
    """A torchferry checkpoint of `arch` with random weights, its config pointing at `data_dir`."""
    import torch

    from torchferry.distributed import checkpoint as ckpt
    from torchferry.distributed.config import TrainConfig, resolve_defaults
    from torchferry.distributed.data import discover
    from torchferry.distributed.models import build_model
    from torchferry.distributed.presets import preprocess_spec

    cfg = resolve_defaults(TrainConfig(data=str(data_dir), model=arch, image_size=size, resize_size=size,
                                       name="made"))
    classes = discover(cfg).classes
    torch.manual_seed(seed)
    model = build_model(arch, len(classes), channels=int(cfg.channels or 3))
    with torch.no_grad():  # random BN statistics, so that eval-mode BN is not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    ckpt.save_checkpoint({
        "format": ckpt.FORMAT, "arch": arch, "arch_kwargs": {}, "num_classes": len(classes), "classes": classes,
        "preprocess": preprocess_spec(cfg), "state_dict": ckpt.clean_state_dict(model), "epoch": 0,
        "metrics": {"val_acc": 0.0, "val_loss": 0.0, "train_loss": 0.0, "train_acc": 0.0},
        "config": cfg.to_dict(), "versions": ckpt.versions()}, str(path), sidecar=True)
    return path


@pytest.fixture(scope="session")
def exported_model(trained_run: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The trained smallcnn exported to ONNX (verified) once for the serving tests."""
    from torchferry.export.onnx import export_checkpoint

    assert trained_run["code"] == 0
    out = tmp_path_factory.mktemp("served") / "model.onnx"
    report = export_checkpoint(str(trained_run["run_dir"] / "best.pth"), str(out))
    assert report["passed"]
    return {"model": out, "checkpoint": trained_run["run_dir"] / "best.pth", "data": trained_run["data"]}


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid PNG header claiming width × height grayscale pixels, in a few dozen bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


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
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
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
