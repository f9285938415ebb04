"""Real server processes on 127.0.0.1 (the dev server and gunicorn) and a real HTTP client."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from helpers import REPO, bad_requests, png, pytorch_labels, slow_request_body, val_images


@pytest.mark.parametrize("server", ["dev", pytest.param("gunicorn", marks=pytest.mark.slow)])
def test_real_server_predicts_what_pytorch_predicts(server: str, exported_model: dict, tmp_path: Path,
                                                    live_server) -> None:
    base = live_server(server, exported_model["model"]).base
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


def test_dev_server_refuses_a_missing_model(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "serve", "--model", str(tmp_path / "none.onnx")], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


@pytest.mark.slow
def test_sigterm_lets_requests_in_flight_finish(exported_model: dict, live_server) -> None:
    server = live_server("gunicorn", exported_model["model"], workers=1, threads=4, graceful=20)
    base, proc = server.base, server.proc
    body = slow_request_body()
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
    statuses = [s for _, s in records]
    assert not [s for s in statuses if isinstance(s, int) and s >= 500], statuses
    in_flight = [s for started, s in records if started < sigterm_at - 0.05 and (sigterm_at - started) < 30]
    assert in_flight and all(s == 200 for s in in_flight), records
    assert sum(1 for s in statuses if s == 200) >= 6


@pytest.mark.slow
def test_slow_client_does_not_block_others(exported_model: dict, live_server) -> None:
    server = live_server("gunicorn", exported_model["model"], workers=1, threads=4)
    port, base = server.port, server.base
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
        r = requests.post(f"{base}/predict", data=png((200, 30, 30)), headers={"Content-Type": "image/png"},
                          timeout=10)
        answered += r.status_code == 200
    still_trickling = t.is_alive()
    done.set()
    t.join(timeout=10)
    slow.close()
    assert answered == 20 and still_trickling


@pytest.mark.slow
def test_bad_inputs_never_take_a_gunicorn_worker_down(exported_model: dict, live_server) -> None:
    """The documented bad inputs against the real server: each its 4xx, /healthz 200 after, same worker pids."""
    import psutil

    server = live_server("gunicorn", exported_model["model"], workers=2)
    base, proc = server.base, server.proc
    workers = sorted(c.pid for c in psutil.Process(proc.pid).children())
    for case, (kwargs, status, code) in bad_requests().items():
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
