"""Plain helpers the tests share: generated data, checkpoints and models made without Ray, request bodies, and
real server processes on 127.0.0.1. Fixtures live in conftest.py; tests import these with `from helpers import`."""

from __future__ import annotations

import csv
import io
import os
import pickle
import random
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90

# Three classes a small CNN tells apart in a few epochs: the dominant colour of a noisy image.
PALETTE = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
RED = (210, 30, 30)

# Small and quick: 16 px crops, 4 epochs, global batch 16 over 2 CPU workers.
FAST_FLAGS = ["--gpus", "0", "--workers", "2", "--epochs", "4", "--batch-size", "16", "--lr", "0.05",
              "--image-size", "16", "--num-workers", "0", "--hflip", "0.5", "--crop-scale-min", "0.6"]


# ------------------------------------------------------------------------------------------------
# generated data


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


def write_split_tree(root: Path) -> Path:
    """root/train/<class>/* and root/val/<class>/*, 3 classes × 24 + 8 images (the training tests' set)."""
    write_class_tree(root / "train", 24, seed=1)
    write_class_tree(root / "val", 8, seed=2)
    return root


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


# ------------------------------------------------------------------------------------------------
# checkpoints and models without a Ray run


def _fit(model, split, preprocess: dict, epochs: int, seed: int) -> dict[str, float]:
    """`epochs` passes of the project's train_one_epoch over `split.train` in this process; the val metrics."""
    import torch
    from torch.utils.data import DataLoader

    from torchferry.distributed.data import ImageListDataset
    from torchferry.distributed.epoch import evaluate, train_one_epoch
    from torchferry.distributed.presets import build_eval_transform

    tf, cpu, loss = build_eval_transform(preprocess), torch.device("cpu"), torch.nn.CrossEntropyLoss()
    channels = int(preprocess["channels"])
    train = DataLoader(ImageListDataset(split.train, channels, tf), batch_size=16, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    stats = None
    for _ in range(epochs):
        stats = train_one_epoch(model, train, loss, optimizer, cpu)
    val = evaluate(model, DataLoader(ImageListDataset(split.val, channels, tf), batch_size=32), loss, cpu)
    return {"val_acc": val.accuracy, "val_loss": val.loss, "train_loss": stats.loss if stats else 0.0,
            "train_acc": stats.accuracy if stats else 0.0}


def write_checkpoint(path: Path, arch: str, data_dir: Path, size: int = 32, seed: int = 0,
                     fit_epochs: int = 0) -> Path:
    """A torchferry checkpoint of `arch` with random weights, its config pointing at `data_dir`; with
    `fit_epochs`, those weights trained that many epochs on the data in this process first (no Ray)."""
    import torch

    from torchferry.distributed import checkpoint as ckpt
    from torchferry.distributed.config import TrainConfig, resolve_defaults
    from torchferry.distributed.data import discover
    from torchferry.distributed.models import build_model
    from torchferry.distributed.presets import preprocess_spec

    cfg = resolve_defaults(TrainConfig(data=str(data_dir), model=arch, image_size=size, resize_size=size,
                                       name="made"))
    split = discover(cfg)
    classes = split.classes
    torch.manual_seed(seed)
    model = build_model(arch, len(classes), channels=int(cfg.channels or 3))
    with torch.no_grad():  # random BN statistics, so that eval-mode BN is not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    metrics = {"val_acc": 0.0, "val_loss": 0.0, "train_loss": 0.0, "train_acc": 0.0}
    if fit_epochs:
        metrics = _fit(model, split, preprocess_spec(cfg), fit_epochs, seed)
        model.eval()
    checkpoint = ckpt.build_checkpoint(model, cfg, classes, epoch=max(fit_epochs - 1, 0), metrics=metrics)
    ckpt.save_checkpoint(checkpoint, str(path), sidecar=True)
    return path


def export_random_model(base: Path, arch: str = "smallcnn", size: int = 16) -> Path:
    """A random-weight `arch` at `size` px exported to ONNX by the project's export (verified on random
    inputs), without a training run: base/model.onnx."""
    from torchferry.export.onnx import export_checkpoint

    write_class_tree(base / "data", 6)
    checkpoint = write_checkpoint(base / "best.pth", arch, base / "data", size=size)
    report = export_checkpoint(str(checkpoint), str(base / "model.onnx"), use_real=False)
    assert report["passed"], report
    return base / "model.onnx"


# ------------------------------------------------------------------------------------------------
# request bodies


def png(content: Image.Image | tuple[int, int, int] | str = RED, size: int = 20) -> bytes:
    """PNG bytes of `content`: an image as it is, a solid colour, or "noise" (seeded RGB noise), size × size."""
    if isinstance(content, Image.Image):
        img = content
    elif content == "noise":
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    else:
        img = Image.new("RGB", (size, size), content)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def jpeg(img: Image.Image, **kw) -> bytes:
    """JPEG bytes of `img` (converted to RGB unless it is RGB, CMYK or L); `kw` go to PIL's save."""
    buf = io.BytesIO()
    img.convert("RGB" if img.mode not in ("RGB", "CMYK", "L") else img.mode).save(buf, "JPEG", **kw)
    return buf.getvalue()


def red() -> Image.Image:
    """A solid red 20×20 image: the model made for the serving tests calls it "red"."""
    return Image.new("RGB", (20, 20), RED)


def multipart(files: list[tuple[str, bytes]]) -> dict:
    """Flask test-client form data with one file field per (filename, bytes)."""
    return {f"f{i}": (io.BytesIO(data), name) for i, (name, data) in enumerate(files)}


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid PNG header claiming width × height grayscale pixels, in a few dozen bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def slow_request_body() -> bytes:
    """A 900×900 noise PNG: a request that takes the server a while to decode."""
    rng = np.random.default_rng(0)
    return png(Image.fromarray(rng.integers(0, 256, (900, 900, 3), dtype=np.uint8)))


def bad_requests() -> dict[str, tuple[dict, int, str]]:
    """The documented bad /predict inputs: case → (the test client's post kwargs, status, error code or "")."""
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    many = multipart([(f"{i}.png", png(red())) for i in range(100)])
    return {
        "random bytes": ({"data": rng.bytes(2048), "content_type": "image/png"}, 400, "not_an_image"),
        "truncated jpeg": ({"data": jpeg(noisy)[:2000], "content_type": "image/jpeg"}, 400, "corrupt_image"),
        "zero-byte file": ({"data": multipart([("empty.png", b"")]), "content_type": "multipart/form-data"},
                           400, "empty_image"),
        "30 MB body": ({"data": b"\xff" * (30 * 1024 * 1024), "content_type": "image/jpeg"}, 413,
                       "request_entity_too_large"),
        "pixel bomb": ({"data": png_bomb(), "content_type": "image/png"}, 413, "too_many_pixels"),
        "text/plain": ({"data": b"hello", "content_type": "text/plain"}, 415, "unsupported_media_type"),
        "no content type": ({"data": b"hello"}, 415, "unsupported_media_type"),
        "malformed multipart": ({"data": b"--xx\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a\"\r\n\r\n"
                                          b"abc", "content_type": "multipart/form-data; boundary=xx"}, 400, ""),
        "100 images": ({"data": many, "content_type": "multipart/form-data"}, 413, ""),
        "17 images": ({"data": multipart([(f"{i}.png", png(red())) for i in range(17)]),
                       "content_type": "multipart/form-data"}, 413, "too_many_images"),
        "top_k=-1": ({"data": png(red()), "content_type": "image/png", "query_string": {"top_k": "-1"}}, 400,
                     "bad_top_k"),
        "top_k=abc": ({"data": png(red()), "content_type": "image/png", "query_string": {"top_k": "abc"}}, 400,
                      "bad_top_k"),
        "no files": ({"data": {"field": "value"}, "content_type": "multipart/form-data"}, 400, "no_image"),
    }


def write_matmul_model(path: Path, external: bool = False, ir_version: int = 8) -> Path:
    """A 4×4 MatMul model at `path` (opset 13; IR version 8 by default, which every supported ONNX Runtime reads,
    where onnx's own default follows the newest onnx); `external`: its weights in weights.bin beside it."""
    import onnx
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["input", "w"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 4])], [w])
    model = helper.make_model(graph, ir_version=ir_version, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    return path


def write_model_with_external_data(tmp: Path) -> Path:
    """A 4×4 MatMul model whose weights live in an external file, tmp/weights.bin beside tmp/ext.onnx."""
    return write_matmul_model(tmp / "ext.onnx", external=True)


# ------------------------------------------------------------------------------------------------
# real server processes on 127.0.0.1 (the `live_server` fixture starts and stops them)


@dataclass
class LiveServer:
    """A server process the `live_server` fixture started on 127.0.0.1:`port`."""

    kind: str  # "dev" (python -m serve) or "gunicorn"
    port: int
    proc: subprocess.Popen

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return Path(self.proc.log_path).read_text()  # type: ignore[attr-defined]


# Each pytest-xdist worker takes its servers' ports from its own block below Linux's ephemeral range (32768+),
# so two workers never pick the same free port, nor one that the kernel hands out to a client meanwhile.
_PORT_BLOCK = 1000
_next_port = [20000 + _PORT_BLOCK * int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").lstrip("gw") or 0)
              + random.randrange(_PORT_BLOCK)]


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, from this test process's own block."""
    base = _next_port[0] - _next_port[0] % _PORT_BLOCK
    for _ in range(_PORT_BLOCK):  # bounded: one pass over the block
        port = _next_port[0]
        _next_port[0] = base + (port + 1 - base) % _PORT_BLOCK
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port in {base}-{base + _PORT_BLOCK - 1}")


def wait_ready(base: str, proc: subprocess.Popen) -> None:
    """Poll /readyz until 200 (bounded); fail with the server's output if it dies or never gets ready."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {Path(proc.log_path).read_text()[-3000:]}")
        try:
            if requests.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # under gunicorn no worker accepts before its model
            pass
        time.sleep(0.2)
    raise AssertionError("server not ready in time")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _log(tmp: Path, name: str):
    tmp.mkdir(parents=True, exist_ok=True)
    return open(tmp / f"{name}.log", "w")  # a file, not an unread pipe that could fill and stall the server


def start_dev(model: Path | None, port: int, tmp: Path, args: list[str] | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m serve` on 127.0.0.1:port; `args` replace `--model MODEL` (e.g. `--model-dir DIR`)."""
    source = args if args is not None else ["--model", str(model)]
    proc = subprocess.Popen([sys.executable, "-m", "serve", *source, "--host", "127.0.0.1", "--port", str(port)],
                            cwd=REPO, env={**os.environ, **(env or {})}, stdout=_log(tmp, "dev"),
                            stderr=subprocess.STDOUT)
    proc.log_path = tmp / "dev.log"  # type: ignore[attr-defined]
    return proc


def start_gunicorn(model: Path | None, port: int, tmp: Path, workers: int = 2, threads: int = 4,
                   graceful: int = 20, env: dict[str, str] | None = None) -> subprocess.Popen:
    """gunicorn with serve/gunicorn.conf.py on 127.0.0.1:port; `env` adds TORCHFERRY_* settings."""
    env = {**os.environ, "TORCHFERRY_BIND": f"127.0.0.1:{port}",
           "TORCHFERRY_WORKERS": str(workers), "TORCHFERRY_THREADS": str(threads),
           "TORCHFERRY_GRACEFUL_TIMEOUT": str(graceful), "PROMETHEUS_MULTIPROC_DIR": str(tmp / "prom"),
           **({"TORCHFERRY_MODEL": str(model)} if model else {}), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c",
                             str(REPO / "torchferry" / "serve" / "gunicorn.conf.py")],
                            cwd=REPO, env=env, stdout=_log(tmp, "gunicorn"), stderr=subprocess.STDOUT)
    proc.log_path = tmp / "gunicorn.log"  # type: ignore[attr-defined]
    return proc


