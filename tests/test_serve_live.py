"""Real server processes on 127.0.0.1 (the dev server and gunicorn) and a real HTTP client."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from torchferry.distributed import checkpoint as ckpt
from torchferry.distributed.data import load_image
from torchferry.distributed.presets import build_eval_transform

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def start_dev(model: Path, port: int, tmp: Path, args: list[str] | None = None,
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
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(REPO / "torchferry" / "serve" / "gunicorn.conf.py")],
                            cwd=REPO, env=env, stdout=_log(tmp, "gunicorn"), stderr=subprocess.STDOUT)
    proc.log_path = tmp / "gunicorn.log"  # type: ignore[attr-defined]
    return proc


def pytorch_labels(checkpoint_path: Path, paths: list[Path]) -> list[str]:
    best = ckpt.load_checkpoint(str(checkpoint_path))
    model = ckpt.model_from_checkpoint(best, factory=None)
    tf = build_eval_transform(best["preprocess"])
    x = torch.stack([tf(load_image(str(p), best["preprocess"]["channels"])) for p in paths])
    with torch.inference_mode():
        return [best["classes"][i] for i in model(x).argmax(1).tolist()]


def val_images(data: Path, tmp: Path) -> list[Path]:
    """The training tests' validation PNGs, plus JPEG copies of a few."""
    pngs = sorted((data / "val").rglob("*.png"))
    jpgs = []
    for p in pngs[::6]:
        jpgs.append(tmp / f"{p.parent.name}-{p.stem}.jpg")
        Image.open(p).save(jpgs[-1], quality=95)
    return pngs + jpgs


@pytest.mark.parametrize("server", ["dev", "gunicorn"])
def test_real_server_predicts_what_pytorch_predicts(server: str, exported_model: dict, tmp_path: Path) -> None:
    port = free_port()
    proc = (start_dev(exported_model["model"], port, tmp_path) if server == "dev"
            else start_gunicorn(exported_model["model"], port, tmp_path))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc)
        paths = val_images(exported_model["data"], tmp_path)
        expected = pytorch_labels(exported_model["checkpoint"], paths)
        got = []
        for i in range(0, len(paths), 8):  # several images per request, as one batch
            files = [("file", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths[i:i + 8]]
            r = requests.post(f"{base}/predict", files=files, timeout=30)
            assert r.status_code == 200, r.text
            got += [p["label"] for p in r.json()["predictions"]]
        assert got == expected
        one = requests.post(f"{base}/predict", data=paths[0].read_bytes(), headers={"Content-Type": "image/png"},
                            timeout=30)
        assert one.json()["predictions"][0]["label"] == expected[0]
        bad = requests.post(f"{base}/predict", data=b"junk", headers={"Content-Type": "image/png"}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "not_an_image"
        assert requests.get(f"{base}/healthz", timeout=5).status_code == 200
        if server == "gunicorn":
            text = requests.get(f"{base}/metrics", timeout=5).text  # summed over both workers' files
            assert 'torchferry_requests_total{route="/predict",status="200"}' in text
            count = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                        if line.startswith("torchferry_images_predicted_total"))
            assert count == len(paths) + 1
    finally:
        stop(proc)


def test_dev_server_refuses_a_missing_model(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "serve", "--model", str(tmp_path / "none.onnx")], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def _slow_request_body() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (900, 900, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_sigterm_lets_requests_in_flight_finish(exported_model: dict, tmp_path: Path) -> None:
    port = free_port()
    proc = start_gunicorn(exported_model["model"], port, tmp_path, workers=1, threads=4, graceful=20)
    base = f"http://127.0.0.1:{port}"
    body = _slow_request_body()
    records: list[tuple[float, object]] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(40):  # bounded
            started = time.monotonic()
            try:
                status: object = requests.post(f"{base}/predict", data=body, headers={"Content-Type": "image/png"},
                                               timeout=30).status_code
            except requests.RequestException as exc:
                status = type(exc).__name__
            with lock:
                records.append((started, status))
            if not isinstance(status, int):
                return

    try:
        wait_ready(base, proc)
        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        while len([r for r in records if r[1] == 200]) < 6 and proc.poll() is None:
            time.sleep(0.05)
        sigterm_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        assert proc.wait(timeout=30) == 0
    finally:
        stop(proc)
    statuses = [s for _, s in records]
    assert not [s for s in statuses if isinstance(s, int) and s >= 500], statuses
    in_flight = [s for started, s in records if started < sigterm_at - 0.05 and (sigterm_at - started) < 30]
    assert in_flight and all(s == 200 for s in in_flight), records
    assert sum(1 for s in statuses if s == 200) >= 6


def test_slow_client_does_not_block_others(exported_model: dict, tmp_path: Path) -> None:
    port = free_port()
    proc = start_gunicorn(exported_model["model"], port, tmp_path, workers=1, threads=4)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc)
        slow = socket.create_connection(("127.0.0.1", port), timeout=10)
        header = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 60
        done = threading.Event()

        def trickle() -> None:
            for byte in header:  # one byte at a time, bounded (about 3 s)
                if done.is_set():
                    return
                slow.send(bytes([byte]))
                time.sleep(0.04)

        t = threading.Thread(target=trickle)
        t.start()
        answered = 0
        for _ in range(20):
            data = io.BytesIO()
            Image.new("RGB", (20, 20), (200, 30, 30)).save(data, "PNG")
            r = requests.post(f"{base}/predict", data=data.getvalue(), headers={"Content-Type": "image/png"},
                              timeout=10)
            answered += r.status_code == 200
        still_trickling = t.is_alive()
        done.set()
        t.join(timeout=10)
        slow.close()
        assert answered == 20 and still_trickling
    finally:
        stop(proc)


def test_bad_inputs_never_take_a_gunicorn_worker_down(exported_model: dict, tmp_path: Path) -> None:
    """The documented bad inputs against the real server: each its 4xx, /healthz 200 after, same worker pids."""
    import psutil
    from test_serve_app import _bad_requests

    port = free_port()
    proc = start_gunicorn(exported_model["model"], port, tmp_path, workers=2)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc)
        workers = sorted(c.pid for c in psutil.Process(proc.pid).children())
        for case, (kwargs, status, code) in _bad_requests().items():
            data, ctype = kwargs["data"], kwargs.get("content_type")
            if isinstance(data, dict):  # multipart: let requests build the body
                files = [(k, (v[1], v[0].getvalue())) for k, v in data.items() if isinstance(v, tuple)]
                fields = {k: v for k, v in data.items() if not isinstance(v, tuple)}
                r = requests.post(f"{base}/predict", files=files or None, data=fields or None,
                                  params=kwargs.get("query_string"), timeout=30)
                if not files:  # a multipart body without files
                    r = requests.post(f"{base}/predict", files={"field": (None, "value")}, timeout=30)
            else:
                headers = {"Content-Type": ctype} if ctype else {}
                r = requests.post(f"{base}/predict", data=data, headers=headers, params=kwargs.get("query_string"),
                                  timeout=30)
            assert r.status_code == status, (case, r.text[:300])
            assert "error" in r.json() and (not code or r.json()["error"]["code"] == code), case
            assert requests.get(f"{base}/healthz", timeout=5).status_code == 200, case
        assert sorted(c.pid for c in psutil.Process(proc.pid).children()) == workers
    finally:
        stop(proc)
