"""gunicorn with the production settings (serve/gunicorn.conf.py, serve/worker.py) against slow clients and dying
workers: real server processes on 127.0.0.1, a real HTTP client, raw sockets for the slow ones.

The only wall-clock bounds asserted are the stated ones, which are the requirement: a normal client's p99 under
1 s beside 64 slow connections (measured well below it, see bench/slow_clients.py), a half-sent body answered
408 within TORCHFERRY_BODY_TIMEOUT (15 s) and a half-sent head closed within `keepalive` (5 s), plus a margin.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from helpers import REPO, export_random_model, free_port, png, wait_ready

BODY_TIMEOUT_S = 15.0  # serve/gunicorn.conf.py's default TORCHFERRY_BODY_TIMEOUT
HEAD_TIMEOUT_S = 5.0  # serve/gunicorn.conf.py's keepalive
MARGIN_S = 3.0


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight smallcnn exported to ONNX (verified), without a training run."""
    return export_random_model(tmp_path_factory.mktemp("worker-smallcnn"), "smallcnn", 16)


@pytest.fixture(scope="module")
def resnet_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight resnet18 (64 px) exported to ONNX: its load and proof take long enough to be seen."""
    return export_random_model(tmp_path_factory.mktemp("worker-resnet18"), "resnet18", 64)


def post(base: str, body: bytes, timeout: float = 10.0) -> object:
    """One /predict on a fresh connection: the status code, or the exception's name."""
    try:
        return requests.post(f"{base}/predict", data=body, timeout=timeout,
                             headers={"Content-Type": "image/png", "Connection": "close"}).status_code
    except requests.RequestException as exc:
        return type(exc).__name__


def workers_of(proc: subprocess.Popen) -> set[int]:
    return {c.pid for c in psutil.Process(proc.pid).children()}


HEAD = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nX-Pad: " + b"a" * 200
BODY_HEAD = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: 50000\r\n\r\n"


class SlowClients:
    """`n` connections sending 1 byte/s, half of a request head, half of a body; reopened when the server closes
    them, as a slow client would. Bounded by `seconds`."""

    def __init__(self, port: int, n: int, seconds: float):
        self.port, self.n, self.stop_at = port, n, time.monotonic() + seconds
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, i: int) -> list:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        if i % 2:
            s.sendall(BODY_HEAD)
        s.setblocking(False)
        return [s, b"\xff" * 50000 if i % 2 else HEAD, 0]

    def _run(self) -> None:
        conns = [self._open(i) for i in range(self.n)]
        while not self.done.is_set() and time.monotonic() < self.stop_at:
            for i, conn in enumerate(conns):
                try:
                    conn[2] += conn[0].send(conn[1][conn[2]:conn[2] + 1])
                    if conn[2] >= len(conn[1]):
                        raise OSError("sent whole")
                except OSError:
                    conn[0].close()
                    try:
                        conns[i] = self._open(i)
                    except OSError:
                        pass
            self.done.wait(1.0)
        for conn in conns:
            conn[0].close()

    def __enter__(self):
        self.thread.start()
        time.sleep(2.0)  # every slow connection is open and has sent its first bytes
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(timeout=15)


def wait_for_answer(sock: socket.socket, limit_s: float) -> tuple[float, bytes]:
    """Seconds until the server answers and closes `sock` (bounded by `limit_s`), and what it sent."""
    t = time.monotonic()
    answer = b""
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        while time.monotonic() - t < limit_s:
            if sel.select(timeout=0.5):
                try:
                    chunk = sock.recv(4096)
                except OSError:
                    break
                if not chunk:
                    break
                answer += chunk
    return time.monotonic() - t, answer