def pytorch_labels(checkpoint_path: Path, paths: list[Path]) -> list[str]:
    """What the checkpoint predicts for `paths` in PyTorch, with the training side's eval preprocessing."""
    import torch

    from torchferry.distributed import checkpoint as ckpt
    from torchferry.distributed.data import load_image
    from torchferry.distributed.presets import build_eval_transform

    best = ckpt.load_checkpoint(str(checkpoint_path))
    model = ckpt.model_from_checkpoint(best, factory=None)
    tf = build_eval_transform(best["preprocess"])
    x = torch.stack([tf(load_image(str(p), best["preprocess"]["channels"])) for p in paths])
    with torch.inference_mode():
        return [best["classes"][i] for i in model(x).argmax(1).tolist()]


def val_images(data: Path, tmp: Path) -> list[Path]:
    """The validation PNGs of `data`, plus JPEG copies of a few."""
    pngs = sorted((data / "val").rglob("*.png"))
    jpgs = []
    for p in pngs[::6]:
        jpgs.append(tmp / f"{p.parent.name}-{p.stem}.jpg")
        Image.open(p).save(jpgs[-1], quality=95)
    return pngs + jpgs


# ------------------------------------------------------------------------------------------------
# text


TEXT_TOPICS = {
    "sports": ("goal", "match", "team", "score", "coach", "league", "player", "win", "stadium", "referee"),
    "food": ("pasta", "recipe", "bake", "flavor", "spicy", "dinner", "sauce", "chef", "garlic", "oven"),
    "weather": ("rain", "storm", "sunny", "cloudy", "wind", "forecast", "snow", "cold", "thunder", "humid"),
}
TEXT_FILLER = ("the", "a", "today", "was", "really", "very", "we", "saw", "and", "it", "again", "new", "big",
               "after", "this", "week", "so", "about", "our", "all")


def text_sentence(rng: random.Random, topic: str) -> str:
    """One short sentence: 2 or 3 of the topic's words among filler words, a comma or two, some capitals."""
    words = rng.sample(TEXT_TOPICS[topic], rng.randint(2, 3)) + [rng.choice(TEXT_FILLER) for _ in range(rng.randint(3, 8))]
    rng.shuffle(words)
    if rng.random() < 0.3:
        words[rng.randrange(len(words))] += ","
    words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice((".", "!", "?", ""))


def write_text_csv(path: Path, per_class: int = 60, seed: int = 0) -> Path:
    """A `text,label` CSV of per_class generated sentences per topic (sports, food, weather), deterministic."""
    rng = random.Random(seed)
    rows = [(text_sentence(rng, topic), topic) for topic in TEXT_TOPICS for _ in range(per_class)]
    rng.shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def write_text_checkpoint(path: Path, data: Path, arch: str = "lstm", epochs: int = 3, seed: int = 0,
                          max_length: int = 16) -> Path:
    """A text checkpoint made in this process, no Ray: `arch` trained `epochs` passes (Adam) on the text CSV's
    training split by the project's train_one_epoch, its vocabulary and split the text task's own."""
    import torch
    from torch.utils.data import DataLoader

    from torchferry.distributed import checkpoint as ckpt
    from torchferry.distributed.config import TrainConfig
    from torchferry.distributed.epoch import evaluate, train_one_epoch
    from torchferry.distributed.tasks import get_task

    task = get_task("text")
    torch.manual_seed(seed)
    cfg, split = task.prepare(TrainConfig(task="text", data=str(data), model=arch, opt="adam", lr=0.01,
                                          max_length=max_length, name="made"))
    model = task.build_model(cfg, split)
    train_ds, val_ds = task.datasets(split, cfg, use_cuda=False)
    loss, cpu = torch.nn.CrossEntropyLoss(), torch.device("cpu")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loader = DataLoader(train_ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed))
    stats = None
    for _ in range(epochs):
        stats = train_one_epoch(model, loader, loss, optimizer, cpu, sums=task.batch_sums)
    val = evaluate(model, DataLoader(val_ds, batch_size=64), loss, cpu, sums=task.batch_sums)
    metrics = {"val_acc": val.accuracy, "val_loss": val.loss, "train_loss": stats.loss, "train_acc": stats.accuracy}
    checkpoint = ckpt.build_checkpoint(model.eval(), cfg, epoch=epochs - 1, metrics=metrics,
                                       fields=task.checkpoint_fields(split, cfg))
    ckpt.save_checkpoint(checkpoint, str(path), sidecar=True)
    return path