@pytest.mark.slow
def test_64_slow_clients_do_not_delay_a_normal_client(small_model: Path, live_server) -> None:
    server = live_server("gunicorn", small_model, workers=1, threads=2)  # the production defaults
    port, base, proc = server.port, server.base, server.proc
    body = png("noise")
    latencies, statuses = [], []
    with SlowClients(port, 64, seconds=120):
        for _ in range(40):  # bounded; a request that fails ends the loop (the assertion below says so)
            t = time.perf_counter()
            statuses.append(post(base, body, timeout=5))
            latencies.append(time.perf_counter() - t)
            if statuses[-1] != 200:
                break
    assert statuses == [200] * 40, statuses
    assert np.percentile(latencies, 99) < 1.0, sorted(latencies)[-5:]
    assert proc.poll() is None


@pytest.mark.slow
def test_a_half_sent_request_is_timed_out(small_model: Path, live_server) -> None:
    port = live_server("gunicorn", small_model, workers=1, threads=4).port
    half_body = socket.create_connection(("127.0.0.1", port), timeout=5)
    half_head = socket.create_connection(("127.0.0.1", port), timeout=5)
    half_body.sendall(BODY_HEAD + b"\xff" * 500)
    half_head.sendall(HEAD)
    head_s, head_answer = wait_for_answer(half_head, HEAD_TIMEOUT_S + 30)
    body_s, body_answer = wait_for_answer(half_body, BODY_TIMEOUT_S + 30)
    half_body.close()
    half_head.close()
    assert head_s < HEAD_TIMEOUT_S + MARGIN_S, (head_s, head_answer)
    assert body_s < BODY_TIMEOUT_S + MARGIN_S, (body_s, body_answer)
    assert body_answer.startswith(b"HTTP/1.1 408 "), body_answer
    assert b'"code": "request_timeout"' in body_answer and b"Connection: close" in body_answer
    # A client that waits for "100 Continue" before its body (curl, over 1 MB) is asked for it and answered.
    body = png("noise")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                  b"Expect: 100-continue\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert s.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(body)
        _, answer = wait_for_answer(s, 30)
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"predictions"' in answer, answer
    assert answer.count(b"100 Continue") == 0
    assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200