def write_text_onnx(path: Path, vocab: list[str], classes: list[str], max_length: int = 8,
                    changes: dict | None = None) -> Path:
    """A small text classifier written directly as ONNX (no torch export): each token's embedding row is its
    logits, averaged over the text's positions; its metadata (`text` spec, classes, golden outputs from ONNX
    Runtime) as the export writes them, with the metadata `changes` applied."""
    import onnx
    import onnxruntime
    from onnx import helper, numpy_helper

    from torchferry import contract
    from torchferry.inputs.text import text_spec

    table = np.random.RandomState(0).normal(size=(len(vocab), len(classes))).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input"], ["rows"]),
         helper.make_node("ReduceMean", ["rows", "axes"], ["logits"], keepdims=0)], "text",
        [helper.make_tensor_value_info("input", onnx.TensorProto.INT64, ["N", max_length])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", len(classes)])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([1], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    shape = [contract.GOLDEN_BATCH, max_length]
    golden = contract.golden_inputs(shape, dtype="int64", low=0, high=len(vocab))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": golden})[0]
    values = {"task": "text", "classes": classes, "text": text_spec(vocab, max_length), "arch": "handmade",
              "golden": contract.golden_record(logits, shape, "onnxruntime", 1e-5, dtype="int64", low=0,
                                               high=len(vocab)), **(changes or {})}
    for key, value in contract.encode_metadata(values).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def once_per_run(tmp_path_factory: pytest.TempPathFactory, worker_id: str, name: str,
                 make: Callable[[Path], dict]) -> dict:
    """`make(folder)`'s JSON-able result, made once per pytest run: under pytest-xdist the first worker that asks
    makes it, under a file lock in the run's shared temporary folder, and the others read what it left."""
    import json

    from filelock import FileLock

    if worker_id == "master":  # not under xdist
        return make(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent  # this run's folder, above every worker's own
    record = shared / f"{name}.json"
    with FileLock(str(shared / f"{name}.lock")):
        if not record.is_file():
            (shared / name).mkdir()
            record.write_text(json.dumps(make(shared / name)))
    return json.loads(record.read_text())