@pytest.mark.slow
def test_a_killed_worker_is_replaced_without_a_503(resnet_model: Path, live_server) -> None:
    """SIGKILL, as the OOM killer sends it, to 1 of 3 workers under a request stream: its replacement takes no
    connection before its model is proven, so no request gets a 503 (only the one the killed worker held may fail)."""
    server = live_server("gunicorn", resnet_model, workers=3, threads=4)
    base, proc = server.base, server.proc
    body = png("noise")
    records: list[object] = []
    done = threading.Event()

    def proven() -> int:  # workers that loaded and proved their model
        return server.log.count('"event": "model_ready"')

    def client() -> None:
        for _ in range(400):  # bounded
            if done.is_set():
                return
            records.append(post(base, body))

    try:
        deadline = time.monotonic() + 60
        while len(workers_of(proc)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        before = workers_of(proc)
        while proven() < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        streak = 0
        while streak < 30 and time.monotonic() < deadline:  # every worker answers (the start is the next test's)
            streak = streak + 1 if post(base, body) == 200 else 0
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        while len(records) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        while len(workers_of(proc) - before) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        replaced_at = len(records)
        # The stream goes on while the replacement imports, loads and proves its model (its model_ready line, the
        # fourth), and two seconds after.
        while proven() < 4 and time.monotonic() < deadline and any(t.is_alive() for t in threads):
            time.sleep(0.05)
        assert proven() == 4, server.log[-3000:]
        until = time.monotonic() + 2
        while time.monotonic() < until and any(t.is_alive() for t in threads):
            time.sleep(0.05)
        done.set()
        for t in threads:
            t.join(timeout=30)
        assert len(workers_of(proc) - before) == 1 and victim not in workers_of(proc)
    finally:
        done.set()
    assert 503 not in records, records
    assert all(r == 200 or r == "ConnectionError" for r in records), records
    assert sum(r == "ConnectionError" for r in records) <= 4 and len(records) >= replaced_at + 20


@pytest.mark.slow
def test_a_sighup_while_a_worker_loads_its_model_does_not_end_it(resnet_model: Path, live_server) -> None:
    """SIGHUP (look for a new model version) reaching a worker that still loads its model is kept for after the
    load; by default it would end the worker, and gunicorn would start another."""
    server = live_server("gunicorn", resnet_model, workers=1, threads=2, ready=False)
    proc, log = server.proc, Path(server.proc.log_path)
    deadline = time.monotonic() + 60
    while not workers_of(proc) and time.monotonic() < deadline:
        time.sleep(0.02)
    worker = workers_of(proc)
    time.sleep(0.3)  # past gunicorn's signal set-up in the worker, while the app imports and loads its model
    loading = '"model_ready"' not in log.read_text()
    proc.send_signal(signal.SIGHUP)
    wait_ready(server.base, proc)
    assert loading and len(worker) == 1 and workers_of(proc) == worker, log.read_text()[-3000:]
    assert "was sent SIGHUP" not in log.read_text()


@pytest.mark.slow
def test_ready_means_every_accepting_worker_answers(small_model: Path, live_server, tmp_path: Path) -> None:
    """A 2-worker start: from the first 200 of /readyz on, no request gets a 503 from a worker still loading."""
    home = tmp_path / "home"
    server = live_server("gunicorn", small_model, workers=2, threads=4, ready=False,
                         env={"HOME": str(home), "XDG_RUNTIME_DIR": str(home / "run")})
    base, proc = server.base, server.proc
    body = png("noise")
    records: list[object] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if requests.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        except (requests.ConnectionError, requests.Timeout):
            pass
        time.sleep(0.02)
    ready_at = time.monotonic()

    def client() -> None:
        for _ in range(300):  # bounded, and by time: the 1.5 s after the first ready
            if time.monotonic() - ready_at > 1.5:
                return
            records.append(post(base, body))
            try:
                records.append(requests.get(f"{base}/readyz", timeout=10,
                                            headers={"Connection": "close"}).status_code)
            except requests.RequestException as exc:
                records.append(type(exc).__name__)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert records and all(r == 200 for r in records), records
    # No gunicornc control socket: the server is run by signals alone.
    assert not list(home.rglob("gunicorn.ctl")) and proc.poll() is None


@pytest.mark.slow
def test_uploads_that_together_pass_the_byte_budget_are_all_answered(small_model: Path, live_server) -> None:
    """1 worker × 1 thread buffers at most 2 × 16 MiB of bodies: four 12 MiB uploads sent side by side each held part
    of it and waited for room the others held, until all four ended in 408. Now the body that began first goes on."""
    server = live_server("gunicorn", small_model, workers=1, threads=1, env={"TORCHFERRY_BODY_TIMEOUT": "8"})
    size = 12 * 2**20  # zeros, not an image: a quick 400 once read whole
    head = (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nConnection: close\r\n"
            b"Content-Length: " + str(size).encode() + b"\r\n\r\n")
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(4)]
    try:
        for sock in socks:
            sock.sendall(head)
            sock.setblocking(False)
        left, chunk = {sock: size for sock in socks}, b"\0" * (64 * 1024)
        deadline = time.monotonic() + 30
        with selectors.DefaultSelector() as sel:
            for sock in socks:
                sel.register(sock, selectors.EVENT_WRITE)
            while left and time.monotonic() < deadline:  # 64 KiB to each writable one in turn: side by side
                time.sleep(0.002)
                for key, _ in sel.select(timeout=0.5):
                    sock = key.fileobj
                    try:
                        left[sock] -= sock.send(chunk[:left[sock]])
                    except BlockingIOError:
                        continue
                    except OSError:  # answered (408) and closed before the whole body was sent
                        left[sock] = 0
                    if not left[sock]:
                        del left[sock]
                        sel.unregister(sock)
        statuses = []
        for sock in socks:
            sock.setblocking(True)
            sock.settimeout(30)
            answer = b""
            while b"\r\n" not in answer:
                data = sock.recv(4096)
                if not data:
                    break
                answer += data
            statuses.append(int(answer.split(b" ")[1]) if answer.startswith(b"HTTP/1.1 ") else answer)
    finally:
        for sock in socks:
            sock.close()
    assert statuses == [400] * 4, statuses


def test_a_bad_body_timeout_stops_gunicorn_at_start(tmp_path: Path) -> None:
    env = {**os.environ, "TORCHFERRY_BIND": f"127.0.0.1:{free_port()}", "TORCHFERRY_BODY_TIMEOUT": "soon"}
    proc = subprocess.run([sys.executable, "-m", "gunicorn", "-c", str(REPO / "torchferry" / "serve" / "gunicorn.conf.py")],
                          check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "TORCHFERRY_BODY_TIMEOUT='soon' must be a positive number of seconds" in proc.stderr


def test_buffered_bytes_are_bounded_per_worker_and_a_body_waits_for_room() -> None:
    """ByteBudget, in-process: a body whose bytes would pass the worker's bound waits until another gives
    room back; a body alone is never kept waiting on itself, nor is the body that began first, so bodies that
    together pass the bound still complete (they all waited on each other, then ended in 408). Content-Length is
    read from gunicorn's headers."""
    import types

    import gevent

    from torchferry.serve.worker import ByteBudget, _content_length

    first, second, third = object(), object(), object()
    budget, events = ByteBudget(100), []
    budget.take(first, 80)

    def take_second() -> None:
        budget.take(second, 50)  # 80 + 50 > 100: waits
        events.append("second took")

    waiter = gevent.spawn(take_second)
    gevent.sleep(0.05)
    assert events == [] and budget.used == 80
    events.append("first gave")
    budget.give(first)
    waiter.join(timeout=10)
    assert events == ["first gave", "second took"] and budget.used == 50
    alone = ByteBudget(100)
    alone.take(first, 250)  # more than the bound, but nothing else is buffered
    assert alone.used == 250
    # Two bodies half read that both need more: the one that began first goes on (past the bound by its chunks),
    # the other waits until it is answered.
    budget.take(third, 40)  # second 50 + third 40
    budget.take(second, 30)  # second began first: 120 held
    waiter = gevent.spawn(budget.take, third, 30)
    gevent.sleep(0.05)
    assert budget.used == 120 and not waiter.dead
    budget.give(second)
    waiter.join(timeout=10)
    assert waiter.dead and budget.used == 70

    def req(*headers: tuple[str, str]) -> types.SimpleNamespace:
        return types.SimpleNamespace(headers=list(headers))

    assert _content_length(req(("HOST", "x"), ("CONTENT-LENGTH", "12"))) == 12
    assert _content_length(req(("CONTENT-LENGTH", "twelve"))) is None and _content_length(req()) is None


class _Recorder:
    """A socket that records every send."""

    def __init__(self) -> None:
        self.sends: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sends.append(bytes(data))

    def fileno(self) -> int:
        self.sends.append(b"<fileno>")
        return -1


def test_a_response_head_leaves_with_the_first_body_bytes_and_nothing_is_reordered() -> None:
    from gunicorn import util

    from torchferry.serve.worker import HeadWithBody

    sock = _Recorder()
    out = HeadWithBody(sock)
    util.write(out, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
    assert sock.sends == []  # held
    util.write(out, b"{}")
    util.write(out, b"more")
    out.flush()
    assert sock.sends == [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", b"more"]  # one send, then as they come
    sock = _Recorder()
    out = HeadWithBody(sock)
    util.write(out, b"HTTP/1.1 200 OK\r\n\r\n")
    util.write(out, b"body", chunked=True)
    out.fileno()  # sendfile: what is held leaves first
    assert sock.sends == [b"HTTP/1.1 200 OK\r\n\r\n4\r\nbody\r\n", b"<fileno>"]
    sock = _Recorder()
    out = HeadWithBody(sock)
    util.write(out, b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n")  # a HEAD request's answer: no body follows
    out.flush()
    out.flush()
    assert sock.sends == [b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"]


def test_a_workers_log_lines_go_through_a_queue_and_are_all_written_at_exit(monkeypatch, tmp_path: Path) -> None:
    import importlib.util
    import io
    import logging
    import types

    from torchferry.serve import accesslog
    from torchferry.serve.worker import LineQueue

    spec = importlib.util.spec_from_file_location("tf_gunicorn_conf", REPO / "torchferry" / "serve" / "gunicorn.conf.py")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    root, stream = logging.getLogger(), io.StringIO()
    saved = root.handlers[:], root.level
    root.handlers = [logging.StreamHandler(stream)]
    root.setLevel(logging.INFO)  # what basicConfig sets in a fresh worker
    worker = types.SimpleNamespace(notify=lambda: None)
    try:
        conf.post_fork(None, worker)
        worker.model_loaded.set()
        assert [type(h) for h in root.handlers] == [LineQueue]  # a request thread only enqueues
        # and an access line only as its fields: the writer makes its JSON and its record, in the lines' order
        assert accesslog._sink == worker.log_listener.queue.put
        for i in range(200):
            logging.getLogger("torchferry.serve.access").info('{"n": %d}', i)
            accesslog.line(("POST", "/predict", 200, i / 1000, 1, i))
        conf.worker_exit(None, worker)
        lines = stream.getvalue().splitlines()
        assert lines[0::2] == [f'{{"n": {i}}}' for i in range(200)]
        assert [json.loads(line) for line in lines[1::2]] == [
            {"method": "POST", "route": "/predict", "status": 200, "ms": float(i), "images": 1, "bytes": i}
            for i in range(200)]
        # Once the writer is gone, lines are written in place again (by a request still running, say).
        assert accesslog._sink is None and [type(h) for h in root.handlers] == [logging.StreamHandler]
        accesslog.line(("GET", "/healthz", 200, 0.001, 0, 0))
        logging.getLogger("torchferry.serve").info("after exit")
        assert stream.getvalue().splitlines()[-2:] == [
            '{"method": "GET", "route": "/healthz", "status": 200, "ms": 1.0, "images": 0, "bytes": 0}', "after exit"]
        # An access logger with a handler of its own (a --log-config) keeps its lines: they are not deferred.
        own = logging.getLogger("torchferry.serve.access")
        own.addHandler(logging.NullHandler())
        try:
            conf.post_fork(None, worker)
            worker.model_loaded.set()
            assert accesslog._sink is None
            conf.worker_exit(None, worker)
        finally:
            own.handlers.clear()
    finally:
        accesslog.defer_to(None)
        root.handlers, level = saved
        root.setLevel(level)


def test_a_deferred_access_line_keeps_the_time_its_request_ended() -> None:
    import logging

    from torchferry.serve import accesslog

    ended = time.time() - 5.0  # written 5 s later by the log writer
    record = accesslog.record(("POST", "/predict", 200, 0.002, 1, 10, ended))
    assert record.created == ended and record.msecs == int((ended - int(ended)) * 1000)
    assert record.name == "torchferry.serve.access" and record.levelno == logging.INFO
    assert json.loads(record.getMessage())["ms"] == 2.0


def test_the_log_writer_wakes_on_its_interval_not_on_every_line() -> None:
    """A request thread's line wakes no thread (each wake-up is one more thread asking for the GIL after every
    request); the writer takes what is queued when its interval ends, in order, and all of it when stopped."""
    import io
    import logging

    from torchferry.serve.worker import queue_log_lines

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("torchferry.test.log-writer")
    root.setLevel(logging.INFO)
    root.propagate = False
    root.handlers = [handler]
    writer = queue_log_lines(root, interval=3600.0)
    try:
        for i in range(50):
            root.info('{"n": %d}', i)
        time.sleep(0.3)  # a per-line listener has written them all by now
        assert stream.getvalue() == ""
        writer.write_queued()
        assert stream.getvalue().splitlines() == [f'{{"n": {i}}}' for i in range(50)]
        root.info("last")
    finally:
        writer.stop()
    assert stream.getvalue().splitlines()[-1] == "last"
